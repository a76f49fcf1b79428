"""``fused_stem``: the fused stem of an ImageNet DenseNet called on torchvision's stem modules (conv0,
norm0, pool0): every check before any state changes, then the autograd node (autograd/stem.py, which
tells what it computes and saves), or its forward alone where no gradient is needed."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_batch, compute_dtype, has_hooks
from ..autograd.distributed import stats_group
from ..autograd.stem import FusedStemFunction, StemSpec, stem_forward
from ..ops.bnrelu_maxpool import POOL_KERNEL, POOL_PADDING, POOL_STRIDE


_WHO = "fused_stem"


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
