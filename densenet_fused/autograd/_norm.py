"""What the autograd nodes of the BN-ReLU ops that normalize with given statistics (the transition's
and the head's) share: their spec, the NHWC row view of a channels-last input, and the BatchNorm
input gradient over a process group."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops import bn_grad_finish
from .distributed import StatsGroup


@dataclass
class NormSpec:
    """What the node of a BN-ReLU op with given statistics (the transition's, the head's) needs besides
    tensors: the input's (N, H, W), the norm's eps and mode, the compute dtype, the process group."""
    nhw: Tuple[int, int, int]
    eps: float
    training: bool
    dtype: torch.dtype
    sync: Optional[StatsGroup] = None  # batch statistics over this process group
    count: int = 0                     # values per channel of the batch statistics (over the group)


def nhwc_rows(x: Tensor) -> Tensor:
    """x (N, C, H, W) with channels-last strides as its (N*H*W, C) NHWC row matrix (a view)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).view(n * h * w, c)


def synced_grad_finish(sync: StatsGroup, dx, x2, mean, rstd, scale, dgamma, dbeta, count: int, dtype):
    """The BatchNorm input gradient over a process group: ``dx`` = scale*g (the op run without the mean
    terms), ``dgamma``/``dbeta`` this rank's sums of g*xhat and g; the mean terms from the sums over the
    group (one all_reduce), as nn.SyncBatchNorm's backward.  Returns dx (M, C) in ``dtype``."""
    sums = sync.sum_(torch.stack((dgamma, dbeta)).to(mean.dtype))
    return bn_grad_finish(dx.to(mean.dtype), x2, mean, scale * sums[1] / count, scale * rstd * sums[0] / count,
                          dtype)
