"""bnrelu_conv3x3: the second half of a dense layer (docs/design.md section 3, forward step 2 and
backward step 3): ``out = conv3x3(relu(b*scale + shift), W2)`` (pad 1, the zero padding
applied to the activated values), written into a channel slice of the feature buffer, with
the new channels' statistics; and its backward through BN2-ReLU.

Two implementations of the same op on CUDA:
- ``aten``: cuDNN on a transient ``relu(bn2(b))`` (M x bn_size*k), then a copy into the
  slice.  The CPU kernel is the same code on oneDNN.
- ``triton``: implicit-GEMM Triton kernels with the BN-ReLU prologue (the activated input
  never exists), the statistics epilogue, a dgrad kernel with the BN2-ReLU backward and
  its two per-channel sums in its epilogue, and a split-M wgrad kernel reduced in a fixed
  order.
A block's ``conv3x3_impl`` attribute, or ``using_conv3x3("triton" | "aten")`` around its forward (the
default: ``DENSENET_FUSED_CONV3X3``, else "triton"), picks the CUDA one for
16-bit dtypes and float32 with TF32 (float64 and float32 without TF32 always run cuDNN).  The
default is ``triton``: faster than ``aten`` on an H100 for DenseNet-121's blocks, in less memory
and fewer launches per layer (benchmarks/results/h100_conv3x3_impl.md).
Under ``TRITON_INTERPRET=1`` the Triton launchers run on CPU tensors.
"""
import contextlib
import contextvars
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import cuda_path, interpreted, launch
from .plan import alloc
from .options import Dropout, FoldBN, GradFinish, StatsOut, lowered
from ._common import acc_dtype, cdiv, next_pow2, on_tensor_device
from ._triton_common import bnrelu_tile, cuda_gemm_impl, dot_precision, merge_stats, store_tile_stats
from .bn_grad_finish import bn_grad_finish
from .bn_scale_shift import bn_scale_shift
from .channel_stats import channel_stats
from .tiles import CONV3X3_DGRAD, CONV3X3_FWD, CONV3X3_WGRAD, choose

_IMPLS = ("aten", "triton")
_env_impl = os.environ.get("DENSENET_FUSED_CONV3X3", "triton")
if _env_impl not in _IMPLS:  # refused at import: a typo must not silently mean another implementation
    raise ImportError(f"DENSENET_FUSED_CONV3X3={_env_impl!r}: expected one of {', '.join(_IMPLS)}")
_default_impl: contextvars.ContextVar = contextvars.ContextVar("densenet_fused_conv3x3", default=_env_impl)


@contextlib.contextmanager
def using_conv3x3(name: str):
    """Within, blocks whose ``conv3x3_impl`` is "" run the CUDA implementation ``name`` of bnrelu_conv3x3:
    "aten" (cuDNN) or "triton" (a block settles it in its forward, for its backward too); restored on exit."""
    if name not in _IMPLS:
        raise ValueError(f"using_conv3x3: expected one of {_IMPLS}, got {name!r}")
    token = _default_impl.set(name)
    try:
        yield
    finally:
        _default_impl.reset(token)


def conv3x3_impl() -> str:
    """The CUDA implementation of bnrelu_conv3x3 an unspecified ``impl`` ("") means here."""
    return _default_impl.get()


def _check(b, scale, shift, weight, nhw, op):
    if len(nhw) != 3 or nhw[0] * nhw[1] * nhw[2] != b.shape[0]:
        raise RuntimeError(f"{op}: expected nhw = [N, H, W] with N*H*W = {b.shape[0]} rows, got {list(nhw)}")
    if b.dim() != 2 or not b.is_contiguous():
        raise RuntimeError(f"{op}: expected b to be a contiguous (N*H*W, channels) matrix, got shape "
                           f"{tuple(b.shape)} strides {b.stride()}")
    cb = b.shape[1]
    acc = acc_dtype(b.dtype)
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape != (cb,) or t.dtype != acc:
            raise RuntimeError(f"{op}: expected {name} to be a 1-D tensor of {cb} channels and dtype {acc}, "
                               f"got {tuple(t.shape)} {t.dtype}")
    if weight.dim() != 4 or weight.shape[1:] != (cb, 3, 3) or weight.dtype != b.dtype:
        raise RuntimeError(f"{op}: expected weight of shape (k, {cb}, 3, 3) and dtype {b.dtype}, got "
                           f"{tuple(weight.shape)} {weight.dtype}")


def weight_layout(weight) -> torch.memory_format:
    """The layout the kernels read ``weight`` in and write its gradient in: contiguous, or channels-last
    (a channels-last model's 3x3 weights: no copy of the weight, no relayout of its gradient)."""
    if weight.is_contiguous():
        return torch.contiguous_format
    if weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    raise RuntimeError(f"bnrelu_conv3x3: expected a contiguous or channels-last weight, got strides {weight.stride()}")


# ----------------------------------------------------------------------------- ATen kernels
def _activated(b, scale, shift):
    return torch.relu(torch.addcmul(shift, b.to(scale.dtype), scale)).to(b.dtype)


def _nchw(t, nhw):
    n, h, w = nhw
    return t.view(n, h, w, -1).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- dropout masks
# Element (row r, channel j) of the k new channels (M x k) is kept when the top 24 bits of
# Philox-4x32-10(key = seed, counter = (r*k + j, 0, 0, 0)) -- Triton's tl.randint(seed, r*k + j) --
# are >= round(p * 2^24), and then scaled by 1/(1-p).  The seed is a one-element int64 tensor on the
# device (drawn there, no host synchronization); the forward and the backward regenerate the same
# mask from it, bit for bit, in the Triton kernels (in their epilogue / as dy is loaded), in
# ``_dropout_mask_kernel`` (ATen path on CUDA) and in ``philox_randint`` (plain torch, CPU).
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_M32 = 0xFFFFFFFF


