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
line and exits with status 2 (also for an image that cannot be read, found while training).  A
non-finite training loss or gradient norm stops the run (one line, exit status 3) with the last
good checkpoint kept, unless ``--allow-nonfinite``.  ``--resume`` refuses a run that changes the
recorded configuration or data; ``--cuda-graphs`` replays the training step as a CUDA graph.

The parts: ``config`` (options, errors, file names, the schedule, torchrun environment), ``data``
(data sets, per-sample seeded augmentation), ``model`` (the model to train), ``budget``
(``--memory-budget`` searches), ``plan`` (every input checked before the first write), ``loop``
(the training loop), ``guard`` (the non-finite stop), ``graphs`` (``--cuda-graphs``),
``checkpoint`` (what is written, what a resume may change).
"""
import sys

import torch

from .checkpoint import plot_metrics, read_metrics
from .config import (AUTO_DEPTHS, CHECKPOINT, EXIT_BAD_INPUT, EXIT_NONFINITE, METRICS, METRICS_COLUMNS, TrainError,
                     TrainStopped, add_arguments, dist_env)
from .data import Data, UnreadableImage, load_data, write_digits_imagefolder
from .loop import fit
from .model import MODEL_NAMES, build_model
from .plan import Plan, prepare

__all__ = ["AUTO_DEPTHS", "CHECKPOINT", "METRICS", "METRICS_COLUMNS", "MODEL_NAMES", "Data", "Plan", "TrainError",
           "TrainStopped", "add_arguments", "build_model", "fit", "load_data", "plot_metrics", "prepare",
           "read_metrics", "run", "write_digits_imagefolder"]


def run(args) -> int:
    """The ``train`` subcommand: 0 when trained; one line on stderr and 2 on bad input, 3 when a
    non-finite loss or gradient norm stopped it."""
    world, rank, _ = dist_env()
    try:
        plan = prepare(args)
    except TrainError as exc:
        if rank == 0:
            print(f"densenet-fused train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return fit(plan)
    except UnreadableImage as exc:  # any process that meets it
        print(f"densenet-fused train: error: {exc.one_line()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainStopped as exc:
        if rank == 0:
            print(f"densenet-fused train: stopped: {exc}; {_kept(plan, exc)}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _kept(plan: Plan, stop: TrainStopped) -> str:
    """What OUT holds after a stop in epoch ``stop.epoch``: every earlier epoch wrote the checkpoint."""
    import os

    path = os.path.join(plan.args.out, CHECKPOINT)
    if stop.epoch == 1 or not os.path.isfile(path):
        return "no checkpoint written (pass --allow-nonfinite to train on)"
    return f"{path} keeps epoch {stop.epoch - 1} (pass --allow-nonfinite to train on)"
