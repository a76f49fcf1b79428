"""running_stats_update: nn.BatchNorm2d's running-statistics update for many layers at once.

Kernels: ``csrc/cpu/running_stats_update.cpp`` (CPU), ``csrc/cuda/running_stats_update.cu`` (CUDA).
"""
from typing import List, Optional, Sequence

import torch
from torch import nn


@torch.library.register_fake("densenet_fused::running_stats_update")
def _(running_mean, running_var, num_batches_tracked, mean, var, momentum, count):
    return None


def running_stats_update(bns: Sequence[nn.BatchNorm2d], means: List[torch.Tensor], variances: List[torch.Tensor],
                         count: int) -> None:
    """Update the running statistics of every BatchNorm in ``bns`` with its batch mean and
    biased variance (computed over ``count`` values per channel), exactly as a training-mode
    ``nn.BatchNorm2d`` forward would."""
    if not bns:
        return
    momentum = momentum_list([bn.momentum for bn in bns])
    buffers = [bn._buffers for bn in bns]  # (not nn.Module.__getattr__: host time in every step)
    torch.ops.densenet_fused.running_stats_update(
        [b["running_mean"] for b in buffers], [b["running_var"] for b in buffers],
        [b["num_batches_tracked"] for b in buffers], means, variances, momentum, count)


def momentum_list(momenta: Sequence[Optional[float]]) -> List[float]:
    """Encode BatchNorm momenta for the op: None (cumulative average) becomes -1."""
    return [-1.0 if m is None else float(m) for m in momenta]
