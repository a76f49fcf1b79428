"""bnrelu_global_avgpool: the fused DenseNet head (norm5, ReLU, global average pool; docs/design.md
section 9), ``pooled[n, c] = mean over image n's pixels of relu(x*scale + shift)`` straight from
the last block's NHWC buffer, and its elementwise backward with the whole BatchNorm input gradient.

- CPU kernel: ``csrc/cpu/bnrelu_global_avgpool.cpp``.
- CUDA kernel: the Triton kernels below (float32, float16, bfloat16): ``_fwd_kernel`` (one program
  per image and channel block), ``_bwd_kernel`` pass 1 (per-image partial sums of g and g*xhat, and
  dx in eval) and pass 2 (dx with the batch-statistics terms).  float64 on CUDA runs ``aten_fwd`` /
  ``aten_bwd``.
Under ``TRITON_INTERPRET=1`` the Triton launchers run on CPU tensors (the CI tests).
"""
from typing import Sequence

import torch
import triton
import triton.language as tl

from .launch import interpreted, launch
from ._bn_grad import aten_bn_grad, bn_grad_passes, bn_grad_tile, check_channel_vectors, check_rows, load_bn_vectors
from ._common import acc_dtype, cdiv, on_tensor_device

_lib = torch.library.Library("densenet_fused", "IMPL")


@torch.library.register_fake("densenet_fused::bnrelu_global_avgpool_fwd")
def _(x, scale, shift, nhw):
    return x.new_empty((nhw[0], x.shape[1]))


@torch.library.register_fake("densenet_fused::bnrelu_global_avgpool_bwd")
def _(dpooled, x, scale, shift, nhw, mean, rstd, batch_stats):
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape), x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


def bnrelu_global_avgpool_fwd(x, scale, shift, nhw: Sequence[int]) -> torch.Tensor:
    """(N, C) = mean over each image's H*W rows of relu(x*scale + shift), x (N*H*W, C) NHWC rows."""
    return torch.ops.densenet_fused.bnrelu_global_avgpool_fwd(x, scale, shift, list(nhw))


def bnrelu_global_avgpool_bwd(dpooled, x, scale, shift, nhw: Sequence[int], mean, rstd, batch_stats: bool):
    """(dx, dgamma, dbeta); see the op schema in csrc/ops.cpp."""
    return torch.ops.densenet_fused.bnrelu_global_avgpool_bwd(dpooled, x, scale, shift, list(nhw), mean, rstd,
                                                              batch_stats)


def _check(x, scale, shift, nhw, op):
    check_rows(x, op)
    if len(nhw) != 3 or nhw[0] < 0 or nhw[1] < 1 or nhw[2] < 1 or nhw[0] * nhw[1] * nhw[2] != x.shape[0]:
        raise RuntimeError(f"{op}: expected nhw = [N, H, W] with H, W >= 1 and N*H*W = {x.shape[0]} (the rows of x), "
                           f"got {nhw}")
    check_channel_vectors(op, x, (("scale", scale), ("shift", shift)), ", ")


def _check_bwd(dpooled, x, nhw, mean, rstd):
    op = "bnrelu_global_avgpool_bwd"
    c = x.shape[1]
    if dpooled.shape != (nhw[0], c) or dpooled.dtype != x.dtype or dpooled.device != x.device:
        raise RuntimeError(f"{op}: expected dpooled of shape ({nhw[0]}, {c}) (images, channels) and dtype {x.dtype} "
                           f"on {x.device}, got {tuple(dpooled.shape)} {dpooled.dtype} on {dpooled.device}")
    check_channel_vectors(op, x, (("mean", mean), ("rstd", rstd)), " and ")


# ----------------------------------------------------------------------------- ATen (float64 on CUDA)
def aten_fwd(x, scale, shift, nhw):
    _check(x, scale, shift, nhw, "bnrelu_global_avgpool_fwd")
    n, h, w = nhw
    a = torch.relu(torch.addcmul(shift, x.to(scale.dtype), scale))
    return a.view(n, h * w, -1).mean(1).to(x.dtype)


def aten_bwd(dpooled, x, scale, shift, nhw, mean, rstd, batch_stats):
    _check(x, scale, shift, nhw, "bnrelu_global_avgpool_bwd")
    _check_bwd(dpooled, x, nhw, mean, rstd)
    n, h, w = nhw
    m, c = x.shape
    d = (dpooled.to(scale.dtype) / (h * w))[:, None, :].expand(n, h * w, c).reshape(m, c)
    return aten_bn_grad(d, x, scale, shift, mean, rstd, batch_stats)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _fwd_kernel(X, ldx, SCALE, SHIFT, OUT, HW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    img = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    s = tl.load(SCALE + rc, mask=c_ok, other=0.0)
    h = tl.load(SHIFT + rc, mask=c_ok, other=0.0)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P)
        mask = (rp < HW)[:, None] & c_ok[None, :]
        rows = img.to(tl.int64) * HW + rp
        x = tl.load(X + rows[:, None] * ldx + rc[None, :], mask=mask, other=0.0).to(tl.float32)
        y = x * s[None, :] + h[None, :]
        acc += tl.sum(tl.where(mask, tl.where(y <= 0.0, 0.0, y), 0.0), axis=0)  # a NaN stays NaN
    tl.store(OUT + img * C + rc, (acc / HW).to(OUT.dtype.element_ty), mask=c_ok)


