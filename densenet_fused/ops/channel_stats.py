"""channel_stats: per-channel batch mean, biased variance and rstd of an NHWC channel slice.

Kernels: ``csrc/cpu/channel_stats.cpp`` (CPU), ``csrc/cuda/channel_stats.cu`` (CUDA).
"""
from typing import Tuple

import torch

from ._common import acc_dtype


@torch.library.register_fake("densenet_fused::channel_stats")
def _(x: torch.Tensor, eps: float):
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    return x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


def channel_stats(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased var, 1/sqrt(var + eps)) of every column of the (rows, channels) matrix x."""
    return torch.ops.densenet_fused.channel_stats(x, eps)
