"""Batch statistics over a process group, for fused modules whose norms are nn.SyncBatchNorm.

A fused block computes each channel's batch statistics once, when the channel is written
(docs/design.md section 2).  With ``nn.SyncBatchNorm`` norms (``convert_sync_batchnorm``) those
statistics are taken over the norms' process group instead of the local batch, as torch's
SyncBatchNorm does:

- forward: every rank's (count, mean, biased variance) of a channel set is gathered in one
  collective and merged exactly (Chan et al.'s pairwise formula, in float64);
- backward: the per-channel gradient sums that feed the BatchNorm input gradient (the block's
  P and Q, BN2's p and q; each already divided by the global count) are summed over the group.

Parameter gradients stay local: DistributedDataParallel averages them, as with SyncBatchNorm.
A world of one process, eval mode and plain BatchNorm2d norms run no collective.
"""
from typing import Iterable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn


class StatsGroup:
    """The process group a fused module synchronizes its batch statistics over."""

    def __init__(self, group, world_size: int) -> None:
        self.group = group
        self.world_size = world_size

    def merge_moments(self, count: int, mean: torch.Tensor, var: torch.Tensor,
                      want_count: bool = False) -> Tuple[Optional[int], torch.Tensor, torch.Tensor]:
        """(global count, global mean, global biased variance) from this rank's count, mean and biased
        variance of the same channels: one all_gather, merged exactly; results in mean's dtype.  The
        global count (a host int: one device sync on CUDA) only with ``want_count``, else None."""
        c = mean.numel()
        mine = torch.empty(1 + 2 * c, dtype=torch.float64, device=mean.device)
        mine[0] = float(count)
        mine[1:1 + c].copy_(mean)
        mine[1 + c:].copy_(var)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine, group=self.group)
        every = torch.stack(every)                      # (world, 1 + 2C)
        counts = every[:, :1]                           # (world, 1)
        total = counts.sum()
        means, variances = every[:, 1:1 + c], every[:, 1 + c:]
        g_mean = (counts * means).sum(0) / total
        g_var = (counts * (variances + (means - g_mean) ** 2)).sum(0) / total
        n = int(round(total.item())) if want_count else None
        return n, g_mean.to(mean.dtype), g_var.to(var.dtype)

    def total_count(self, count: int) -> int:
        """The sum of every rank's ``count`` (one all_reduce; a host sync on CUDA)."""
        t = torch.tensor([float(count)], dtype=torch.float64,
                         device="cuda" if dist.get_backend(self.group) == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return int(round(t.item()))

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` (contiguous) over the group, in place."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t


_WORLD = "default process group"  # marker (a str: deepcopy- and pickle-stable) for process_group=None


def stats_group(norms: Iterable[nn.Module], who: str, group=None) -> Optional[StatsGroup]:
    """The StatsGroup of training-mode norms that are nn.SyncBatchNorm over more than one process,
    or of ``group`` (a process group, or ``_WORLD``) set on the fused module itself
    (densenet_fused.convert_sync_batchnorm); None when there is nothing to synchronize (plain
    BatchNorm2d, world of one, no process group initialized).  Norms of one fused module must
    agree: all SyncBatchNorm on one group, or none."""
    norms = list(norms)
    sync = [isinstance(bn, nn.SyncBatchNorm) for bn in norms]
    if group is not None:
        if any(sync):
            raise ValueError(f"{who}: expected either nn.SyncBatchNorm norms or a synchronized fused module "
                             f"(densenet_fused.convert_sync_batchnorm), got both")
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = None if isinstance(group, str) and group == _WORLD else group
        world = dist.get_world_size(group)
        return StatsGroup(group, world) if world > 1 else None
    if not any(sync):
        return None
    if not all(sync):
        raise ValueError(f"{who}: expected all norms to be nn.SyncBatchNorm or none of them, got a mix "
                         f"({sum(sync)} of {len(sync)} are SyncBatchNorm); call "
                         f"torch.nn.SyncBatchNorm.convert_sync_batchnorm on the whole model")
    groups = {id(bn.process_group): bn.process_group for bn in norms}
    if len(groups) > 1:
        raise ValueError(f"{who}: expected the SyncBatchNorm norms to share one process group, got "
                         f"{len(groups)} different groups")
    if not (dist.is_available() and dist.is_initialized()):
        return None  # as nn.SyncBatchNorm: without a process group, local statistics
    group = next(iter(groups.values()))
    world = dist.get_world_size(group)
    return StatsGroup(group, world) if world > 1 else None