def _mulhilo(a: int, b):
    """(high, low) 32 bits of a * b for a 32-bit constant a and int64 tensor b of 32-bit values."""
    t = a * (b & 0xFFFF)                  # < 2^48
    u = a * (b >> 16) + (t >> 16)         # a*b = u*2^16 + (t & 0xFFFF)
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """tl.randint(seed, offsets) (Philox-4x32, 10 rounds) in plain torch: int64 tensor of 32-bit values."""
    c0 = offsets.to(torch.int64) & _M32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0


def _drop_threshold(p: float) -> int:
    return min(1 << 24, max(0, round(p * (1 << 24))))


def _drop_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


@triton.jit
def _keep(SEED, rows64, cols, K, DROP_T):
    """Whether dropout keeps the elements (rows, cols) of the (M x K) new channels."""
    r = tl.randint(tl.load(SEED), (rows64[:, None] * K + cols[None, :]).to(tl.int32))
    return (r >> 8).to(tl.int32) >= DROP_T


@triton.jit
def _dropout_mask_kernel(SEED, OUT, NUMEL, DROP_T, drop_scale, BLOCK: tl.constexpr):
    """OUT (M x K, contiguous) = the dropout mask: element e = r*K + j is _keep's (r, j)."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = (tl.randint(tl.load(SEED), e) >> 8).to(tl.int32) >= DROP_T
    tl.store(OUT + e, tl.where(keep, drop_scale, 0.0).to(OUT.dtype.element_ty), mask=e < NUMEL)


def triton_dropout_mask(seed: torch.Tensor, p: float, m: int, k: int, dtype) -> torch.Tensor:
    """``dropout_mask`` by the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    out = torch.empty((m, k), dtype=dtype, device=seed.device)
    if m * k > 0:
        launch(_dropout_mask_kernel, (cdiv(m * k, 1024),), (seed, out, m * k, _drop_threshold(p),
            _drop_scale(p)), BLOCK=1024)
    return out


def dropout_mask(seed: torch.Tensor, p: float, m: int, k: int, dtype) -> torch.Tensor:
    """The (m, k) dropout mask of ``seed`` (0 or 1/(1-p), in ``dtype``): a Triton kernel on CUDA (one
    launch, no host synchronization), plain torch on the CPU."""
    if cuda_path(seed.device):
        return triton_dropout_mask(seed, p, m, k, dtype)
    r = philox_randint(int(seed.item()), torch.arange(m * k, device=seed.device).view(m, k))
    return ((r >> 8) >= _drop_threshold(p)).to(dtype) * _drop_scale(p)


def _check_drop(drop_p, drop_seed, m, k, device, op):
    if not 0.0 <= drop_p <= 1.0:
        raise RuntimeError(f"{op}: expected 0 <= drop_p <= 1, got {drop_p}")
    if drop_p == 0.0:
        return False
    if drop_seed is None or drop_seed.shape != (1,) or drop_seed.dtype != torch.int64 or drop_seed.device != device:
        got = None if drop_seed is None else (tuple(drop_seed.shape), drop_seed.dtype, str(drop_seed.device))
        raise RuntimeError(f"{op}: expected drop_seed, a 1-element int64 tensor on {device}, with drop_p > 0; "
                           f"got {got}")
    if m * k >= 2 ** 31:
        raise RuntimeError(f"{op}: dropout counts elements in 31 bits: expected N*H*W*k < 2^31, got {m * k}")
    return True


def _fwd_aten(b, scale, shift, weight, nhw, out, stats, mean_out=None, var_out=None, bn_out=None, bn_gamma=None,
              bn_beta=None, bn_eps=0.0, drop_p=0.0, drop_seed=None):
    _check(b, scale, shift, weight, nhw, "bnrelu_conv3x3_fwd")
    y = F.conv2d(_nchw(_activated(b, scale, shift), nhw), weight, padding=1)
    y = y.permute(0, 2, 3, 1).reshape(b.shape[0], -1)
    if _check_drop(drop_p, drop_seed, b.shape[0], weight.shape[0], b.device, "bnrelu_conv3x3_fwd"):
        y = y * dropout_mask(drop_seed, drop_p, b.shape[0], weight.shape[0], y.dtype)
    out.copy_(y)
    empty = out.new_empty(0, dtype=acc_dtype(out.dtype))
    if not stats:
        return empty, torch.empty_like(empty)  # two distinct outputs, no kernel
    mean, var, _ = channel_stats(out, 0.0)
    if mean_out is None:
        return mean, var
    k = out.shape[1]
    mean_out[mean_out.shape[0] - k:].copy_(mean)
    var_out[var_out.shape[0] - k:].copy_(var)
    if bn_out is not None:
        bn_out.copy_(torch.stack(bn_scale_shift(bn_gamma, bn_beta, mean_out, var_out, bn_eps)))
    return empty, torch.empty_like(empty)


def _pq(scale, rstd, dgamma, dbeta, count):
    """BN2's input-gradient scalars p = scale*dbeta/count, q = scale*rstd*dgamma/count (0 for count 0)."""
    if count <= 0:
        return torch.zeros_like(dbeta), torch.zeros_like(dgamma)
    return scale * dbeta / count, scale * rstd * dgamma / count


