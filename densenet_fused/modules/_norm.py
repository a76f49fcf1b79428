"""The call of a norm that the transition and the head share, before their autograd node: the
norm's checks, the input in the compute dtype with the given batch statistics checked, and the
statistics it normalizes with (the running statistics updated, as nn.BatchNorm2d does)."""
from typing import Optional

import torch
from torch import Tensor, nn

from .._checks import check_batch, compute_dtype
from ..autograd.distributed import StatsGroup, stats_group
from ..ops import channel_stats, running_stats_update
from ..ops._common import acc_dtype


def check_norm(bn: nn.Module, channels: int, who: str) -> None:
    if not isinstance(bn, nn.BatchNorm2d) and not isinstance(bn, nn.SyncBatchNorm):
        raise TypeError(f"{who}: expected its norm to be an nn.BatchNorm2d, got {type(bn).__name__}")
    if not bn.affine or not bn.track_running_stats:
        raise ValueError(f"{who}: its norm must have affine=True and track_running_stats=True, got "
                         f"affine={bn.affine}, track_running_stats={bn.track_running_stats}")
    if bn.num_features != channels:
        raise ValueError(f"{who}: its norm has {bn.num_features} features, expected {channels}")


def check_stats(stats, channels: int, acc: torch.dtype, device, who: str):
    """Validated (mean, var) from the block, or None."""
    if stats is None or stats[0] is None:
        return None
    mean, var = stats
    for name, t in (("mean", mean), ("var", var)):
        if not isinstance(t, Tensor) or t.shape != (channels,) or t.dtype != acc or t.device != device:
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{who}: expected stats {name} to be a 1-D {acc} tensor of {channels} channels on "
                             f"{device}, got {got}")
    return mean.detach(), var.detach()


def checked_input(x: Tensor, norm: nn.Module, param: Tensor, stats, sync_group, who: str):
    """The checks of a fused BN-ReLU op's call on x that follow the shape and device ones, before any
    state changes: (x in the compute dtype with channels-last strides, the given batch statistics
    checked (training) or None, the process group of the batch statistics or None, dtype, acc).
    ``param``: the parameter whose dtype the input must have outside autocast."""
    dtype = compute_dtype(x, param, who)
    acc = acc_dtype(dtype)
    training = norm.training
    stats = check_stats(stats, norm.num_features, acc, x.device, who) if training else None
    n, _, h, w = x.shape
    sync = stats_group([norm], who, sync_group) if training else None
    check_batch(training, n * h * w, x.size())
    xin = x.to(dtype) if x.dtype != dtype else x
    # NHWC rows: a view of a block's output; other layouts get one (autograd-tracked) channels-last copy
    xin = xin.contiguous(memory_format=torch.channels_last)
    return xin, stats, sync, dtype, acc


def batch_or_running(bn: nn.Module, x2: Tensor, stats, training: bool, acc: torch.dtype,
                     sync: Optional[StatsGroup] = None):
    """(mean, var, count) the norm normalizes with: the block's batch statistics, or computed here, or
    the running statistics in eval; updates the running statistics in training (once, as
    nn.BatchNorm2d).  With ``sync`` the statistics are over the process group (a block's given
    statistics already are; count = values per channel over the group)."""
    count = x2.shape[0]
    if not training:
        return bn.running_mean.detach().to(acc), bn.running_var.detach().to(acc), count
    if stats is None:
        mean, var, _ = channel_stats(x2.detach(), bn.eps)
        if sync is not None:
            count, mean, var = sync.merge_moments(count, mean, var, want_count=True)
    else:
        mean, var = stats
        if sync is not None:
            count = sync.total_count(count)
    running_stats_update([bn], [mean], [var], count=count)
    return mean, var, count
