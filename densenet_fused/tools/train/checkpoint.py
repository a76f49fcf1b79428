"""What ``densenet-fused train`` writes: OUT/checkpoint.pt (model, optimizer, schedule, RNG states),
OUT/metrics.csv (one row per epoch) and the loss and accuracy plots."""
import csv
import os
import random
from typing import List

import torch

from .config import CHECKPOINT, METRICS_COLUMNS


def rng_state(device: torch.device) -> dict:
    import numpy as np
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    import numpy as np
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, out: str) -> None:
    """OUT/checkpoint.pt replaced at once (written to OUT/checkpoint.pt.tmp first)."""
    tmp = os.path.join(out, CHECKPOINT + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before it replaces the last good checkpoint
    os.replace(tmp, os.path.join(out, CHECKPOINT))


def read_metrics(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_metrics(path: str, rows: List[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot_metrics(rows: List[dict], out: str) -> List[str]:
    """OUT/loss.png and OUT/accuracy.png: train and validation curves per epoch (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [int(r["epoch"]) for r in rows]
    written = []
    for key, label in (("loss", "cross-entropy loss"), ("acc", "accuracy")):
        fig = Figure(figsize=(5, 3.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for split in ("train", "val"):
            ax.plot(epochs, [float(r[f"{split}_{key}"]) for r in rows], marker="o", markersize=3,
                    label={"train": "train", "val": "validation"}[split])
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if key == "acc":
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, "loss.png" if key == "loss" else "accuracy.png")
        fig.savefig(path)
        written.append(path)
    return written


# ------------------------------------------------------------------------- the run's configuration

FORMAT = 2  # checkpoint.pt layout: "config" records the run (RECORDED + epochs, lr), "metrics" its rows
RECORDED = {  # config key -> what the user changed, in a refusal
    "model": "--model", "depth": "--depth", "growth_rate": "--growth-rate", "baseline": "--baseline",
    "weights": "--weights", "data_kind": "data set kind", "classes": "class names", "num_classes": "classes",
    "image_size": "--image-size", "train_images": "training images", "val_images": "validation images",
    "samples": "sample list (file names and labels)", "flip": "--no-flip", "batch_size": "--batch-size",
    "seed": "--seed", "device": "--device", "world_size": "processes", "sync_bn": "--sync-bn",
    "cuda_graphs": "--cuda-graphs",
}
CHANGEABLE = "--epochs (see --help), --lr, --workers, --allow-nonfinite"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_differences(saved: dict, config: dict) -> List[str]:
    """What differs between a checkpoint's recorded configuration and this run's, one phrase each."""
    return [f"{label} ({_short(saved.get(key))} there, {_short(config.get(key))} here)"
            for key, label in RECORDED.items() if saved.get(key) != config.get(key)]
