"""Every input of ``densenet-fused train`` checked, and data and model built, before anything is
written: :func:`prepare` returns a :class:`Plan` or raises :class:`TrainError`."""
import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .budget import search_batch, search_depth
from .checkpoint import CHANGEABLE, FORMAT, config_differences
from .config import AUTO_DEPTHS, CHECKPOINT, METRICS, TrainError, dist_env, epochs_change_error, first_line
from .data import Data, load_data
from .model import build_model, check_model_name


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


def _check_args(args) -> Tuple[torch.device, Optional[int]]:
    """The options alone (no file read): the device to train on and the --depth given (None: auto or
    the model's)."""
    world, _, local_rank = dist_env()
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
    if args.seed < 0:
        raise TrainError(f"--seed {args.seed}: expected 0 or more")
    if args.cuda_graphs:
        if world > 1:
            raise TrainError(f"--cuda-graphs runs in one process: under torchrun ({world} processes) the "
                             f"gradient all-reduce of DistributedDataParallel is not captured; drop --cuda-graphs")
        if device.type != "cuda":
            raise TrainError("--cuda-graphs needs --device cuda: a CUDA graph captures GPU work"
                             + ("" if torch.cuda.is_available() else "; CUDA is not available on this machine"))
    check_model_name(args.model)
    depth = _fixed_depth(args)
    if args.model != "densenet_bc" and (args.depth is not None or args.growth_rate is not None):
        raise TrainError(f"--depth/--growth-rate apply to --model densenet_bc only, not {args.model}")
    if args.memory_budget is not None:
        if device.type != "cuda":
            raise TrainError("--memory-budget needs --device cuda (it caps and measures CUDA memory)")
        if not args.memory_budget > 0:
            raise TrainError(f"--memory-budget {args.memory_budget}: expected a positive number of GB")
    if args.depth == "auto":
        if args.memory_budget is None:
            raise TrainError("--depth auto needs --memory-budget GB (and --device cuda)")
        if args.batch_size is None:
            raise TrainError("--depth auto needs --batch-size: it finds the deepest DenseNet-BC at that batch")
    if args.batch_size is None and args.memory_budget is None:
        raise TrainError("--batch-size is required (or --memory-budget GB to pick the largest batch that fits)")
    if args.batch_size is not None and args.batch_size < 1:
        raise TrainError(f"--batch-size {args.batch_size}: expected a positive integer")
    return device, depth


def _fixed_depth(args) -> Optional[int]:
    if args.depth is None or args.depth == "auto":
        return None
    try:
        return int(args.depth)
    except ValueError:
        raise TrainError(f"--depth {args.depth}: expected an integer (6n + 4) or auto") from None


