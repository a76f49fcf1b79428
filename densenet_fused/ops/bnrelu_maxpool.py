"""bnrelu_maxpool: the stem's BatchNorm-ReLU and 3x3/2 max pool (padding 1) on conv0's output,
and its backward (docs/design.md section 9).

Forward: ``out = maxpool(relu(y*scale + shift))`` on y as an (N*H*W, C) NHWC matrix, plus the
window position of each maximum (kh*3 + kw) as int8: what backward needs besides y itself.  The
BN and ReLU outputs never exist in memory, nor do torch's int64 pool indices.
Backward: the pooled gradient is routed to each window's maximum and masked by the ReLU (g), then
the BatchNorm input gradient ``dy = scale*(g - mean(g) - xhat*mean(g*xhat))`` (batch statistics) or
``scale*g`` (running statistics), with dgamma = sum(g*xhat), dbeta = sum(g).  Two passes: the sums
over the pooled outputs (reading y only at the maxima), then dy over y's pixels, each gathering g
from the at most 2x2 windows that contain it (no scatter, no atomics, deterministic).  With running
statistics torch's dgamma also holds 0*xhat of every pixel g = 0 (NaN where xhat is infinite): the dy
pass adds those terms (the Triton kernel as a masked store of NaN, nothing in the finite case).

- CPU kernel: ``csrc/cpu/bnrelu_maxpool.cpp``.
- CUDA kernel: the Triton kernels below (float64, float32, float16, bfloat16; statistics and sums
  in float32, float64 for float64): one launch forward, three backward (sums per row split, their
  fixed-order reduction, dy).  Under ``TRITON_INTERPRET=1`` the launchers run on CPU tensors.
"""
from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

from .launch import interpreted, launch
from ._common import acc_dtype, cdiv, next_pow2, on_tensor_device
from ._triton_common import device_target

POOL_KERNEL, POOL_STRIDE, POOL_PADDING = 3, 2, 1


def pooled_size(s: int) -> int:
    """Output size of the 3x3/2 max pool with padding 1 (floor mode) for input size s."""
    return (s + 2 * POOL_PADDING - POOL_KERNEL) // POOL_STRIDE + 1


# ----------------------------------------------------------------------------- fakes
@torch.library.register_fake("densenet_fused::bnrelu_maxpool_fwd")
def _(y, scale, shift, nhw):
    p = nhw[0] * pooled_size(nhw[1]) * pooled_size(nhw[2])
    c = y.shape[1]
    return y.new_empty((p, c)), y.new_empty((p, c), dtype=torch.int8)


@torch.library.register_fake("densenet_fused::bnrelu_maxpool_bwd")
def _(dout, index, y, scale, shift, mean, rstd, nhw, count):
    acc = acc_dtype(y.dtype)
    c = y.shape[1]
    return y.new_empty((y.shape[0], c)), y.new_empty(c, dtype=acc), y.new_empty(c, dtype=acc)


def bnrelu_maxpool_fwd(y, scale, shift, nhw: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, index): out (N*Hp*Wp, C) = 3x3/2 max pool (pad 1) of relu(y*scale + shift) with y an
    (N*H*W, C) matrix, index = kh*3 + kw of each maximum (int8)."""
    return torch.ops.densenet_fused.bnrelu_maxpool_fwd(y, scale, shift, list(nhw))


def bnrelu_maxpool_bwd(dout, index, y, scale, shift, mean, rstd, nhw: Sequence[int],
                       count: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dgamma, dbeta); count = values per channel (batch statistics) or 0 (running statistics)."""
    return torch.ops.densenet_fused.bnrelu_maxpool_bwd(dout, index, y, scale, shift, mean, rstd, list(nhw), count)


def _check(y, scale, shift, nhw, op):
    if y.dim() != 2 or (y.shape[1] > 1 and y.stride(1) != 1) or (y.shape[0] > 1 and y.stride(0) < y.shape[1]):
        raise RuntimeError(f"{op}: expected y to be a 2-D (N*H*W, channels) matrix with unit channel stride, got "
                           f"shape {tuple(y.shape)} strides {y.stride()}")
    if not y.is_floating_point():
        raise RuntimeError(f"{op}: expected y to be float64, float32, float16 or bfloat16, got {y.dtype}")
    if len(nhw) != 3 or min(nhw) <= 0 or nhw[0] * nhw[1] * nhw[2] != y.shape[0]:
        raise RuntimeError(f"{op}: expected nhw = [N, H, W] (positive) with N*H*W = {y.shape[0]} rows of y, got "
                           f"{list(nhw)}")
    _check_vectors(op, y, (("scale", scale), ("shift", shift)))


