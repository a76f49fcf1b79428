"""The fused stem of an ImageNet DenseNet: ``pool0(relu0(norm0(conv0(x))))`` as one autograd node
(docs/design.md section 9).

conv0 stays an ATen convolution (cuDNN on a GPU, oneDNN on the CPU); its output y is made
channels-last so that its per-channel batch statistics (``channel_stats``) and the fused
BatchNorm-ReLU-max pool (``bnrelu_maxpool``) read it as an (N*H*W, C) matrix.  Saved for backward:
y in the compute dtype, the pool's window index as int8 (a quarter of y's elements, one byte each),
four per-channel vectors and the input x (for conv0's weight gradient; the caller holds x anyway).
torchvision's stem saves y, the BatchNorm/ReLU output (the same size again) and the pool's int64
indices.  Backward: ``bnrelu_maxpool_bwd`` gives conv0's output gradient and norm0's parameter
gradients in two passes; ``aten.convolution_backward`` gives the weight gradient (and the input
gradient only when x requires it).

Running statistics of norm0 are updated as nn.BatchNorm2d does (momentum, momentum=None
cumulative average, unbiased running_var, num_batches_tracked), once per forward in training.

With an nn.SyncBatchNorm norm0 (or ``sync_group``, densenet_fused.convert_sync_batchnorm) the batch
statistics are taken over the process group (distributed.py): one all_gather of y's per-channel
(count, mean, variance) in forward, one all_reduce of the two per-channel gradient sums in backward.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..ops import (bn_grad_finish, bn_scale_shift, bnrelu_maxpool_bwd, bnrelu_maxpool_fwd, channel_stats,
                   running_stats_update)
from ..ops._common import acc_dtype
from ..ops.bnrelu_maxpool import pooled_size
from .distributed import StatsGroup


@dataclass
class StemSpec:
    """What the autograd node needs besides tensors."""
    norm: nn.Module          # norm0: eps, momentum and the running statistics
    stride: Tuple[int, int]  # conv0's geometry
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    training: bool           # batch statistics (True) or running statistics (False)
    dtype: torch.dtype       # compute dtype of conv0 and of everything saved
    sync: Optional[StatsGroup] = None  # batch statistics over this process group


def stem_forward(spec: StemSpec, x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, save: bool):
    """Run the stem (autocast off: ``spec.dtype`` is explicit).  Returns (output, saved, count) where
    saved = (y, index, mean, rstd, scale, shift) for backward (None when ``save`` is False) and count
    the values per channel of the batch statistics (global with ``spec.sync``)."""
    dtype, acc = spec.dtype, acc_dtype(spec.dtype)
    w = weight.to(dtype).contiguous(memory_format=torch.channels_last)  # a channels-last y from cuDNN / oneDNN
    y = torch.ops.aten.convolution(x.to(dtype), w, None, list(spec.stride), list(spec.padding),
                                   list(spec.dilation), False, [0, 0], 1)
    y = y.contiguous(memory_format=torch.channels_last)
    n, c, h, wd = y.shape
    m = n * h * wd
    y2 = y.permute(0, 2, 3, 1).view(m, c)
    bn = spec.norm
    count = m
    if spec.training:
        mean, var, _ = channel_stats(y2, bn.eps)
        if spec.sync is not None:
            count, mean, var = spec.sync.merge_moments(m, mean, var, want_count=True)
    else:
        mean, var = bn.running_mean.to(acc, copy=True), bn.running_var.to(acc)
    scale, shift, rstd = bn_scale_shift(gamma, beta, mean, var, bn.eps)
    out, index = bnrelu_maxpool_fwd(y2, scale, shift, [n, h, wd])
    if spec.training:
        running_stats_update([bn], [mean], [var], count=count)
    out = out.view(n, pooled_size(h), pooled_size(wd), c).permute(0, 3, 1, 2)
    return out, ((y, index, mean, rstd, scale, shift) if save else None), count


class FusedStemFunction(torch.autograd.Function):
    """conv0 -> norm0 -> ReLU -> 3x3/2 max pool as one autograd node."""

    @staticmethod
    def forward(ctx, spec: StemSpec, x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor):
        with torch.autocast(x.device.type, enabled=False):
            out, saved, ctx.count = stem_forward(spec, x, weight, gamma, beta, save=True)
        ctx.spec = spec
        ctx.x_dtype = x.dtype
        ctx.param_dtypes = (weight.dtype, gamma.dtype, beta.dtype)
        need_x, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        # x only when conv0 needs a gradient (the caller holds x anyway: saving it costs no memory)
        ctx.save_for_backward(x if (need_x or need_w) else None, weight, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        spec = ctx.spec
        x, weight, y, index, mean, rstd, scale, shift = ctx.saved_tensors
        need_x, need_w, need_g, need_b = ctx.needs_input_grad[1:5]
        n, c, h, wd = y.shape
        m = n * h * wd
        with torch.autocast(y.device.type, enabled=False):
            g = grad_out.to(spec.dtype).permute(0, 2, 3, 1).contiguous().view(-1, c)
            y2 = y.permute(0, 2, 3, 1).view(m, c)
            sync = spec.sync if spec.training else None
            dy, dgamma, dbeta = bnrelu_maxpool_bwd(g, index, y2, scale, shift, mean, rstd, [n, h, wd],
                                                   ctx.count if spec.training and sync is None else 0)
            if sync is not None:  # dy = scale*g so far: the mean terms from the sums over the group
                sums = sync.sum_(torch.stack((dgamma, dbeta)).to(mean.dtype))
                dy = bn_grad_finish(dy.to(mean.dtype), y2, mean, scale * sums[1] / ctx.count,
                                    scale * rstd * sums[0] / ctx.count, spec.dtype)
            dx = dw = None
            if need_x or need_w:
                dy = dy.view(n, h, wd, c).permute(0, 3, 1, 2)
                xc = x.to(spec.dtype)
                wc = weight.to(spec.dtype).contiguous(memory_format=torch.channels_last)
                dx, dw, _ = torch.ops.aten.convolution_backward(
                    dy, xc, wc, None, list(spec.stride), list(spec.padding), list(spec.dilation), False, [0, 0], 1,
                    [need_x, need_w, False])
        w_dtype, g_dtype, b_dtype = ctx.param_dtypes
        return (None, dx.to(ctx.x_dtype) if need_x else None, dw.to(w_dtype) if need_w else None,
                dgamma.to(g_dtype) if need_g else None, dbeta.to(b_dtype) if need_b else None)