@triton.jit
def _bwd_kernel(DP, X, ldx, SCALE, SHIFT, MEAN, RSTD, P, Q, DX, PSG, PSGX, HW, C,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PASS: tl.constexpr, BATCH: tl.constexpr):
    img = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    s, h, mu, rs, pp, qq = load_bn_vectors(SCALE, SHIFT, MEAN, RSTD, P, Q, rc, c_ok)
    d = tl.load(DP + img * C + rc, mask=c_ok, other=0.0).to(tl.float32) / HW
    sg = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sgx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P)
        mask = (rp < HW)[:, None] & c_ok[None, :]
        rows = img.to(tl.int64) * HW + rp
        sg, sgx = bn_grad_tile(X, ldx, DX, C, rows, rc, mask, d[None, :], s, h, mu, rs, pp, qq, sg, sgx, PASS, BATCH)
    if PASS == 1:
        tl.store(PSG + img * C + rc, sg, mask=c_ok)
        tl.store(PSGX + img * C + rc, sgx, mask=c_ok)


def _blocks(x):
    return (16, 16) if interpreted(x) else (32, 128)


def triton_fwd(x, scale, shift, nhw):
    """Triton forward launcher (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(x, scale, shift, nhw, "bnrelu_global_avgpool_fwd")
    if x.dtype == torch.float64:
        raise RuntimeError("bnrelu_global_avgpool_fwd: the Triton kernel takes float32/float16/bfloat16; "
                           "float64 runs aten_fwd")
    n, h, w = nhw
    c = x.shape[1]
    out = x.new_empty((n, c))
    if n and c:
        bp, bc = _blocks(x)
        launch(_fwd_kernel, (n, cdiv(c, bc)), (x, x.stride(0), scale, shift, out, h * w, c), BLOCK_P=bp,
            BLOCK_C=bc)
    return out


def triton_bwd(dpooled, x, scale, shift, nhw, mean, rstd, batch_stats):
    """Triton backward launcher (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(x, scale, shift, nhw, "bnrelu_global_avgpool_bwd")
    _check_bwd(dpooled, x, nhw, mean, rstd)
    if x.dtype == torch.float64:
        raise RuntimeError("bnrelu_global_avgpool_bwd: the Triton kernel takes float32/float16/bfloat16; "
                           "float64 runs aten_bwd")
    n, h, w = nhw
    m, c = x.shape
    dx = x.new_empty((m, c))
    if n == 0 or c == 0:
        z = torch.zeros(c, dtype=torch.float32, device=x.device)
        return dx, z, z.clone()
    bp, bc = _blocks(x)
    dp = dpooled.contiguous()
    grid = (n, cdiv(c, bc))

    def grad_pass(p, q, psg, psgx, pass_, batch):  # the partial sums per image
        launch(_bwd_kernel, grid, (dp, x, x.stride(0), scale, shift, mean, rstd, p, q, dx, psg, psgx, h * w, c),
            BLOCK_P=bp, BLOCK_C=bc, PASS=pass_, BATCH=batch)

    dgamma, dbeta, _, _ = bn_grad_passes(grad_pass, n, x, scale, rstd, batch_stats)
    return dx, dgamma, dbeta


def cuda_fwd(x, scale, shift, nhw):
    if x.dtype == torch.float64:
        return aten_fwd(x, scale, shift, nhw)
    return triton_fwd(x, scale, shift, nhw)


def cuda_bwd(dpooled, x, scale, shift, nhw, mean, rstd, batch_stats):
    if x.dtype == torch.float64:
        return aten_bwd(dpooled, x, scale, shift, nhw, mean, rstd, batch_stats)
    return triton_bwd(dpooled, x, scale, shift, nhw, mean, rstd, batch_stats)


_lib.impl("bnrelu_global_avgpool_fwd", on_tensor_device(cuda_fwd), "CUDA")
_lib.impl("bnrelu_global_avgpool_bwd", on_tensor_device(cuda_bwd), "CUDA")


# The tensor arguments each Triton kernel of this file writes ("w") or reads and writes ("rw"); every other
# tensor argument is read (what `densenet-fused cost` counts as a launch's traffic).
TRITON_WRITES = {
    "_fwd_kernel": {"OUT": "w"},
    "_bwd_kernel": {"DX": "w", "PSG": "w", "PSGX": "w"},
}
