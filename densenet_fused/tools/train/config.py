"""What every part of ``densenet-fused train`` shares: the error it reports, file names, the
metrics' columns and the torchrun environment."""
import os
from typing import Tuple

METRICS_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "peak_mem_mb")
CHECKPOINT, METRICS = "checkpoint.pt", "metrics.csv"
AUTO_DEPTHS = (40, 100, 190, 250, 400, 550, 700, 1000, 1204, 1600, 2200, 3004)  # 6n + 4


class TrainError(Exception):
    """Bad input to ``densenet-fused train``: one line, raised before anything is written."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def dist_env() -> Tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
