"""``densenet-fused train``: train a DenseNet on a local data set, as one command.

Data: a CIFAR-10 / CIFAR-100 root as torchvision's datasets read it (never downloaded), or an
ImageFolder root with ``train/`` and ``val/`` class folders.  Models: ``densenet_bc`` (``--depth``,
``--growth-rate``), ``densenet121/161/169/201/264`` (the package's fused models),
``torchvision:NAME`` / ``timm:NAME`` (converted with :func:`densenet_fused.convert`); ``--baseline``
trains the same architecture on torchvision's unfused dense blocks instead.

Training: SGD with Nesterov momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 50% and
75% of the epochs (Huang et al.'s CIFAR schedule); bf16 autocast and channels-last on CUDA,
float32 on the CPU.  Outputs (rank 0 alone under ``torchrun``): ``OUT/metrics.csv`` (one row per
epoch), ``OUT/checkpoint.pt`` after each epoch, ``OUT/loss.png`` and ``OUT/accuracy.png``.

Bad input raises :class:`TrainError` before anything is written; the command prints it as one
line and exits with status 2.
"""
import csv
import math
import os
import random
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

METRICS_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "peak_mem_mb")
FUSED_MODELS = {  # name -> (growth rate, block config, stem features), as in models.py and torchvision
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
    "densenet264": (32, (6, 12, 64, 48), 64),
}
MODEL_NAMES = ("densenet_bc",) + tuple(FUSED_MODELS)
CIFAR_DIRS = {"cifar-10-batches-py": ("CIFAR10", 10), "cifar-100-python": ("CIFAR100", 100)}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
AUTO_DEPTHS = (40, 100, 190, 250, 400, 550, 700, 1000, 1204, 1600, 2200, 3004)  # 6n + 4
CHECKPOINT, METRICS = "checkpoint.pt", "metrics.csv"


class TrainError(Exception):
    """Bad input to ``densenet-fused train``: one line, raised before anything is written."""


@dataclass
class Data:
    kind: str                     # "CIFAR10", "CIFAR100" or "ImageFolder"
    train: object
    val: object
    classes: List[str]
    image_size: int