def _open_out(args) -> Optional[dict]:
    """The checkpoint to resume (``--resume``), after checking that --out may hold this run."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainError(f"--out {out}: exists and is not a directory")
    _check_writable(out)
    ckpt_path = os.path.join(out, CHECKPOINT)
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise TrainError(f"--resume: no {ckpt_path} to resume from")
        try:
            return torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise TrainError(f"--resume: cannot load {ckpt_path} ({first_line(exc)})") from None
    if any(os.path.exists(os.path.join(out, f)) for f in (CHECKPOINT, METRICS)):
        raise TrainError(f"--out {out}: already holds a run ({CHECKPOINT}/{METRICS}); pass --resume to continue "
                         f"it or choose another --out")
    return None


def _check_writable(out: str) -> None:
    """--out, or the nearest folder above it that exists, takes a new file (made and removed)."""
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise TrainError(f"--out {out}: {probe} is not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".densenet-fused-probe-", dir=probe)
    except OSError as exc:
        raise TrainError(f"--out {out}: cannot write in {probe} ({first_line(exc)})") from None
    os.close(fd)
    os.remove(name)


def _auto_depth(args, device, data: Data, growth: int, notes: List[str]) -> int:
    if data.image_size != 32:
        raise TrainError(f"--depth auto searches 32x32 inputs; the data are {data.image_size}x{data.image_size}")
    return _found_within_budget(
        args, search_depth(device, args.memory_budget, growth, args.batch_size, args.baseline),
        f"no DenseNet-BC (k={growth}) of depth >= {AUTO_DEPTHS[0]} trains a step of batch {args.batch_size}",
        lambda depth: f"--depth auto: depth {depth} is the deepest of {AUTO_DEPTHS} that fits "
                      f"{args.memory_budget} GB at batch {args.batch_size}", notes)


def _budget_batch(args, device, data: Data, make_model, notes: List[str]) -> int:
    cap = args.batch_size if args.batch_size is not None else len(data.train)
    return _found_within_budget(
        args, search_batch(make_model, data.image_size, device, args.memory_budget, cap),
        f"no batch of 2 or more {args.model} training steps at {data.image_size}x{data.image_size} fits",
        lambda batch: f"--memory-budget: batch {batch} is the largest power of two up to {cap} that fits "
                      f"{args.memory_budget} GB", notes)


def _found_within_budget(args, found: int, nothing_fits: str, note: Callable[[int], str], notes: List[str]) -> int:
    """What a --memory-budget search found: 0 (nothing fits) is an error saying ``nothing_fits`` within
    the budget; anything else is returned, ``note(found)`` added to the notes."""
    if found == 0:
        raise TrainError(f"--memory-budget {args.memory_budget} GB: {nothing_fits} within it")
    notes.append(note(found))
    return found


def run_config(args, data: Data, depth, growth, batch: int, device: torch.device, world: int) -> dict:
    """What checkpoint.pt records of the run: what a --resume may not change (checkpoint.RECORDED),
    and --epochs and --lr, which it may (within limits)."""
    return {"model": args.model, "depth": depth, "growth_rate": growth, "baseline": bool(args.baseline),
            "weights": None if args.weights is None else os.path.abspath(args.weights),
            "data_kind": data.kind, "classes": list(data.classes), "num_classes": len(data.classes),
            "image_size": data.image_size, "train_images": len(data.train), "val_images": len(data.val),
            "samples": data.digest(), "flip": not args.no_flip, "batch_size": batch, "seed": args.seed,
            "device": device.type, "world_size": world, "sync_bn": bool(args.sync_bn),
            "cuda_graphs": bool(args.cuda_graphs), "epochs": args.epochs, "lr": args.lr}


def _check_resume(model: nn.Module, checkpoint: dict, config: dict, ckpt_path: str, notes: List[str]) -> None:
    """Refuse a resume that changes the recorded run; load the checkpoint's weights into ``model``."""
    if checkpoint.get("format") != FORMAT or not isinstance(checkpoint.get("config"), dict):
        raise TrainError(f"--resume: {ckpt_path} records no run configuration (an older densenet-fused train "
                         f"wrote it); start a new --out, with --weights {ckpt_path} to keep its weights")
    saved, done = checkpoint["config"], int(checkpoint["epoch"])
    diff = config_differences(saved, config)
    if diff:
        raise TrainError(f"--resume: this run differs from {ckpt_path} in " + "; ".join(diff)
                         + f"; on resume only {CHANGEABLE} may change")
    if config["epochs"] != saved["epochs"] and done < config["epochs"]:
        why = epochs_change_error(done, saved["epochs"], config["epochs"])
        if why:
            raise TrainError(f"--resume: {why}")
    if config["lr"] != saved["lr"]:
        notes.append(f"--lr {config['lr']:g} (the checkpoint's run: {saved['lr']:g}): the base learning rate "
                     f"from epoch {done + 1} on")
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except (RuntimeError, KeyError) as exc:
        raise TrainError(f"--resume: {ckpt_path} does not match the model ({first_line(exc)})") from None


def prepare(args) -> Plan:
    """Check every input and build data and model; writes nothing.  Raises TrainError."""
    world, _, _ = dist_env()
    device, depth = _check_args(args)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    random.seed(args.seed)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise TrainError("the loss and accuracy plots need matplotlib (pip install matplotlib)") from None
    checkpoint = _open_out(args)

    data = load_data(args.data, args.image_size, flip=not args.no_flip)
    if world > 1 and len(data.val) < world:
        raise TrainError(f"--data {args.data}: {len(data.val)} validation images for {world} processes")
    notes = []
    growth = args.growth_rate if args.growth_rate is not None else (12 if args.model == "densenet_bc" else None)
    if args.depth == "auto":
        depth = _auto_depth(args, device, data, growth, notes)
        if checkpoint is not None:
            depth = checkpoint.get("config", {}).get("depth", depth)
    if args.model == "densenet_bc" and depth is None:
        depth = 100

    def make_model():
        return build_model(args.model, len(data.classes), depth, growth, args.baseline, args.weights)

    model = make_model()
    batch = args.batch_size
    if args.memory_budget is not None and args.depth != "auto":
        batch = _budget_batch(args, device, data, make_model, notes)

    if args.cuda_graphs and batch > len(data.train) // world:
        raise TrainError(f"--cuda-graphs drops the last partial batch of each epoch: --batch-size {batch} is more "
                         f"than the {len(data.train) // world} training images of a process, no step would run")
    config = run_config(args, data, depth, growth, batch, device, world)
    if checkpoint is not None:
        _check_resume(model, checkpoint, config, os.path.join(args.out, CHECKPOINT), notes)
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

    from ...modules.sync_batchnorm import convert_sync_batchnorm
    converted = convert_sync_batchnorm(copy.deepcopy(model))
    return [name for name, m in converted.named_modules() if isinstance(m, nn.SyncBatchNorm)]
