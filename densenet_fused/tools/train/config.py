"""What every part of ``densenet-fused train`` shares: the error it reports, file names, the
metrics' columns and the torchrun environment."""
import argparse
import os
from typing import Tuple

METRICS_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "peak_mem_mb")
CHECKPOINT, METRICS = "checkpoint.pt", "metrics.csv"
AUTO_DEPTHS = (40, 100, 190, 250, 400, 550, 700, 1000, 1204, 1600, 2200, 3004)  # 6n + 4


class TrainError(Exception):
    """Bad input to ``densenet-fused train``: one line, raised before anything is written."""


class TrainStopped(Exception):
    """The run stopped itself in ``epoch`` (1-based; a non-finite loss or gradient norm): one line,
    exit status 3, nothing of that epoch written."""

    def __init__(self, message: str, epoch: int):
        super().__init__(message)
        self.epoch = epoch


def lr_factor(epoch: int, epochs: int) -> float:
    """lr / base lr at ``epoch`` (0-based): divided by 10 at 50% and 75% of the epochs."""
    return 0.1 ** sum(epoch >= m for m in (int(0.5 * epochs), int(0.75 * epochs)) if m > 0)


def epochs_change_error(done: int, planned: int, epochs: int):
    """Why a resume after ``done`` epochs of a ``planned``-epoch schedule cannot go on with
    ``epochs`` (None when it can: every epoch trained ran at the factor the new schedule gives it)."""
    for e in range(done):
        if lr_factor(e, planned) != lr_factor(e, epochs):
            return (f"--epochs {epochs}: epoch {e + 1} ran at {lr_factor(e, planned):g} x --lr (the schedule of "
                    f"{planned} epochs), where {epochs} epochs would give {lr_factor(e, epochs):g} x --lr; keep "
                    f"--epochs {planned}, or start a new --out (with --weights OUT/{CHECKPOINT} to keep the weights)")
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def dist_env() -> Tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


# Exit statuses of ``densenet-fused train``.
EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE = 0, 2, 3

EPILOG = """\
exit status: 0 trained (or nothing left to do), 2 bad input (one line on stderr: a bad option, an
unreadable data set or image, an --out that cannot be written, a --resume that changes the run),
3 stopped on a non-finite training loss or gradient norm (one line naming the epoch and step;
OUT/checkpoint.pt keeps the last good epoch).

--resume continues OUT/checkpoint.pt, which records the run's configuration and data (model,
depth, growth rate, --baseline, --weights, class names, image size, number of images and their
list, --no-flip, batch size, --seed, device, processes, --sync-bn, --cuda-graphs).  A resume that
changes any of these is refused, naming what differs.  What may change on resume:
  --epochs   accepted when the epochs already trained ran at the learning rates the new
             schedule gives them (the resumed run then equals an uninterrupted run of the new
             --epochs); refused otherwise, e.g. after a division by 10 that the new --epochs
             would move (the schedule never restarts at a higher learning rate).
  --lr       the new base learning rate from the resumed epoch on, times the schedule's
             factor at that epoch (1, 0.1 after 50%, 0.01 after 75% of --epochs).
  --workers, --allow-nonfinite, --memory-budget (its batch must be the recorded one): no effect
             on the numbers.
With nothing changed but --workers, a resumed run gives the numbers of an uninterrupted one: the
shuffle order comes from (--seed, epoch) and each image's augmentation from (--seed, epoch, index),
whatever the number of loader workers.
"""


def add_arguments(p) -> None:
    """The options of ``densenet-fused train`` on the argparse parser ``p`` (each help says its default)."""
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # the epilog's layout kept
    p.add_argument("--data", required=True, help="CIFAR-10/100 root (as torchvision reads it; never downloads) or "
                   "ImageFolder root with train/ and val/ class folders (required)")
    p.add_argument("--model", required=True, help="densenet_bc, densenet121/161/169/201/264, torchvision:NAME or "
                   "timm:NAME (converted) (required)")
    p.add_argument("--epochs", type=int, required=True, help="epochs to train in all, counting those of a "
                   "resumed checkpoint (required; see --resume below for changing it)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step and process (default: none; "
                   "required unless --memory-budget picks it)")
    p.add_argument("--out", required=True, help="folder for metrics.csv, checkpoint.pt, loss.png and accuracy.png "
                   "(required; checked writable before anything trains)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda when available, else cpu")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate, divided by 10 at 50%% and 75%% "
                   "of --epochs (default: %(default)s; may change on --resume, see below)")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt up to --epochs; refused "
                   "when the run's configuration or data differ (default: off; see below)")
    p.add_argument("--weights", default=None, help="local state_dict (or checkpoint.pt) to start from "
                   "(default: none, fresh weights from --seed)")
    p.add_argument("--baseline", action="store_true",
                   help="train on torchvision's unfused dense blocks (default: off, fused blocks)")
    p.add_argument("--depth", default=None, help="densenet_bc depth (6n + 4) or auto: the deepest that fits "
                   "--memory-budget, CUDA (default: 100 for densenet_bc)")
    p.add_argument("--growth-rate", type=int, default=None, help="densenet_bc growth rate (default: 12)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                   help="CUDA: pick the largest batch (up to --batch-size) that fits GB (default: none)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes; the numbers do not depend on it (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="default: 32 for CIFAR; the images' "
                   "size up to 64, else 224, for an ImageFolder")
    p.add_argument("--no-flip", action="store_true",
                   help="no random horizontal flip, for digits or text (default: off, images are flipped)")
    p.add_argument("--seed", type=int, default=0, help="initial weights, shuffle order and augmentation "
                   "(default: %(default)s)")
    p.add_argument("--sync-bn", action="store_true", help="batch statistics over all processes under torchrun: "
                   "fused blocks synchronize their own, other norms become nn.SyncBatchNorm, which DDP accepts "
                   "on CUDA only (default: off)")
    p.add_argument("--allow-nonfinite", action="store_true", help="keep training when a step's loss or gradient "
                   "norm is NaN or Inf (default: off: stop with exit status 3, the last good checkpoint kept)")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA, one process: forward, loss and backward of "
                   "the training step captured as one CUDA graph after 3 warm-up steps (Triton autotuning) and "
                   "replayed; the optimizer steps eagerly; the last partial batch of each epoch is dropped "
                   "(static shapes) (default: off)")
