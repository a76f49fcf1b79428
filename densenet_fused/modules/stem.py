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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .._checks import check_batch, compute_dtype, has_hooks
from ..autograd.distributed import StatsGroup, stats_group
from ..ops import (bn_grad_finish, bn_scale_shift, bnrelu_maxpool_bwd, bnrelu_maxpool_fwd, channel_stats,
                  running_stats_update)
from ..ops._common import acc_dtype
from ..ops.bnrelu_maxpool import POOL_KERNEL, POOL_PADDING, POOL_STRIDE, pooled_size

_WHO = "fused_stem"


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


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """conv0's dtype as torch.autocast would choose it (float64 tensors are never cast)."""
    return compute_dtype(x, weight, _WHO, never_cast=torch.float64 in (x.dtype, weight.dtype))


def _validate(x, conv0, norm0, pool0) -> Tuple[bool, torch.dtype]:
    """Check everything before any state changes; returns (training, compute dtype)."""
    for name, mod, kind in (("conv0", conv0, nn.Conv2d), ("norm0", norm0, (nn.BatchNorm2d, nn.SyncBatchNorm)),
                            ("pool0", pool0, nn.MaxPool2d)):
        if not isinstance(mod, kind):
            want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise TypeError(f"{_WHO}: expected {name} to be an nn.{want}, got {type(mod).__name__}")
        if has_hooks(mod):
            raise RuntimeError(f"{_WHO}: hooks on {name} are not supported: the fused stem never calls the conv0, "
                               f"norm0, relu0 and pool0 modules (it runs them as one op); run the stem unfused "
                               f"to use such hooks")
    if not isinstance(x, Tensor):
        raise TypeError(f"{_WHO}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{_WHO}: expected a 4-D input (N, C, H, W), got a {x.dim()}-D tensor of shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{_WHO}: expected a floating-point input, got {x.dtype}")
    if x.shape[1] != conv0.in_channels:
        raise ValueError(f"{_WHO}: expected input with {conv0.in_channels} channels (conv0.in_channels), got "
                         f"{x.shape[1]} (input shape {tuple(x.shape)})")
    if conv0.bias is not None or conv0.groups != 1 or conv0.padding_mode != "zeros" or isinstance(conv0.padding, str):
        raise ValueError(f"{_WHO}: expected conv0 with bias=False, groups=1, padding_mode='zeros' and numeric "
                         f"padding (torchvision's stem), got bias={conv0.bias is not None}, groups={conv0.groups}, "
                         f"padding_mode={conv0.padding_mode!r}, padding={conv0.padding!r}")
    if conv0.out_channels != norm0.num_features:
        raise ValueError(f"{_WHO}: expected norm0 with {conv0.out_channels} features (conv0.out_channels), has "
                         f"{norm0.num_features}")
    if not norm0.affine or not norm0.track_running_stats:
        raise ValueError(f"{_WHO}: expected norm0 with affine=True and track_running_stats=True, got "
                         f"affine={norm0.affine}, track_running_stats={norm0.track_running_stats}")
    geometry = (_pair(pool0.kernel_size), _pair(pool0.stride), _pair(pool0.padding), _pair(pool0.dilation),
                pool0.ceil_mode, pool0.return_indices)
    want = ((POOL_KERNEL,) * 2, (POOL_STRIDE,) * 2, (POOL_PADDING,) * 2, (1, 1), False, False)
    if geometry != want:
        raise ValueError(f"{_WHO}: expected pool0 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) (dilation 1, "
                         f"ceil_mode=False, return_indices=False), got kernel_size={pool0.kernel_size}, "
                         f"stride={pool0.stride}, padding={pool0.padding}, dilation={pool0.dilation}, "
                         f"ceil_mode={pool0.ceil_mode}, return_indices={pool0.return_indices}")
    for name, t in (("conv0.weight", conv0.weight), ("norm0.weight", norm0.weight), ("norm0.bias", norm0.bias),
                    ("norm0.running_mean", norm0.running_mean), ("norm0.running_var", norm0.running_var)):
        if t.device != x.device:
            raise ValueError(f"{_WHO}: expected the input on the device of the parameters and buffers, got the "
                             f"input on {x.device} and {name} on {t.device}")
    dtype = _compute_dtype(x, conv0.weight)
    n, _, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (conv0.kernel_size, _pair(conv0.stride), _pair(conv0.padding),
                                              _pair(conv0.dilation))
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"{_WHO}: input of shape {tuple(x.shape)} is too small for conv0 (kernel {conv0.kernel_size},"
                         f" stride {conv0.stride}, padding {conv0.padding}): output size {ho}x{wo}")
    training = norm0.training
    if training:
        check_batch(training, n * ho * wo, torch.Size([n, conv0.out_channels, ho, wo]))
    return training, dtype


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


def fused_stem(x: Tensor, conv0: nn.Conv2d, norm0: nn.BatchNorm2d, pool0: nn.MaxPool2d, sync_group=None) -> Tensor:
    """``pool0(relu(norm0(conv0(x))))`` for torchvision's DenseNet stem (conv0 without bias,
    pool0 = MaxPool2d(3, stride 2, padding 1)), in train mode (batch statistics; norm0's running
    statistics updated as nn.BatchNorm2d does) or eval mode (running statistics), under autocast
    (conv0 in the autocast dtype, statistics in float32) or in the parameters' dtype.  Output
    (N, C, Hp, Wp) with channels-last strides, in the compute dtype.  Batch statistics over a process
    group when norm0 is an nn.SyncBatchNorm or ``sync_group`` is set (see distributed.stats_group)."""
    training, dtype = _validate(x, conv0, norm0, pool0)
    sync = stats_group([norm0], _WHO, sync_group) if training else None
    if x.shape[0] == 0:  # an empty batch: torchvision's modules one by one (an empty output)
        return pool0(F.relu(norm0(conv0(x)))).contiguous(memory_format=torch.channels_last)
    spec = StemSpec(norm=norm0, stride=_pair(conv0.stride), padding=_pair(conv0.padding),
                    dilation=_pair(conv0.dilation), training=training, dtype=dtype, sync=sync)
    params = (conv0.weight, norm0.weight, norm0.bias)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return FusedStemFunction.apply(spec, x, *params)
    with torch.autocast(x.device.type, enabled=False):
        return stem_forward(spec, x, *params, save=False)[0]