def _check_vectors(op, y, named):
    """Each (name, t) of ``named``: a 1-D unit-stride tensor of y's channels in its accumulation dtype,
    on its device."""
    c = y.shape[1]
    acc = acc_dtype(y.dtype)
    for name, t in named:
        if t.shape != (c,) or t.dtype != acc or t.device != y.device or (c > 1 and t.stride(0) != 1):
            raise RuntimeError(f"{op}: expected {name} to be a 1-D tensor of {c} channels, dtype {acc} on "
                               f"{y.device} with unit stride, got {tuple(t.shape)} {t.dtype} on {t.device}")


def _check_bwd(dout, index, y, mean, rstd, nhw, count):
    op = "bnrelu_maxpool_bwd"
    p = nhw[0] * pooled_size(nhw[1]) * pooled_size(nhw[2])
    c = y.shape[1]
    _check_vectors(op, y, (("mean", mean), ("rstd", rstd)))
    if dout.shape != (p, c) or not dout.is_contiguous() or dout.dtype != y.dtype or dout.device != y.device:
        raise RuntimeError(f"{op}: expected dout to be a contiguous ({p}, {c}) matrix (N*Hp*Wp pooled rows) of "
                           f"dtype {y.dtype}, got {tuple(dout.shape)} {dout.dtype} strides {dout.stride()}")
    if index.shape != (p, c) or not index.is_contiguous() or index.dtype != torch.int8 or index.device != y.device:
        raise RuntimeError(f"{op}: expected index to be a contiguous int8 ({p}, {c}) matrix, got {index.dtype} of "
                           f"shape {tuple(index.shape)} strides {index.stride()}")
    if count != 0 and count <= 1:
        raise RuntimeError(f"{op}: expected count = 0 (running statistics) or the values per channel (> 1), "
                           f"got {count}")


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _bnrelu_rounded(y, s, h, Y_DTYPE: tl.constexpr):
    """relu(y*scale + shift) in the statistics dtype, rounded to y's dtype; a NaN stays NaN."""
    z = y.to(s.dtype) * s[None, :] + h[None, :]
    return tl.where(z < 0.0, 0.0, z).to(Y_DTYPE).to(s.dtype)


@triton.jit
def _program_tile(ROWS, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (rows as int64, channels, rows in range, channels in range) of a (ROWS, C) grid of
    (BLOCK_R, BLOCK_C) tiles (program ids 0 and 1)."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return r, rc, r < ROWS, rc < C


@triton.jit
def _nhw(r, HGT, WID):
    """(n, h, w) of NHWC row r of an (N, HGT, WID) grid."""
    return r // (WID * HGT), (r // WID) % HGT, r % WID


@triton.jit
def _fwd_kernel(Y, ldy, SCALE, SHIFT, OUT, IDX, P, C, H, W, HP, WP,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    rp, rc, p_ok, c_ok = _program_tile(P, C, BLOCK_P, BLOCK_C)
    n, oh, ow = _nhw(rp, HP, WP)
    s = tl.load(SCALE + rc, mask=c_ok, other=0.0)
    h = tl.load(SHIFT + rc, mask=c_ok, other=0.0)
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), s.dtype)
    idx = tl.full((BLOCK_P, BLOCK_C), -1, tl.int32)
    for kh in tl.static_range(3):
        ih = oh * 2 - 1 + kh
        h_ok = (ih >= 0) & (ih < H)
        for kw in tl.static_range(3):
            iw = ow * 2 - 1 + kw
            ok = (p_ok & h_ok & (iw >= 0) & (iw < W))[:, None] & c_ok[None, :]
            y = tl.load(Y + ((n * H + ih) * W + iw)[:, None] * ldy + rc[None, :], mask=ok, other=0.0)
            v = _bnrelu_rounded(y, s, h, Y.dtype.element_ty)
            # torch's rule: strict >, a NaN always taken; the first valid position unconditionally
            take = ok & ((v > best) | (v != v) | (idx < 0))
            best = tl.where(take, v, best)
            idx = tl.where(take, kh * 3 + kw, idx)
    om = p_ok[:, None] & c_ok[None, :]
    offs = rp[:, None] * C + rc[None, :]
    tl.store(OUT + offs, best.to(OUT.dtype.element_ty), mask=om)
    tl.store(IDX + offs, idx.to(tl.int8), mask=om)