def _bwd_aten(dy, b, scale, shift, weight, nhw, mean, rstd, count=0, dy_x=None, dy_mean=None, dy_p=None,
              dy_q=None, drop_p=0.0, drop_seed=None):
    _check(b, scale, shift, weight, nhw, "bnrelu_conv3x3_bwd")
    if dy_x is not None:
        dy = bn_grad_finish(dy, dy_x, dy_mean, dy_p, dy_q, b.dtype)
    if _check_drop(drop_p, drop_seed, b.shape[0], weight.shape[0], b.device, "bnrelu_conv3x3_bwd"):
        dy = dy * dropout_mask(drop_seed, drop_p, b.shape[0], weight.shape[0], dy.dtype)
    acc = scale.dtype
    y2 = torch.addcmul(shift, b.to(acc), scale)
    on = ~(y2 <= 0)  # torch's relu backward: a NaN passes
    a2 = torch.where(on, y2, 0).to(b.dtype)
    da2, dw, _ = torch.ops.aten.convolution_backward(
        _nchw(dy.contiguous(), nhw), _nchw(a2, nhw), weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [True, True, False])
    g2 = torch.where(on, da2.permute(0, 2, 3, 1).reshape(b.shape[0], -1).to(acc), 0)
    dbeta = g2.sum(0)
    dgamma = (g2 * ((b.to(acc) - mean) * rstd)).sum(0)
    return (g2, dw.to(acc).contiguous(memory_format=weight_layout(weight)), dgamma, dbeta) + \
        _pq(scale, rstd, dgamma, dbeta, count)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _neighbour(rm, row_ok, H, Wd, dh, dw):
    """For the pixel rows rm of (N, H, W) images: whether pixel (h + dh, w + dw) is inside the
    image, and its row index (int64)."""
    hh = (rm // Wd) % H
    ww = rm % Wd
    ok = row_ok & (hh + dh >= 0) & (hh + dh < H) & (ww + dw >= 0) & (ww + dw < Wd)
    return ok, (rm + dh * Wd + dw).to(tl.int64)


@triton.jit
def _w_offset(co, ci, tap, CB, W_CL: tl.constexpr):
    """Offset of W[co, ci, tap] in a (k, Cb, 3, 3) weight: contiguous, or channels-last (W_CL: the
    layout of a channels-last model's parameters and gradients, read without a copy)."""
    if W_CL:
        return (co * 9 + tap) * CB + ci
    else:
        return co * (CB * 9) + ci * 9 + tap


@triton.jit
def _fwd_kernel(B, SCALE, SHIFT, W, OUT, ldo, PMEAN, PM2, M, H, Wd, CB, K, SEED, DROP_T, drop_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                STATS: tl.constexpr, PRECISION: tl.constexpr, DROP: tl.constexpr, W_CL: tl.constexpr):
    """out[m, n] = sum_{tap, ci} relu(bn2(B))[m + tap, ci] * W[n, ci, tap], zero outside the image
    (W in its own (k, Cb, 3, 3) layout: no permuted copy per call); with DROP, dropout's mask and
    scale applied before the store and the statistics."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < M
    n_ok = rn < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in tl.static_range(9):
        ok, src = _neighbour(rm, row_ok, H, Wd, tap // 3 - 1, tap % 3 - 1)
        for k0 in range(0, CB, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < CB
            a = bnrelu_tile(B, src, CB, rk, ok[:, None] & k_ok[None, :], SCALE, SHIFT, k_ok).to(B.dtype.element_ty)
            w = tl.load(W + _w_offset(rn[None, :], rk[:, None], tap, CB, W_CL), mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    rm64 = rm.to(tl.int64)
    if DROP:
        acc = tl.where(_keep(SEED, rm64, rn, K, DROP_T), acc * drop_scale, 0.0)
    out = acc.to(OUT.dtype.element_ty)
    tl.store(OUT + rm64[:, None] * ldo + rn[None, :], out, mask=row_ok[:, None] & n_ok[None, :])
    if STATS:
        store_tile_stats(out, row_ok, n_ok, rn, pid_m, M, K, PMEAN, PM2, BLOCK_M)


@triton.jit
def _dy_tile(DY, lddy, X, ldx, XMEAN, XP, XQ, rows64, cols, mask, cols_ok, SEED, K, DROP_T, drop_scale,
             FINISH: tl.constexpr, OUT_TY: tl.constexpr, DROP: tl.constexpr):
    """A (rows, cols) tile of dy in b's dtype: loaded, or with FINISH the block's BatchNorm input
    gradient of the new channels finished on the fly, dy = G - P - (x - mean) * Q (DY = G, fp32);
    with DROP, through the forward's dropout mask (regenerated from its seed) and scale."""
    g = tl.load(DY + rows64[:, None] * lddy + cols[None, :], mask=mask, other=0.0)
    if FINISH:
        x = tl.load(X + rows64[:, None] * ldx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(XMEAN + cols, mask=cols_ok, other=0.0)
        p = tl.load(XP + cols, mask=cols_ok, other=0.0)
        q = tl.load(XQ + cols, mask=cols_ok, other=0.0)
        g = tl.where(mask, g - p[None, :] - tl.where(q[None, :] == 0.0, 0.0, (x - mu[None, :]) * q[None, :]), 0.0)
    if DROP:
        g = tl.where(mask & _keep(SEED, rows64, cols, K, DROP_T), g.to(OUT_TY).to(tl.float32) * drop_scale, 0.0)
    return g.to(OUT_TY)


@triton.jit
def _dgrad_kernel(DY, lddy, X, ldx, XMEAN, XP, XQ, B, SCALE, SHIFT, MEAN, RSTD, W, G2, PSG, PSGX, M, H, Wd, CB, K,
                  SEED, DROP_T, drop_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                  FINISH: tl.constexpr, DROP: tl.constexpr, W_CL: tl.constexpr):
    """g2[m, ci] = !(y2 <= 0) * sum_{tap, co} dy[m - tap, co] * W[co, ci, tap]; per-tile sums of g2, g2*xhat2."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels ci
    row_ok = rm < M
    n_ok = rn < CB
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in tl.static_range(9):
        # the output pixel whose tap `tap` reads pixel m
        ok, src = _neighbour(rm, row_ok, H, Wd, 1 - tap // 3, 1 - tap % 3)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            d = _dy_tile(DY, lddy, X, ldx, XMEAN, XP, XQ, src, rk, ok[:, None] & k_ok[None, :], k_ok, SEED, K, DROP_T,
                         drop_scale, FINISH, B.dtype.element_ty, DROP)
            w = tl.load(W + _w_offset(rk[:, None], rn[None, :], tap, CB, W_CL), mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)
            acc = tl.dot(d, w, acc, input_precision=PRECISION)
    rm64 = rm.to(tl.int64)
    m2 = row_ok[:, None] & n_ok[None, :]
    bv = tl.load(B + rm64[:, None] * CB + rn[None, :], mask=m2, other=0.0).to(tl.float32)
    s = tl.load(SCALE + rn, mask=n_ok, other=0.0)
    h = tl.load(SHIFT + rn, mask=n_ok, other=0.0)
    mu = tl.load(MEAN + rn, mask=n_ok, other=0.0)
    rs = tl.load(RSTD + rn, mask=n_ok, other=0.0)
    g = tl.where(m2 & ~(bv * s[None, :] + h[None, :] <= 0.0), acc, 0.0)  # a NaN passes, as in torch
    tl.store(G2 + rm64[:, None] * CB + rn[None, :], g, mask=m2)
    tl.store(PSG + pid_m * CB + rn, tl.sum(g, axis=0), mask=n_ok)
    tl.store(PSGX + pid_m * CB + rn, tl.sum(g * ((bv - mu[None, :]) * rs[None, :]), axis=0), mask=n_ok)


@triton.jit
def _wgrad_kernel(DY, lddy, X, ldx, XMEAN, XP, XQ, B, SCALE, SHIFT, PDW, M, H, Wd, CB, K, TILES_PER_SPLIT,
                  SEED, DROP_T, drop_scale,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, KPAD: tl.constexpr, PRECISION: tl.constexpr,
                  FINISH: tl.constexpr, DROP: tl.constexpr):
    """Partial dW[split, tap, co, ci] = sum over the split's rows of dy[m, co] * relu(bn2(B))[m + tap, ci]."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tap = pid % 9
    pid_c = pid // 9
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rk = tl.arange(0, KPAD)
    c_ok = rc < CB
    k_ok = rk < K
    acc = tl.zeros((KPAD, BLOCK_C), dtype=tl.float32)
    for i in range(0, TILES_PER_SPLIT):
        rm = (split * TILES_PER_SPLIT + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rm < M
        ok, src = _neighbour(rm, row_ok, H, Wd, tap // 3 - 1, tap % 3 - 1)
        d = _dy_tile(DY, lddy, X, ldx, XMEAN, XP, XQ, rm.to(tl.int64), rk, row_ok[:, None] & k_ok[None, :], k_ok,
                     SEED, K, DROP_T, drop_scale, FINISH, B.dtype.element_ty, DROP)
        a = bnrelu_tile(B, src, CB, rc, ok[:, None] & c_ok[None, :], SCALE, SHIFT, c_ok).to(B.dtype.element_ty)
        acc = tl.dot(tl.trans(d), a, acc, input_precision=PRECISION)
    tl.store(PDW + ((split * 9 + tap) * K + rk[:, None]) * CB + rc[None, :], acc, mask=k_ok[:, None] & c_ok[None, :])


@triton.jit
def _bwd_finish_kernel(PDW, SPLITS, DW, PSG, PSGX, TILES, SCALE, RSTD, DGAMMA, DBETA, P, Q, inv_count, CB, K,
                       W_PROGRAMS, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                       W_CL: tl.constexpr):
    """One launch finishes the backward, every sum in a fixed order: programs [0, W_PROGRAMS) reduce
    the wgrad partials over the splits into dweight in the weight's layout (contiguous or channels-last);
    the others reduce the dgrad tiles' sums of g2 and g2*xhat2 (BLOCK_T tiles at a time, then a fixed tree) into dbeta,
    dgamma and BN2's input-gradient scalars p = scale*dbeta/count, q = scale*rstd*dgamma/count."""
    pid = tl.program_id(0)
    if pid < W_PROGRAMS:
        e = pid * BLOCK_W + tl.arange(0, BLOCK_W)  # e = (tap * K + co) * CB + ci
        ok = e < 9 * K * CB
        acc = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for s in range(0, SPLITS):
            acc += tl.load(PDW + s * (9 * K * CB) + e, mask=ok, other=0.0)
        tap = e // (K * CB)
        co = (e // CB) % K
        ci = e % CB
        tl.store(DW + _w_offset(co, ci, tap, CB, W_CL), acc, mask=ok)
    else:
        rc = (pid - W_PROGRAMS) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = rc < CB
        rt = tl.arange(0, BLOCK_T)
        sg = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        sgx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for t0 in range(0, TILES, BLOCK_T):
            msk = ((t0 + rt) < TILES)[:, None] & c_ok[None, :]
            off = (t0 + rt)[:, None] * CB + rc[None, :]
            sg += tl.load(PSG + off, mask=msk, other=0.0)
            sgx += tl.load(PSGX + off, mask=msk, other=0.0)
        dbeta = tl.sum(sg, axis=0)
        dgamma = tl.sum(sgx, axis=0)
        tl.store(DBETA + rc, dbeta, mask=c_ok)
        tl.store(DGAMMA + rc, dgamma, mask=c_ok)
        scale = tl.load(SCALE + rc, mask=c_ok, other=0.0)
        rstd = tl.load(RSTD + rc, mask=c_ok, other=0.0)
        # running statistics (inv_count 0): p = q = 0 even for a NaN or Inf sum (torch's has no mean terms)
        tl.store(P + rc, tl.where(inv_count == 0.0, 0.0, scale * dbeta * inv_count), mask=c_ok)
        tl.store(Q + rc, tl.where(inv_count == 0.0, 0.0, scale * rstd * dgamma * inv_count), mask=c_ok)


def _triton_shapes(b, scale, shift, weight, nhw, op):
    """Checks shared by the Triton launchers; returns (H, W, M, Cb, k)."""
    _check(b, scale, shift, weight, nhw, op)
    if b.dtype == torch.float64:
        raise RuntimeError(f"{op}: the Triton kernel takes float32/float16/bfloat16")
    weight_layout(weight)
    return nhw[1], nhw[2], b.shape[0], b.shape[1], weight.shape[0]


def _drop_args(drop, drop_p, drop_seed, like):
    """(SEED, DROP_T, drop_scale) kernel arguments; without dropout, placeholders (``like``: a tensor the
    kernel already takes, so that `densenet-fused cost` counts no extra bytes)."""
    if not drop:
        return like, 0, 1.0
    return drop_seed, _drop_threshold(drop_p), _drop_scale(drop_p)


def _fwd_triton(b, scale, shift, weight, nhw, out, stats, mean_out=None, var_out=None, bn_out=None, bn_gamma=None,
                bn_beta=None, bn_eps=0.0, drop_p=0.0, drop_seed=None, *, checked=True):
    """The Triton forward; ``checked`` False (the block's hot path): no argument checks, and (None, None)
    returned where the op returns empty statistics."""
    if checked:
        h, w, m, cb, k = _triton_shapes(b, scale, shift, weight, nhw, "bnrelu_conv3x3_fwd")
        drop = _check_drop(drop_p, drop_seed, m, k, b.device, "bnrelu_conv3x3_fwd")
    else:
        (m, cb), k, h, w, drop = b.shape, weight.shape[0], nhw[1], nhw[2], drop_p > 0
    t = choose(CONV3X3_FWD, b, k=k, size=b.element_size()).kwargs
    bm = t["BLOCK_M"]
    tiles = cdiv(m, bm)
    pmean, pm2 = alloc((2, tiles, k), torch.float32, b.device).unbind(0)
    launch(_fwd_kernel, (tiles, cdiv(k, t["BLOCK_N"])), (b, scale, shift, weight, out, out.stride(0), pmean, pm2,
        m, h, w, cb, k, *_drop_args(drop, drop_p, drop_seed, scale)), **t,
        STATS=stats, PRECISION=dot_precision(b.dtype), DROP=drop, W_CL=weight_layout(weight) == torch.channels_last)
    if stats and mean_out is None:
        return merge_stats(pmean, pm2, m, bm)
    if stats:
        merge_stats(pmean, pm2, m, bm, mean_out, var_out,
                    affine=None if bn_out is None else (bn_out, bn_gamma, bn_beta, float(bn_eps)))
    if not checked:
        return None, None
    empty = torch.empty(0, dtype=torch.float32, device=b.device)
    return empty, torch.empty_like(empty)  # two distinct outputs, no kernel


def _bwd_triton(dy, b, scale, shift, weight, nhw, mean, rstd, count=0, dy_x=None, dy_mean=None, dy_p=None,
                dy_q=None, drop_p=0.0, drop_seed=None, *, checked=True):
    """The Triton backward; ``checked`` False (the block's hot path): no argument checks."""
    if checked:
        h, w, m, cb, k = _triton_shapes(b, scale, shift, weight, nhw, "bnrelu_conv3x3_bwd")
        drop = _check_drop(drop_p, drop_seed, m, k, b.device, "bnrelu_conv3x3_bwd")
    else:
        (m, cb), k, h, w, drop = b.shape, weight.shape[0], nhw[1], nhw[2], drop_p > 0
    w_cl = weight_layout(weight) == torch.channels_last
    dargs = _drop_args(drop, drop_p, drop_seed, dy)
    finish = dy_x is not None
    fin = (dy_x, dy_x.stride(0), dy_mean, dy_p, dy_q) if finish else (dy, 0, scale, scale, scale)  # unused: dy
    kpad = max(16, next_pow2(k))
    t = choose(CONV3X3_DGRAD, b, k=k).kwargs
    tiles = cdiv(m, t["BLOCK_M"])
    g2 = alloc((m, cb), torch.float32, b.device)
    psg, psgx = alloc((2, tiles, cb), torch.float32, b.device).unbind(0)
    launch(_dgrad_kernel, (tiles, cdiv(cb, t["BLOCK_N"])), (dy, dy.stride(0), *fin, b, scale, shift, mean, rstd,
        weight, g2, psg, psgx, m, h, w, cb, k, *dargs), **t,
        PRECISION=dot_precision(b.dtype), FINISH=finish, DROP=drop, W_CL=w_cl)
    wt = choose(CONV3X3_WGRAD, b, m=m, cb=cb, size=b.element_size())
    splits = wt.splits
    tiles_per_split = cdiv(cdiv(m, wt.kwargs["BLOCK_M"]), splits)
    pdw = alloc((splits, 9, k, cb), torch.float32, b.device)
    launch(_wgrad_kernel, (9 * cdiv(cb, wt.kwargs["BLOCK_C"]), splits), (dy, dy.stride(0), *fin, b, scale, shift,
        pdw, m, h, w, cb, k, tiles_per_split, *dargs), **wt.kwargs, KPAD=kpad, PRECISION=dot_precision(b.dtype),
        FINISH=finish, DROP=drop)
    dweight = alloc((k, cb, 3, 3), torch.float32, b.device, keep=True, memory_format=weight_layout(weight))
    vec = alloc((4, cb), torch.float32, b.device, keep=True).unbind(0)  # dgamma, dbeta, p, q
    interp = interpreted(b)  # the reduction's sizes: small under the interpreter
    block_w, block_c = 1024, 16 if interp else 64
    w_programs = cdiv(9 * k * cb, block_w)
    launch(_bwd_finish_kernel, (w_programs + cdiv(cb, block_c),), (pdw, splits, dweight, psg, psgx,
        tiles, scale, rstd, *vec, 1.0 / count if count > 0 else 0.0, cb, k,
        w_programs), BLOCK_W=block_w, BLOCK_T=4 if interp else 32, BLOCK_C=block_c, W_CL=w_cl)
    return (g2, dweight, *vec)


# ----------------------------------------------------------------------------- the ops
# Schemas in csrc/ops.cpp; the same Python functions serve the CPU and CUDA dispatch keys
# (registered with torch.library.Library, whose dispatch is cheaper than a torch.library.custom_op's:
# benchmarks/results/host_overheads.md).
def _use_triton(b, impl):
    """Triton for CUDA tensors when chosen (``impl``, else ``conv3x3_impl()``), except float64 and
    float32 without TF32, which run cuDNN whatever the choice (``_triton_common.cuda_gemm_impl``)."""
    if impl not in ("",) + _IMPLS:
        raise RuntimeError(f"bnrelu_conv3x3: expected impl in {_IMPLS} (or empty for the default), got {impl!r}")
    return cuda_path(b.device) and cuda_gemm_impl(b.dtype) == "triton" and (impl or conv3x3_impl()) == "triton"


def cuda_fwd(b, scale, shift, weight, nhw, out, stats, impl="", mean_out=None, var_out=None, bn_out=None,
              bn_gamma=None, bn_beta=None, bn_eps=0.0, drop_p=0.0, drop_seed=None):
    if out.shape != (b.shape[0], weight.shape[0]) or out.dtype != b.dtype or out.stride(1) != 1:
        raise RuntimeError(f"bnrelu_conv3x3_fwd: expected out of shape ({b.shape[0]}, {weight.shape[0]}), dtype "
                           f"{b.dtype}, unit channel stride; got {tuple(out.shape)} {out.dtype} {out.stride()}")
    _check_stats_out(out, stats, mean_out, var_out, bn_out, bn_gamma, bn_beta, bn_eps)
    _check_drop(drop_p, drop_seed, b.shape[0], weight.shape[0], b.device, "bnrelu_conv3x3_fwd")
    bn = (bn_out, bn_gamma, bn_beta, bn_eps, drop_p, drop_seed)
    if _use_triton(b, impl):
        return _fwd_triton(b, scale, shift, weight, nhw, out, stats, mean_out, var_out, *bn)
    return _fwd_aten(b, scale, shift, weight, nhw, out, stats, mean_out, var_out, *bn)


def _check_stats_out(out, stats, mean_out, var_out, bn_out, bn_gamma, bn_beta, bn_eps):
    op = "bnrelu_conv3x3_fwd"
    if mean_out is None and var_out is None:
        if bn_out is not None or bn_gamma is not None or bn_beta is not None:
            raise RuntimeError(f"{op}: expected mean_out and var_out with bn_out")
        return
    k = out.shape[1]
    acc = acc_dtype(out.dtype)
    if not stats:
        raise RuntimeError(f"{op}: expected stats=True with mean_out/var_out")
    n = mean_out.shape[0] if mean_out is not None and mean_out.dim() == 1 else -1
    for name, t in (("mean_out", mean_out), ("var_out", var_out)):
        if t is None or t.dim() != 1 or t.shape[0] < k or t.shape[0] != n or t.dtype != acc or t.stride(0) != 1 \
                or t.device != out.device:
            raise RuntimeError(f"{op}: expected {name} to be a contiguous 1-D tensor of C + {k} channels (the same C "
                               f"for mean_out and var_out), dtype {acc} on {out.device}, got "
                               f"{None if t is None else (tuple(t.shape), t.dtype, t.stride(), str(t.device))}")
    given = [t is not None for t in (bn_out, bn_gamma, bn_beta)]
    if any(given) and not all(given):
        raise RuntimeError(f"{op}: expected bn_out, bn_gamma and bn_beta together (or none)")
    if bn_out is not None:
        if bn_out.shape != (3, n) or bn_out.stride(1) != 1 or bn_out.dtype != acc:
            raise RuntimeError(f"{op}: expected bn_out of shape (3, {n}) with unit column stride and dtype {acc}, "
                               f"got {tuple(bn_out.shape)} {bn_out.dtype} strides {bn_out.stride()}")
        for name, t in (("bn_gamma", bn_gamma), ("bn_beta", bn_beta)):
            if t.shape != (n,) or not t.is_floating_point():
                raise RuntimeError(f"{op}: expected {name} to be a 1-D floating tensor of {n} channels, got "
                                   f"{tuple(t.shape)} {t.dtype}")
        if bn_eps < 0:
            raise RuntimeError(f"{op}: expected bn_eps >= 0, got {bn_eps}")


def cuda_bwd(dy, b, scale, shift, weight, nhw, mean, rstd, impl="", count=0, dy_x=None, dy_mean=None, dy_p=None,
              dy_q=None, drop_p=0.0, drop_seed=None):
    finish = (dy_x, dy_mean, dy_p, dy_q)
    if any(t is not None for t in finish) and any(t is None for t in finish):
        raise RuntimeError("bnrelu_conv3x3_bwd: expected dy_x, dy_mean, dy_p and dy_q together (or none)")
    dy_dtype = b.dtype if dy_x is None else acc_dtype(b.dtype)
    if dy.shape != (b.shape[0], weight.shape[0]) or dy.dtype != dy_dtype or (dy.shape[1] > 1 and dy.stride(1) != 1):
        raise RuntimeError(f"bnrelu_conv3x3_bwd: expected dy of shape ({b.shape[0]}, {weight.shape[0]}), dtype "
                           f"{dy_dtype} (the block's gradient sum when dy_x is given) and unit channel stride, got "
                           f"{tuple(dy.shape)} {dy.dtype} strides {dy.stride()}")
    if dy_x is not None:
        if dy_x.shape != dy.shape or dy_x.dtype != b.dtype or (dy.shape[1] > 1 and dy_x.stride(1) != 1):
            raise RuntimeError(f"bnrelu_conv3x3_bwd: expected dy_x of shape {tuple(dy.shape)} and dtype {b.dtype} "
                               f"with unit channel stride, got {tuple(dy_x.shape)} {dy_x.dtype} {dy_x.stride()}")
        for name, t in (("dy_mean", dy_mean), ("dy_p", dy_p), ("dy_q", dy_q)):
            if t.shape != (dy.shape[1],) or t.dtype != dy_dtype or t.stride(0) != 1:
                raise RuntimeError(f"bnrelu_conv3x3_bwd: expected {name} to be a contiguous 1-D tensor of "
                                   f"{dy.shape[1]} channels and dtype {dy_dtype}, got {tuple(t.shape)} {t.dtype}")
    if count < 0:
        raise RuntimeError(f"bnrelu_conv3x3_bwd: expected count >= 0 (values per channel, 0: no p, q), got {count}")
    _check_drop(drop_p, drop_seed, b.shape[0], weight.shape[0], b.device, "bnrelu_conv3x3_bwd")
    if _use_triton(b, impl):
        return _bwd_triton(dy, b, scale, shift, weight, nhw, mean, rstd, count, *finish, drop_p, drop_seed)
    return _bwd_aten(dy, b, scale, shift, weight, nhw, mean, rstd, count, *finish, drop_p, drop_seed)


def cuda_fwd_trusted(b, scale, shift, weight, nhw, out, *, impl="", stats=None, fold=None, dropout=None):
    """cuda_fwd for the block's hot path (bnrelu_conv3x3_fwd's arguments): no argument checks (its arguments
    are right by construction)."""
    args = (b, scale, shift, weight, nhw, out, stats is not None, *(stats or _NO_STATS), *(fold or _NO_FOLD),
            *(dropout or _NO_DROPOUT))
    if _use_triton(b, impl):
        _fwd_triton(*args, checked=False)
    else:
        _fwd_aten(*args)


def cuda_bwd_trusted(dy, b, scale, shift, weight, nhw, mean, rstd, *, impl="", count=0, finish=None, dropout=None):
    """cuda_bwd for the block's hot path (bnrelu_conv3x3_bwd's arguments): no argument checks."""
    args = (dy, b, scale, shift, weight, nhw, mean, rstd, count, *(finish[:4] if finish else _NO_FINISH),
            *(dropout or _NO_DROPOUT))
    if _use_triton(b, impl):
        return _bwd_triton(*args, checked=False)
    return _bwd_aten(*args)


def triton_fwd_direct(b, scale, shift, weight, nhw, out, *, impl="", stats=None, fold=None, dropout=None):
    """The Triton forward on the block's hot path, where ``ops.block_ops`` chose Triton for the step (``impl``
    resolved to "triton", a 16-bit or TF32 dtype): no checks, no per-call choice."""
    _fwd_triton(b, scale, shift, weight, nhw, out, stats is not None, *(stats or _NO_STATS), *(fold or _NO_FOLD),
                *(dropout or _NO_DROPOUT), checked=False)


def triton_bwd_direct(dy, b, scale, shift, weight, nhw, mean, rstd, *, impl="", count=0, finish=None, dropout=None):
    """The Triton backward on the block's hot path (see triton_fwd_direct)."""
    return _bwd_triton(dy, b, scale, shift, weight, nhw, mean, rstd, count, *(finish[:4] if finish else _NO_FINISH),
                       *(dropout or _NO_DROPOUT), checked=False)


_NO_STATS, _NO_FOLD, _NO_DROPOUT, _NO_FINISH = (None, None), (None, None, None, 0.0), (0.0, None), (None,) * 4


# ----------------------------------------------------------------------------- the registered ops
def _fwd_op(b, bn, weight, nhw, out, impl="", fold=None, fold_eps=0.0, drop_p=0.0, drop_seed=None):
    """The registered forward (its schema's lists, csrc/ops.cpp): cuda_fwd, on the CPU and CUDA."""
    op = "bnrelu_conv3x3_fwd"
    scale, shift = lowered(op, "bn", bn, ("scale", "shift"))
    if len(out) not in (1, 3, 4):
        raise RuntimeError(f"{op}: expected out = [out], [out, mean, var] or [out, mean, var, folded], got "
                           f"{len(out)} tensors")
    gamma, beta = lowered(op, "fold", fold, ("gamma", "beta"), optional=True)
    if (len(out) == 4) != (gamma is not None):
        raise RuntimeError(f"{op}: expected fold = [gamma, beta] exactly with out = [out, mean, var, folded]")
    o, mean_out, var_out, bn_out = (*out, None, None, None)[:4]
    cuda_fwd(b, scale, shift, weight, nhw, o, len(out) > 1, impl, mean_out, var_out, bn_out, gamma, beta, fold_eps,
             drop_p, drop_seed)


def _bwd_op(dy, b, bn, weight, nhw, impl="", count=0, finish=None, drop_p=0.0, drop_seed=None):
    """The registered backward (its schema's lists): cuda_bwd, on the CPU and CUDA."""
    scale, shift, mean, rstd = lowered("bnrelu_conv3x3_bwd", "bn", bn, ("scale", "shift", "mean", "rstd"))
    fin = lowered("bnrelu_conv3x3_bwd", "finish", finish, ("x", "mean", "p", "q"), optional=True)
    return cuda_bwd(dy, b, scale, shift, weight, nhw, mean, rstd, impl, count, *fin, drop_p, drop_seed)


_lib = torch.library.Library("densenet_fused", "IMPL")
for _key in ("CPU", "CUDA"):
    _lib.impl("bnrelu_conv3x3_fwd", on_tensor_device(_fwd_op), _key)
    _lib.impl("bnrelu_conv3x3_bwd", on_tensor_device(_bwd_op), _key)


@torch.library.register_fake("densenet_fused::bnrelu_conv3x3_fwd")
def _(b, bn, weight, nhw, out, impl="", fold=None, fold_eps=0.0, drop_p=0.0, drop_seed=None):
    return None


@torch.library.register_fake("densenet_fused::bnrelu_conv3x3_bwd")
def _(dy, b, bn, weight, nhw, impl="", count=0, finish=None, drop_p=0.0, drop_seed=None):
    acc = acc_dtype(b.dtype)
    cb = b.shape[1]
    return (b.new_empty(b.shape, dtype=acc), torch.empty_like(weight, dtype=acc, memory_format=weight_layout(weight)),
            *(b.new_empty(cb, dtype=acc) for _ in range(4)))


def bnrelu_conv3x3_fwd(b, scale, shift, weight, nhw, out, *, impl: str = "", stats: Optional[StatsOut] = None,
                       fold: Optional[FoldBN] = None, dropout: Optional[Dropout] = None) -> None:
    """Write conv3x3(relu(b*scale+shift)) into ``out`` (an (N*H*W, k) channel slice of the buffer).  With
    ``stats``, the batch mean and biased variance of the values as stored go into the last k entries of
    ``stats.mean`` / ``stats.var`` (vectors of C + k channels: the buffer's statistics up to and including
    out); with ``fold`` (and stats), also the folded map (scale, shift, rstd) of the BatchNorm reading all C + k
    channels (the next layer's norm1) into ``fold.out`` (3, C + k).  ``impl`` ("aten" / "triton") overrides
    the CUDA default (``conv3x3_impl()``).  ``dropout``: dropout of the output (before its statistics) with
    the Philox mask of its seed (``dropout_mask`` gives the mask)."""
    if fold is not None and stats is None:
        raise RuntimeError("bnrelu_conv3x3_fwd: expected stats=StatsOut(mean, var) with fold (it folds them)")
    outs = [out] if stats is None else [out, stats.mean, stats.var] + ([fold.out] if fold is not None else [])
    fl, eps = ([fold.gamma, fold.beta], float(fold.eps)) if fold is not None else (None, 0.0)
    torch.ops.densenet_fused.bnrelu_conv3x3_fwd(b, [scale, shift], weight, list(nhw), outs, impl, fl, eps,
                                                *(dropout or _NO_DROPOUT))


def bnrelu_conv3x3_bwd(dy, b, scale, shift, weight, nhw, mean, rstd, *, impl: str = "", count: int = 0,
                       finish: Optional[GradFinish] = None, dropout: Optional[Dropout] = None):
    """Backward through conv3x3 and the ReLU of BN2: (g2, dweight, dgamma, dbeta, p, q) with
    g2 = dA2 * !(b*scale+shift <= 0) (fp32; a NaN passes the gradient, as in torch), dweight of weight's
    shape and layout (fp32), dgamma = sum(g2*xhat2), dbeta = sum(g2) per channel, xhat2 = (b - mean) * rstd,
    and BN2's input-gradient scalars p = scale*dbeta/count, q = scale*rstd*dgamma/count (zeros when count is
    0).  With ``finish`` (x, mean, p, q; no scale), ``dy`` is the block's fp32 gradient sum G of the new
    channels and the op finishes their input gradient dy = G - p - (x - mean) * q itself (rounded to b's
    dtype).  With ``dropout``, dy is the gradient of the forward's dropout output: it goes through the same
    mask (regenerated from the seed) and scale."""
    if finish is not None and finish.scale is not None:
        raise RuntimeError("bnrelu_conv3x3_bwd: expected finish=GradFinish(x, mean, p, q) without a scale")
    return torch.ops.densenet_fused.bnrelu_conv3x3_bwd(dy, b, [scale, shift, mean, rstd], weight, list(nhw), impl,
                                                       count, list(finish[:4]) if finish is not None else None,
                                                       *(dropout or _NO_DROPOUT))


# The tensor arguments each Triton kernel of this file writes ("w") or reads and writes ("rw"); every other
# tensor argument is read (what `densenet-fused cost` counts as a launch's traffic).
TRITON_WRITES = {
    "_fwd_kernel": {"OUT": "w", "PMEAN": "w", "PM2": "w"},
    "_dgrad_kernel": {"G2": "w", "PSG": "w", "PSGX": "w"},
    "_wgrad_kernel": {"PDW": "w"},
    "_bwd_finish_kernel": {"DW": "w", "DGAMMA": "w", "DBETA": "w", "P": "w", "Q": "w"},
    "_dropout_mask_kernel": {"OUT": "w"},
}
