"""bn_scale_shift: a BatchNorm's folded affine map, ``rstd = 1/sqrt(var + eps)``,
``scale = gamma * rstd``, ``shift = beta - mean * scale`` (docs/design.md section 2, fact 1).

One launch per BatchNorm per layer instead of five small torch ops: on CUDA a Triton
kernel (launch overhead dominates a step of small layers); on the CPU the C++ kernel
``csrc/cpu/bn_scale_shift.cpp``.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .launch import launch
from .plan import alloc
from ._common import cdiv, on_tensor_device


@triton.jit
def _scale_shift_kernel(GAMMA, BETA, MEAN, VAR, SCALE, SHIFT, RSTD, C, eps, BLOCK: tl.constexpr):
    rc = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rc < C
    mean = tl.load(MEAN + rc, mask=ok, other=0.0)
    var = tl.load(VAR + rc, mask=ok, other=1.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))  # IEEE-rounded, like torch.rsqrt within an ulp
    scale = tl.load(GAMMA + rc, mask=ok, other=0.0).to(mean.dtype) * rstd
    tl.store(SCALE + rc, scale, mask=ok)
    tl.store(SHIFT + rc, tl.load(BETA + rc, mask=ok, other=0.0).to(mean.dtype) - mean * scale, mask=ok)
    tl.store(RSTD + rc, rstd, mask=ok)


def _check(gamma, beta, mean, var):
    c = mean.shape[0] if mean.dim() == 1 else -1
    if mean.dim() != 1 or mean.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"bn_scale_shift: expected mean to be a 1-D float32/float64 tensor, got "
                           f"{tuple(mean.shape)} {mean.dtype}")
    for name, t in (("gamma", gamma), ("beta", beta), ("var", var)):
        if t.shape != (c,) or not t.is_floating_point() or t.device != mean.device:
            raise RuntimeError(f"bn_scale_shift: expected {name} to be a 1-D tensor of {c} channels on "
                               f"{mean.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    if var.dtype != mean.dtype:
        raise RuntimeError(f"bn_scale_shift: expected var of dtype {mean.dtype}, got {var.dtype}")


def triton_scale_shift(gamma, beta, mean, var, eps):
    """Triton launcher (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(gamma, beta, mean, var)
    c = mean.shape[0]
    scale, shift, rstd = (alloc(mean.shape, mean.dtype, mean.device, keep=True) for _ in range(3))
    if c:
        block = 1024 if c > 256 else 256
        launch(_scale_shift_kernel, (cdiv(c, block),), (gamma, beta, mean.contiguous(), var.contiguous(),
            scale, shift, rstd, c, eps), BLOCK=block)
    return scale, shift, rstd


def aten_scale_shift(gamma, beta, mean, var, eps):
    """float64 on CUDA: ATen ops on per-channel vectors."""
    _check(gamma, beta, mean, var)
    rstd = torch.rsqrt(var + eps)
    scale = gamma.to(mean.dtype) * rstd
    return scale, beta.to(mean.dtype) - mean * scale, rstd


def cuda_scale_shift(gamma, beta, mean, var, eps):
    if mean.dtype == torch.float64:  # an accuracy dtype: ATen
        return aten_scale_shift(gamma, beta, mean, var, eps)
    return triton_scale_shift(gamma, beta, mean, var, eps)


@torch.library.register_fake("densenet_fused::bn_scale_shift")
def _(gamma, beta, mean, var, eps):
    return torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)


def bn_scale_shift(gamma, beta, mean, var, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, shift, rstd) in the dtype of mean (float32, or float64)."""
    return torch.ops.densenet_fused.bn_scale_shift(gamma, beta, mean, var, eps)


_lib = torch.library.Library("densenet_fused", "IMPL")
_lib.impl("bn_scale_shift", on_tensor_device(cuda_scale_shift), "CUDA")


# The tensor arguments each Triton kernel of this file writes ("w") or reads and writes ("rw"); every other
# tensor argument is read (what `densenet-fused cost` counts as a launch's traffic).
TRITON_WRITES = {
    "_scale_shift_kernel": {"SCALE": "w", "SHIFT": "w", "RSTD": "w"},
}
