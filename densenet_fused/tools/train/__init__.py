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

The parts: ``config`` (errors, file names, torchrun environment), ``data`` (data sets),
``model`` (the model to train), ``budget`` (``--memory-budget`` searches), ``plan`` (every input
checked before the first write), ``loop`` (the training loop), ``checkpoint`` (what is written).
"""
import sys

import torch

from .checkpoint import plot_metrics, read_metrics
from .config import AUTO_DEPTHS, CHECKPOINT, METRICS, METRICS_COLUMNS, TrainError, dist_env
from .data import Data, load_data, write_digits_imagefolder
from .loop import fit
from .model import MODEL_NAMES, build_model
from .plan import Plan, prepare

__all__ = ["AUTO_DEPTHS", "CHECKPOINT", "METRICS", "METRICS_COLUMNS", "MODEL_NAMES", "Data", "Plan", "TrainError",
           "build_model", "fit", "load_data", "plot_metrics", "prepare", "read_metrics", "run",
           "write_digits_imagefolder"]


def run(args) -> int:
    """The ``train`` subcommand: 0 when trained, 2 (one line on stderr) on bad input."""
    world, rank, _ = dist_env()
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