@dataclass
class Plan:
    """Everything checked and built before the first write."""
    args: object
    device: torch.device
    data: Data
    model: nn.Module
    batch_size: int
    depth: Optional[int]
    config: dict
    checkpoint: Optional[dict] = None
    notes: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- data

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _transforms(image_size: int, mean, std, resize: bool, flip: bool = True):
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(mean, std)]
    flips = [T.RandomHorizontalFlip()] if flip else []
    if image_size <= 64:  # CIFAR-style: random crop with padding, horizontal flip
        fix = [T.Resize((image_size, image_size))] if resize else []
        train = T.Compose(fix + [T.RandomCrop(image_size, padding=max(1, image_size // 8))] + flips + norm)
        val = T.Compose(fix + norm)
    else:  # ImageNet-style
        train = T.Compose([T.RandomResizedCrop(image_size)] + flips + norm)
        val = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)] + norm)
    return train, val


def load_data(path: str, image_size: Optional[int] = None, flip: bool = True) -> Data:
    """The training and validation sets of a CIFAR root or an ImageFolder root (never downloads);
    ``flip=False`` leaves out the random horizontal flip (digits, text: orientation matters)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise TrainError("reading data sets needs torchvision (pip install torchvision)") from None
    from torchvision import datasets

    if not os.path.isdir(path):
        raise TrainError(f"--data {path}: no such directory")
    path = os.path.abspath(path)
    base = os.path.basename(path.rstrip(os.sep))
    root, cifar = None, None
    if base in CIFAR_DIRS:
        root, cifar = os.path.dirname(path), CIFAR_DIRS[base]
    else:
        found = [d for d in CIFAR_DIRS if os.path.isdir(os.path.join(path, d))]
        if found:
            root, cifar = path, CIFAR_DIRS[found[0]]
    if cifar is not None:
        name, _ = cifar
        size = image_size or 32
        train_tf, val_tf = _transforms(size, CIFAR_MEAN, CIFAR_STD, resize=size != 32, flip=flip)
        cls = getattr(datasets, name)
        try:
            train = cls(root, train=True, download=False, transform=train_tf)
            val = cls(root, train=False, download=False, transform=val_tf)
        except (RuntimeError, OSError, ValueError) as exc:
            raise TrainError(f"--data {path}: torchvision's {name} cannot read it ({_first_line(exc)}); "
                             f"this command never downloads") from None
        return Data(name, train, val, list(train.classes), size)
    if not (os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "val"))):
        raise TrainError(f"--data {path}: expected a CIFAR-10/100 root (holding cifar-10-batches-py/ or "
                         f"cifar-100-python/, as torchvision reads it) or an ImageFolder root with train/ "
                         f"and val/ class folders")
    try:
        probe = datasets.ImageFolder(os.path.join(path, "train"))
        probe_val = datasets.ImageFolder(os.path.join(path, "val"))
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise TrainError(f"--data {path}: not a readable ImageFolder ({_first_line(exc)})") from None
    if probe.classes != probe_val.classes:
        raise TrainError(f"--data {path}: train/ and val/ must have the same class folders, got "
                         f"{probe.classes} and {probe_val.classes}")
    if len(probe.classes) < 2:
        raise TrainError(f"--data {path}: expected at least 2 class folders, got {probe.classes}")
    if image_size is None:
        try:
            w, h = probe.loader(probe.samples[0][0]).size
        except OSError as exc:
            raise TrainError(f"--data {path}: cannot read {probe.samples[0][0]} ({_first_line(exc)})") from None
        image_size = max(w, h) if max(w, h) <= 64 else 224
    train_tf, val_tf = _transforms(image_size, IMAGENET_MEAN, IMAGENET_STD, resize=True, flip=flip)
    train = datasets.ImageFolder(os.path.join(path, "train"), transform=train_tf)
    val = datasets.ImageFolder(os.path.join(path, "val"), transform=val_tf)
    return Data("ImageFolder", train, val, list(train.classes), image_size)


def write_digits_imagefolder(root: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                             per_class: Optional[int] = None) -> dict:
    """scikit-learn's digits (1797 8x8 images, 10 classes, shipped with the package) upsampled
    to ``size`` x ``size`` (bilinear) and saved as an ImageFolder: ``root/{train,val}/<digit>/*.png``,
    a stratified split.  ``per_class`` keeps that many images of each class.  Returns the counts."""
    import numpy as np
    from PIL import Image
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TrainError("the digits data set comes with scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    rng = np.random.RandomState(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        if per_class is not None:
            idx = idx[:per_class]
        n_val = max(1, round(len(idx) * val_fraction))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in part:
                img = Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8))  # 2-D uint8: mode L
                img.resize((size, size), Image.BILINEAR).save(os.path.join(folder, f"{i:04d}.png"))
                counts[split] += 1
    return counts


# --------------------------------------------------------------------------------------- models

def _torchvision_densenet(growth, blocks, init, num_classes, small_inputs):
    """torchvision's DenseNet (unfused blocks), with the CIFAR stem (one 3x3 convolution) for
    ``small_inputs``: the same module names and state_dict keys as the package's models."""
    import torchvision

    m = torchvision.models.DenseNet(growth, blocks, init, num_classes=num_classes)
    if small_inputs:
        conv0 = nn.Conv2d(3, init, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv0.weight)
        rest = [(n, c) for n, c in m.features.named_children() if n not in ("conv0", "norm0", "relu0", "pool0")]
        m.features = nn.Sequential(OrderedDict([("conv0", conv0)] + rest))
    return m


def _check_model_name(name: str) -> None:
    if name in MODEL_NAMES:
        return
    prefix, _, rest = name.partition(":")
    if prefix in ("torchvision", "timm") and rest:
        return
    raise TrainError(f"--model {name}: unknown model; expected one of {', '.join(MODEL_NAMES)}, "
                     f"torchvision:NAME or timm:NAME")


def build_model(name: str, num_classes: int, depth: Optional[int] = None, growth_rate: Optional[int] = None,
                baseline: bool = False, weights: Optional[str] = None) -> nn.Module:
    """The model to train (CPU, float32, training mode); ``weights`` is a local state_dict
    (or a checkpoint.pt of this command) loaded with strict=True."""
    from .. import models
    from ..convert import convert
    from ..modules import FusedDenseBlock

    _check_model_name(name)
    if name == "densenet_bc":
        depth = 100 if depth is None else depth
        growth = 12 if growth_rate is None else growth_rate
        if depth < 10 or (depth - 4) % 6:
            raise TrainError(f"--depth {depth}: densenet_bc expects depth = 6n + 4 with n >= 1 (e.g. 40, 100, 190)")
        if growth < 1:
            raise TrainError(f"--growth-rate {growth}: expected a positive integer")
        n = (depth - 4) // 6
        model = (_torchvision_densenet(growth, (n, n, n), 2 * growth, num_classes, small_inputs=True) if baseline
                 else models.densenet_bc(depth, growth, num_classes))
    elif name in FUSED_MODELS:
        model = (_torchvision_densenet(*FUSED_MODELS[name], num_classes, small_inputs=False) if baseline
                 else getattr(models, name)(num_classes=num_classes))
    elif name.startswith("torchvision:"):
        import torchvision
        arch = name.split(":", 1)[1]
        try:
            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        except (ValueError, KeyError, TypeError) as exc:
            raise TrainError(f"--model {name}: torchvision cannot build it ({_first_line(exc)})") from None
    else:
        try:
            import timm
        except ImportError:
            raise TrainError(f"--model {name}: needs timm (pip install timm)") from None
        arch = name.split(":", 1)[1]
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise TrainError(f"--model {name}: timm cannot build it ({_first_line(exc)})") from None
    if weights is not None:
        if not os.path.isfile(weights):
            raise TrainError(f"--weights {weights}: no such file")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
            raise TrainError(f"--weights {weights}: cannot load it ({_first_line(exc)})") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict) and "epoch" in state:
            state = state["model"]  # a checkpoint.pt of this command
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise TrainError(f"--weights {weights}: does not match --model {name} with {num_classes} classes "
                             f"({_first_line(exc)})") from None
    if name.partition(":")[0] in ("torchvision", "timm") and not baseline:
        model = convert(model)
        if not any(isinstance(m, FusedDenseBlock) for m in model.modules()):
            raise TrainError(f"--model {name}: has no dense block to fuse; pass --baseline to train it unchanged")
    return model.train()


# ------------------------------------------------------------------------------- budget search

def _fits(row: dict, budget_gb: float) -> bool:
    """A step that ran under the cap, with room left for SGD's momentum buffer: the measured peak
    is above the parameters and gradients already allocated, so parameters + gradients +
    momentum (3 x 4 bytes a parameter) + the step's peak must stay within the budget."""
    return (row["status"] == "ok" and row["peak_mb"] is not None
            and row["peak_mb"] + 3 * 4 * row["params"] / 2 ** 20 <= budget_gb * 1024)


def search_batch(make_model, image_size: int, device: torch.device, budget_gb: float, max_batch: int) -> int:
    """Largest power-of-two batch (2 .. max_batch) whose bf16 training step fits the budget (CUDA)."""
    from . import bench

    def builder(case, provider, dev):
        return make_model().to(dev).to(memory_format=torch.channels_last).train()

    best, batch = 0, 2
    with bench.MemoryCap(str(device), budget_gb):
        while batch <= max_batch:
            case = bench.Case(f"train_b{batch}", "model", batch, image_size, c0=3)
            if not _fits(bench.one_step(case, "fused", str(device), "bf16", builder), budget_gb):
                break
            best, batch = batch, batch * 2
    torch.cuda.empty_cache()
    return best


def search_depth(device: torch.device, budget_gb: float, growth: int, batch: int, baseline: bool) -> int:
    """Deepest DenseNet-BC in AUTO_DEPTHS whose bf16 training step at ``batch`` fits the budget (CUDA)."""
    from . import bench

    provider = "torchvision" if baseline else "fused"
    rows = bench.depth_at_budget(str(device), budget_gb, growth, [provider], AUTO_DEPTHS, batch=batch, dtype="bf16")
    best = 0
    for row in rows:
        if not _fits(row, budget_gb):
            break
        best = row["depth"]
    torch.cuda.empty_cache()
    return best


# ------------------------------------------------------------------------------------ planning

def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def prepare(args) -> Plan:
    """Check every input and build data and model; writes nothing.  Raises TrainError."""
    world, _, local_rank = _dist_env()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: CUDA is not available on this machine")
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if args.epochs < 1:
        raise TrainError(f"--epochs {args.epochs}: expected a positive integer")
    if args.lr <= 0 or not math.isfinite(args.lr):
        raise TrainError(f"--lr {args.lr}: expected a positive number")
    if args.workers < 0:
        raise TrainError(f"--workers {args.workers}: expected 0 or more")
    _check_model_name(args.model)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    random.seed(args.seed)
    auto_depth = args.depth == "auto"
    depth = None
    if args.depth is not None and not auto_depth:
        try:
            depth = int(args.depth)
        except ValueError:
            raise TrainError(f"--depth {args.depth}: expected an integer (6n + 4) or auto") from None
    if args.model != "densenet_bc" and (args.depth is not None or args.growth_rate is not None):
        raise TrainError(f"--depth/--growth-rate apply to --model densenet_bc only, not {args.model}")
    if args.memory_budget is not None:
        if device.type != "cuda":
            raise TrainError("--memory-budget needs --device cuda (it caps and measures CUDA memory)")
        if not args.memory_budget > 0:
            raise TrainError(f"--memory-budget {args.memory_budget}: expected a positive number of GB")
    if auto_depth:
        if args.memory_budget is None:
            raise TrainError("--depth auto needs --memory-budget GB (and --device cuda)")
        if args.batch_size is None:
            raise TrainError("--depth auto needs --batch-size: it finds the deepest DenseNet-BC at that batch")
    if args.batch_size is None and args.memory_budget is None:
        raise TrainError("--batch-size is required (or --memory-budget GB to pick the largest batch that fits)")
    if args.batch_size is not None and args.batch_size < 1:
        raise TrainError(f"--batch-size {args.batch_size}: expected a positive integer")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise TrainError("the loss and accuracy plots need matplotlib (pip install matplotlib)") from None

    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainError(f"--out {out}: exists and is not a directory")
    ckpt_path = os.path.join(out, CHECKPOINT)
    checkpoint = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise TrainError(f"--resume: no {ckpt_path} to resume from")
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise TrainError(f"--resume: cannot load {ckpt_path} ({_first_line(exc)})") from None
    elif any(os.path.exists(os.path.join(out, f)) for f in (CHECKPOINT, METRICS)):
        raise TrainError(f"--out {out}: already holds a run ({CHECKPOINT}/{METRICS}); pass --resume to continue "
                         f"it or choose another --out")

    data = load_data(args.data, args.image_size, flip=not args.no_flip)
    if world > 1 and len(data.val) < world:
        raise TrainError(f"--data {args.data}: {len(data.val)} validation images for {world} processes")
    notes = []
    growth = args.growth_rate if args.growth_rate is not None else (12 if args.model == "densenet_bc" else None)
    batch = args.batch_size
    if auto_depth:
        if data.image_size != 32:
            raise TrainError(f"--depth auto searches 32x32 inputs; the data are {data.image_size}x{data.image_size}")
        depth = search_depth(device, args.memory_budget, growth, batch, args.baseline)
        if depth == 0:
            raise TrainError(f"--memory-budget {args.memory_budget} GB: no DenseNet-BC (k={growth}) of depth "
                             f">= {AUTO_DEPTHS[0]} trains a step of batch {batch} within it")
        notes.append(f"--depth auto: depth {depth} is the deepest of {AUTO_DEPTHS} that fits "
                     f"{args.memory_budget} GB at batch {batch}")
    if args.model == "densenet_bc" and depth is None:
        depth = 100
    if checkpoint is not None:
        depth = checkpoint.get("config", {}).get("depth", depth) if auto_depth else depth

    def make_model():
        return build_model(args.model, len(data.classes), depth, growth, args.baseline, args.weights)

    model = make_model()
    if args.memory_budget is not None and not auto_depth:
        cap = args.batch_size if args.batch_size is not None else len(data.train)
        batch = search_batch(make_model, data.image_size, device, args.memory_budget, cap)
        if batch == 0:
            raise TrainError(f"--memory-budget {args.memory_budget} GB: no batch of 2 or more {args.model} "
                             f"training steps at {data.image_size}x{data.image_size} fits within it")
        notes.append(f"--memory-budget: batch {batch} is the largest power of two up to {cap} that fits "
                     f"{args.memory_budget} GB")

    config = {"model": args.model, "depth": depth, "growth_rate": growth, "baseline": bool(args.baseline),
              "num_classes": len(data.classes), "classes": data.classes, "image_size": data.image_size,
              "data_kind": data.kind}
    if checkpoint is not None:
        saved = checkpoint.get("config", {})
        diff = [k for k in ("model", "depth", "growth_rate", "baseline", "num_classes", "image_size")
                if saved.get(k) != config[k]]
        if diff:
            raise TrainError(f"--resume: {ckpt_path} was trained with " + ", ".join(
                f"{k}={saved.get(k)!r}" for k in diff) + " but this run has " + ", ".join(
                f"{k}={config[k]!r}" for k in diff))
        try:
            model.load_state_dict(checkpoint["model"], strict=True)
        except (RuntimeError, KeyError) as exc:
            raise TrainError(f"--resume: {ckpt_path} does not match the model ({_first_line(exc)})") from None
    if args.sync_bn and world > 1 and device.type == "cpu":
        outside = _norms_outside_fused_blocks(model)
        if outside:
            raise TrainError(
                f"--sync-bn on cpu: DistributedDataParallel refuses nn.SyncBatchNorm in CPU models, and "
                f"{len(outside)} BatchNorm layers of this model are outside fused dense blocks (e.g. {outside[0]}); "
                f"fused blocks synchronize their own statistics on gloo: use --device cuda (NCCL) for this model")
    return Plan(args, device, data, model, batch, depth, config, checkpoint, notes)


def _norms_outside_fused_blocks(model: nn.Module) -> List[str]:
    """Names of the BatchNorm layers that densenet_fused.convert_sync_batchnorm would turn into
    nn.SyncBatchNorm (those no fused module synchronizes itself), from a conversion of a copy."""
    import copy

    from ..sync_batchnorm import convert_sync_batchnorm
    converted = convert_sync_batchnorm(copy.deepcopy(model))
    return [name for name, m in converted.named_modules() if isinstance(m, nn.SyncBatchNorm)]


# ------------------------------------------------------------------------------------ outputs

def _rng_state(device: torch.device) -> dict:
    import numpy as np
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    import numpy as np
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def read_metrics(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_metrics(path: str, rows: List[dict]) -> None:
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


# ----------------------------------------------------------------------------------- training

def _lr_factor(epoch: int, epochs: int) -> float:
    """lr / base lr at ``epoch`` (0-based): divided by 10 at 50% and 75% of the epochs."""
    return 0.1 ** sum(epoch >= m for m in (int(0.5 * epochs), int(0.75 * epochs)) if m > 0)


def fit(plan: Plan) -> int:
    from torch.utils.data import DataLoader, DistributedSampler, Subset
    from tqdm import tqdm

    args, device, data = plan.args, plan.device, plan.data
    world, rank, _ = _dist_env()
    distributed = world > 1
    main_rank = rank == 0
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if distributed:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
    if distributed:  # each rank its own augmentation stream (the samplers share args.seed)
        torch.manual_seed(args.seed + 1 + rank)
        random.seed(args.seed + 1 + rank)

    model = plan.model.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    if distributed and args.sync_bn:  # fused blocks synchronize their own statistics; other norms: SyncBatchNorm
        from ..sync_batchnorm import convert_sync_batchnorm
        model = convert_sync_batchnorm(model)
    raw = model
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.SGD(raw.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    epochs = args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: _lr_factor(e, epochs))
    start = 0
    out = args.out
    metrics_path = os.path.join(out, METRICS)
    rows: List[dict] = []
    if plan.checkpoint is not None:
        ck = plan.checkpoint
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        start = int(ck["epoch"])
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # the schedule of this --epochs
            group["lr"] = base * _lr_factor(start, epochs)
        if main_rank and os.path.isfile(metrics_path):
            rows = [r for r in read_metrics(metrics_path) if int(r["epoch"]) <= start]
        if world == 1 and ck.get("world_size", 1) == 1:
            _set_rng_state(ck["rng"], device)  # the run goes on as if never stopped
        elif distributed:
            torch.manual_seed(args.seed + 1 + rank + world * start)
            random.seed(args.seed + 1 + rank + world * start)
        if start >= epochs:
            if main_rank:
                print(f"densenet-fused train: {out} already holds {start} epochs (--epochs {epochs}); nothing to do")
            return 0

    if distributed:
        train_sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        val_set = Subset(data.val, range(rank, len(data.val), world))
    else:
        train_sampler, val_set = None, data.val
    loader_kw = dict(num_workers=args.workers, pin_memory=cuda, persistent_workers=args.workers > 0)
    train_loader = DataLoader(data.train, batch_size=plan.batch_size, shuffle=train_sampler is None,
                              sampler=train_sampler, drop_last=False, **loader_kw)
    val_loader = DataLoader(val_set, batch_size=plan.batch_size, shuffle=False, **loader_kw)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext

    if main_rank:
        os.makedirs(out, exist_ok=True)
        n_params = sum(p.numel() for p in raw.parameters())
        what = f"{args.model}" + (f" depth {plan.depth} k={plan.config['growth_rate']}" if plan.depth else "")
        print(f"densenet-fused train: {what}{' (baseline: torchvision blocks)' if args.baseline else ''}, "
              f"{n_params / 1e6:.2f} M parameters, {data.kind} {len(data.train)} train / {len(data.val)} val "
              f"images, {len(data.classes)} classes, {data.image_size}x{data.image_size}, batch {plan.batch_size}"
              f"{f' x {world} processes' if distributed else ''}, {device}"
              f"{' bf16 autocast, channels-last' if cuda else ' float32'}, epochs {start + 1}..{epochs}")
        for note in plan.notes:
            print("  " + note)

    def reduce(*values):
        t = torch.tensor(values, dtype=torch.float64, device=device if cuda else "cpu")
        if distributed:
            torch.distributed.all_reduce(t)
        return t.tolist()

    for epoch in range(start, epochs):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        model.train()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        t0 = time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not main_rank,
                   leave=True, file=sys.stderr)
        for step, (x, y) in enumerate(bar):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if cuda:
                x = x.to(memory_format=torch.channels_last)
            with autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = y.numel()
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(1) == y).sum()
            seen += n
            if main_rank and (step % 10 == 0 or step == len(train_loader) - 1):
                post = OrderedDict(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                   img_s=f"{seen * world / (time.perf_counter() - t0):.0f}")
                if cuda:
                    post["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f}MB"
                bar.set_postfix(post)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        bar.close()
        train_loss, train_correct, train_seen = reduce(loss_sum.item(), correct.item(), seen)
        peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None
        if distributed and cuda:
            t = torch.tensor([peak_mb], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            peak_mb = t.item()
        scheduler.step()

        # validation on the unwrapped model (no collective inside), rank 0's BN statistics
        if distributed:
            for b in raw.buffers():
                torch.distributed.broadcast(b, 0)
        raw.eval()
        v_loss = torch.zeros((), dtype=torch.float64, device=device)
        v_correct = torch.zeros((), dtype=torch.int64, device=device)
        v_seen = 0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cuda:
                    x = x.to(memory_format=torch.channels_last)
                with autocast():
                    logits = raw(x)
                v_loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
                v_correct += (logits.argmax(1) == y).sum()
                v_seen += y.numel()
        val_loss, val_correct, val_seen = reduce(v_loss.item(), v_correct.item(), v_seen)
        raw.train()

        if main_rank:
            row = {"epoch": epoch + 1, "train_loss": f"{train_loss / train_seen:.6f}",
                   "train_acc": f"{train_correct / train_seen:.6f}", "val_loss": f"{val_loss / val_seen:.6f}",
                   "val_acc": f"{val_correct / val_seen:.6f}", "images_per_s": f"{train_seen / elapsed:.1f}",
                   "peak_mem_mb": "" if peak_mb is None else f"{peak_mb:.1f}"}
            ck = {"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "epoch": epoch + 1, "rng": _rng_state(device), "config": plan.config,
                  "batch_size": plan.batch_size, "world_size": world}
            tmp = os.path.join(out, CHECKPOINT + ".tmp")
            torch.save(ck, tmp)
            os.replace(tmp, os.path.join(out, CHECKPOINT))
            rows.append(row)
            _write_metrics(metrics_path, rows)
            plot_metrics(rows, out)
            tqdm.write(f"epoch {epoch + 1}/{epochs}: train loss {row['train_loss']} acc {row['train_acc']} | "
                       f"val loss {row['val_loss']} acc {row['val_acc']} | {row['images_per_s']} images/s"
                       + (f" | peak {row['peak_mem_mb']} MB" if cuda else ""), file=sys.stderr)
    if main_rank:
        print(f"densenet-fused train: wrote {metrics_path}, {os.path.join(out, CHECKPOINT)}, "
              f"{os.path.join(out, 'loss.png')}, {os.path.join(out, 'accuracy.png')}")
    return 0


def run(args) -> int:
    """The ``train`` subcommand: 0 when trained, 2 (one line on stderr) on bad input."""
    world, rank, _ = _dist_env()
    try:
        plan = prepare(args)
    except TrainError as exc:
        if rank == 0:
            print(f"densenet-fused train: error: {exc}", file=sys.stderr)
        return 2
    try:
        return fit(plan)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