@triton.jit
def _bwd_sums_kernel(DOUT, IDX, Y, ldy, SCALE, SHIFT, MEAN, RSTD, PSG, PSGX, P, C, H, W, HP, WP, SPLITS,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per row split: sum(g) and sum(g*xhat) over the pooled outputs, y read at the maxima only."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    tiles_per_split = tl.cdiv(tl.cdiv(P, BLOCK_P), SPLITS)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    s = tl.load(SCALE + rc, mask=c_ok, other=0.0)
    h = tl.load(SHIFT + rc, mask=c_ok, other=0.0)
    mu = tl.load(MEAN + rc, mask=c_ok, other=0.0)
    rs = tl.load(RSTD + rc, mask=c_ok, other=0.0)
    sg = tl.zeros((BLOCK_C,), dtype=s.dtype)
    sgx = tl.zeros((BLOCK_C,), dtype=s.dtype)
    for i in range(0, tiles_per_split):
        rp = ((split * tiles_per_split + i) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        p_ok = rp < P
        n, oh, ow = _nhw(rp, HP, WP)
        m = p_ok[:, None] & c_ok[None, :]
        offs = rp[:, None] * C + rc[None, :]
        k = tl.load(IDX + offs, mask=m, other=0).to(tl.int32)
        ih = (oh * 2 - 1)[:, None] + k // 3
        iw = (ow * 2 - 1)[:, None] + k % 3
        ok = m & (k >= 0) & (k < 9) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        y = tl.load(Y + ((n[:, None] * H + ih) * W + iw) * ldy + rc[None, :], mask=ok, other=0.0)
        v = _bnrelu_rounded(y, s, h, Y.dtype.element_ty)
        d = tl.load(DOUT + offs, mask=ok, other=0.0).to(s.dtype)
        d = tl.where(ok & ~(v <= 0.0), d, 0.0)  # relu backward: a NaN passes, as in torch
        sg += tl.sum(d, axis=0)
        sgx += tl.sum(d * ((y.to(s.dtype) - mu[None, :]) * rs[None, :]), axis=0)
    tl.store(PSG + split * C + rc, sg, mask=c_ok)
    tl.store(PSGX + split * C + rc, sgx, mask=c_ok)


@triton.jit
def _bwd_finish_kernel(PSG, PSGX, SPLITS, C, DBETA, DGAMMA, AB, inv_count, BLOCK: tl.constexpr):
    """dbeta, dgamma: the split partials summed in a fixed order; AB = (dbeta, dgamma) / count."""
    rc = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rc < C
    sg = tl.zeros((BLOCK,), dtype=PSG.dtype.element_ty)
    sgx = tl.zeros((BLOCK,), dtype=PSG.dtype.element_ty)
    for s in range(0, SPLITS):
        sg += tl.load(PSG + s * C + rc, mask=ok, other=0.0)
        sgx += tl.load(PSGX + s * C + rc, mask=ok, other=0.0)
    tl.store(DBETA + rc, sg, mask=ok)
    tl.store(DGAMMA + rc, sgx, mask=ok)
    # running statistics (inv_count 0): no mean terms, exactly 0 even for a NaN or Inf sum (as torch's)
    tl.store(AB + rc, tl.where(inv_count == 0.0, 0.0, sg * inv_count), mask=ok)
    tl.store(AB + C + rc, tl.where(inv_count == 0.0, 0.0, sgx * inv_count), mask=ok)


@triton.jit
def _gather(DOUT, IDX, o, code, ok, rc, c_ok, C, g):
    """g += dout[o] where window o's maximum is at window position ``code`` (a (BLOCK_M,) vector)."""
    mm = ok[:, None] & c_ok[None, :]
    offs = o[:, None] * C + rc[None, :]
    k = tl.load(IDX + offs, mask=mm, other=-1).to(tl.int32)
    d = tl.load(DOUT + offs, mask=mm, other=0.0).to(g.dtype)
    return g + tl.where(mm & (k == code[:, None]), d, 0.0)


@triton.jit
def _bwd_dy_kernel(DOUT, IDX, Y, ldy, SCALE, SHIFT, MEAN, RSTD, AB, DY, DGAMMA, M, C, H, W, HP, WP,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, RUNNING: tl.constexpr):
    """dy over y's pixels: g gathered from the (at most 2x2) windows containing each pixel, in the
    order (oh0, ow0), (oh0, ow0+1), (oh0+1, ow0), (oh0+1, ow0+1), then the BatchNorm backward.
    RUNNING (running statistics): also the terms of torch's dgamma = sum(g*xhat) over every pixel
    that the sums kernel (the maxima only) did not see, 0*xhat where g = 0: 0, or NaN where xhat is
    not finite; ``dgamma += NaN`` is a store of NaN, so racing programs agree and nothing is written
    in the finite case."""
    rm, rc, m_ok, c_ok = _program_tile(M, C, BLOCK_M, BLOCK_C)
    n, ih, iw = _nhw(rm, H, W)
    # windows containing ih: oh0 = ih // 2 (window row kh = ih % 2 + 1), and oh0 + 1 (kh = 0) for odd ih
    oh0 = ih // 2
    kh0 = ih % 2 + 1
    h1 = (ih % 2 == 1) & (oh0 + 1 < HP)
    ow0 = iw // 2
    kw0 = iw % 2 + 1
    w1 = (iw % 2 == 1) & (ow0 + 1 < WP)
    s = tl.load(SCALE + rc, mask=c_ok, other=0.0)
    g = tl.zeros((BLOCK_M, BLOCK_C), dtype=s.dtype)
    base = n * HP
    g = _gather(DOUT, IDX, (base + oh0) * WP + ow0, kh0 * 3 + kw0, m_ok, rc, c_ok, C, g)
    g = _gather(DOUT, IDX, (base + oh0) * WP + ow0 + 1, kh0 * 3, m_ok & w1, rc, c_ok, C, g)
    g = _gather(DOUT, IDX, (base + oh0 + 1) * WP + ow0, kw0, m_ok & h1, rc, c_ok, C, g)
    g = _gather(DOUT, IDX, (base + oh0 + 1) * WP + ow0 + 1, tl.zeros_like(kw0), m_ok & h1 & w1, rc, c_ok, C, g)
    h = tl.load(SHIFT + rc, mask=c_ok, other=0.0)
    mu = tl.load(MEAN + rc, mask=c_ok, other=0.0)
    rs = tl.load(RSTD + rc, mask=c_ok, other=0.0)
    a = tl.load(AB + rc, mask=c_ok, other=0.0)
    b = tl.load(AB + C + rc, mask=c_ok, other=0.0)
    ym = m_ok[:, None] & c_ok[None, :]
    y = tl.load(Y + rm[:, None] * ldy + rc[None, :], mask=ym, other=0.0)
    v = _bnrelu_rounded(y, s, h, Y.dtype.element_ty)
    g = tl.where(v <= 0.0, 0.0, g)  # relu backward: a NaN passes, as in torch
    xhat = (y.to(s.dtype) - mu[None, :]) * rs[None, :]
    # running statistics (b = 0): dy = scale*g, even where xhat is infinite (as torch's)
    dy = s[None, :] * (g - a[None, :] - tl.where(b[None, :] == 0.0, 0.0, xhat * b[None, :]))
    tl.store(DY + rm[:, None] * C + rc[None, :], dy.to(DY.dtype.element_ty), mask=ym)
    if RUNNING:
        z = tl.sum(tl.where(ym & (g == 0.0), 0.0 * xhat, 0.0), axis=0)  # 0 or NaN per channel
        tl.store(DGAMMA + rc, tl.full((BLOCK_C,), float("nan"), s.dtype), mask=c_ok & (z != z))


# ----------------------------------------------------------------------------- launchers
def _tiles(c, interp):
    """(pixels, channels, warps) per program of the elementwise kernels (forward, dy) and of the sums kernel:
    shape-only, small tiles under the interpreter.  Tiles that compile without spills on sm_90a in every
    dtype: the sums kernel, which gathers y with per-element addresses, on narrower ones
    (benchmarks/results/kernel_resources.md)."""
    if interp:
        return (16, 16, 4), (16, 16, 4)
    bc = min(64, max(16, next_pow2(c)))
    return (64, bc, 8), (32, min(32, bc), 4)


def triton_fwd(y, scale, shift, nhw):
    """Triton forward launcher (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(y, scale, shift, nhw, "bnrelu_maxpool_fwd")
    n, hgt, wid = nhw
    hp, wp = pooled_size(hgt), pooled_size(wid)
    p, c = n * hp * wp, y.shape[1]
    out = y.new_empty((p, c))
    index = y.new_empty((p, c), dtype=torch.int8)
    if p and c:
        (bp, bc, warps), _ = _tiles(c, interpreted(y))
        if y.dtype == torch.float64 and not interpreted(y):
            bp //= 2  # 64 fp64 rows spill on sm_80 (benchmarks/results/kernel_resources.md)
        launch(_fwd_kernel, (cdiv(p, bp), cdiv(c, bc)), (y, y.stride(0), scale, shift, out, index, p,
            c, hgt, wid, hp, wp), BLOCK_P=bp, BLOCK_C=bc, num_warps=warps)
    return out, index


def _splits(p, c, block_p, block_c, interp):
    """Row splits of the sums pass: a function of the shape and the device's multiprocessor count, about
    two waves of programs (two per multiprocessor; each split writes 2*C partial sums, reduced in a
    fixed order by the finish kernel)."""
    if interp:
        return max(1, min(3, cdiv(p, block_p)))
    return max(1, min(cdiv(p, block_p), cdiv(2 * device_target().sms, cdiv(c, block_c))))


def triton_bwd(dout, index, y, scale, shift, mean, rstd, nhw, count):
    """Triton backward launcher (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(y, scale, shift, nhw, "bnrelu_maxpool_bwd")
    _check_bwd(dout, index, y, mean, rstd, nhw, count)
    n, hgt, wid = nhw
    hp, wp = pooled_size(hgt), pooled_size(wid)
    m, c = y.shape
    p = n * hp * wp
    acc = scale.dtype
    dy = y.new_empty((m, c))
    dbeta = torch.empty(c, dtype=acc, device=y.device)
    dgamma = torch.empty(c, dtype=acc, device=y.device)
    if c == 0:
        return dy, dgamma, dbeta
    interp = interpreted(y)
    (bm, bc, warps), (sp, sc, s_warps) = _tiles(c, interp)
    splits = _splits(p, c, sp, sc, interp)
    part = torch.empty((2, splits, c), dtype=acc, device=y.device)
    ab = torch.empty((2, c), dtype=acc, device=y.device)
    launch(_bwd_sums_kernel, (cdiv(c, sc), splits), (dout, index, y, y.stride(0), scale, shift, mean, rstd,
        part[0], part[1], p, c, hgt, wid, hp, wp, splits), BLOCK_P=sp, BLOCK_C=sc, num_warps=s_warps)
    block = 256
    launch(_bwd_finish_kernel, (cdiv(c, block),), (part[0], part[1], splits, c, dbeta, dgamma, ab,
        1.0 / count if count > 0 else 0.0), BLOCK=block)
    launch(_bwd_dy_kernel, (cdiv(m, bm), cdiv(c, bc)), (dout, index, y, y.stride(0), scale, shift,
        mean, rstd, ab, dy, dgamma, m, c, hgt, wid, hp, wp), BLOCK_M=bm, BLOCK_C=bc, RUNNING=count == 0,
        num_warps=warps)
    return dy, dgamma, dbeta


_lib = torch.library.Library("densenet_fused", "IMPL")
_lib.impl("bnrelu_maxpool_fwd", on_tensor_device(triton_fwd), "CUDA")
_lib.impl("bnrelu_maxpool_bwd", on_tensor_device(triton_bwd), "CUDA")


# The tensor arguments each Triton kernel of this file writes ("w") or reads and writes ("rw"); every other
# tensor argument is read (what `densenet-fused cost` counts as a launch's traffic).
TRITON_WRITES = {
    "_fwd_kernel": {"OUT": "w", "IDX": "w"},
    "_bwd_sums_kernel": {"PSG": "w", "PSGX": "w"},
    "_bwd_finish_kernel": {"DBETA": "w", "DGAMMA": "w", "AB": "w"},
    "_bwd_dy_kernel": {"DY": "w", "DGAMMA": "w"},
}
