"""bnrelu_avgpool_conv1x1: the fused DenseNet transition (docs/design.md section 9),
``out = avgpool2x2(relu(x*scale + shift)) @ W^T`` straight from a block's NHWC buffer, and its
backward with the whole BatchNorm input gradient.

The 1x1 convolution and the 2x2 average pool are both linear and act on different axes, so they
commute: the pool is applied first, in the GEMM's prologue (each pooled row is the average of its
four pixels' BN-ReLU), which makes the GEMM 4x smaller; the normalized activations never exist in
memory.  Odd H/W are floored (last row/column dropped) as ``nn.AvgPool2d(2, 2)`` does.

- CPU kernel: ``csrc/cpu/bnrelu_avgpool_conv1x1.cpp``.
- CUDA kernel: the Triton kernels below (float32, float16, bfloat16); fixed tiles per dtype
  (``tiles.TRANSITION_*``, not autotuned).  Backward: ``_dw_kernel`` (dW = dout^T @ pooled
  activation, per-split partials reduced in a fixed order), ``_dx_kernel`` pass 1 (per-tile
  partial sums of g and g*xhat, and dx in eval), pass 2 (dx with the batch-statistics terms),
  ``_dropped_kernel`` (the floored pixels: their mean terms with batch statistics; in eval the NaN
  that torch's transition, which convolves before it pools, gets there in dgamma and dweight from a
  non-finite x).
  float64 on CUDA runs ``aten_fwd`` / ``aten_bwd``: an accuracy dtype, not a speed one.
Under ``TRITON_INTERPRET=1`` the Triton launchers run on CPU tensors (the CI tests).
"""
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .launch import interpreted, launch
from ._bn_grad import aten_bn_grad, bn_grad_passes, bn_grad_tile, check_channel_vectors, check_rows, load_bn_vectors
from ._common import acc_dtype, cdiv, on_tensor_device
from ._triton_common import dot_precision
from .tiles import TRANSITION_DW, TRANSITION_DX, TRANSITION_FWD, choose

_lib = torch.library.Library("densenet_fused", "IMPL")


# ----------------------------------------------------------------------------- fakes and entry points
@torch.library.register_fake("densenet_fused::bnrelu_avgpool_conv1x1_fwd")
def _(x, scale, shift, weight, nhw, out):
    return None


@torch.library.register_fake("densenet_fused::bnrelu_avgpool_conv1x1_bwd")
def _(dout, x, scale, shift, weight, nhw, mean, rstd, batch_stats):
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty((weight.shape[0], c), dtype=acc), x.new_empty(c, dtype=acc),
            x.new_empty(c, dtype=acc))


def bnrelu_avgpool_conv1x1_fwd(x, scale, shift, weight, nhw: Sequence[int],
                               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N*(H/2)*(W/2), Cout) = avgpool2x2(relu(x*scale + shift)) @ weight^T, x (N*H*W, C) NHWC rows;
    written into ``out`` when given (rows with unit channel stride, e.g. the first channels of the
    next block's buffer) and returned."""
    if out is None:
        n, h, w = nhw
        out = x.new_empty((n * (h // 2) * (w // 2), weight.shape[0]))
    torch.ops.densenet_fused.bnrelu_avgpool_conv1x1_fwd(x, scale, shift, weight, list(nhw), out)
    return out


def bnrelu_avgpool_conv1x1_bwd(dout, x, scale, shift, weight, nhw: Sequence[int], mean, rstd, batch_stats: bool):
    """(dx, dweight, dgamma, dbeta); see the op schema in csrc/ops.cpp."""
    return torch.ops.densenet_fused.bnrelu_avgpool_conv1x1_bwd(dout, x, scale, shift, weight, list(nhw), mean, rstd,
                                                               batch_stats)


# ----------------------------------------------------------------------------- checks (Python launchers)
def _check(x, scale, shift, weight, nhw, op):
    check_rows(x, op)
    if len(nhw) != 3 or min(nhw) < 0 or nhw[0] * nhw[1] * nhw[2] != x.shape[0]:
        raise RuntimeError(f"{op}: expected nhw = [N, H, W] with N*H*W = {x.shape[0]} (the rows of x), got {nhw}")
    if nhw[1] < 2 or nhw[2] < 2:
        raise RuntimeError(f"{op}: expected H >= 2 and W >= 2 (a 2x2 average pool), got H={nhw[1]}, W={nhw[2]}")
    c = x.shape[1]
    check_channel_vectors(op, x, (("scale", scale), ("shift", shift)), ", ")
    if weight.dim() != 2 or weight.shape[1] != c or weight.dtype != x.dtype or weight.device != x.device:
        raise RuntimeError(f"{op}: expected weight of shape (out_channels, {c}) and dtype {x.dtype} on "
                           f"{x.device}, got {tuple(weight.shape)} {weight.dtype} on {weight.device}")


def _check_out(out, x, weight, nhw):
    op = "bnrelu_avgpool_conv1x1_fwd"
    n, h, w = nhw
    mo, cout = n * (h // 2) * (w // 2), weight.shape[0]
    if (out.shape != (mo, cout) or out.dtype != x.dtype or out.device != x.device
            or (cout > 1 and out.stride(1) != 1) or (mo > 1 and out.stride(0) < cout)):
        raise RuntimeError(f"{op}: expected out of shape ({mo}, {cout}) and dtype {x.dtype} on {x.device} with unit "
                           f"channel stride and non-overlapping rows, got {tuple(out.shape)} {out.dtype} on "
                           f"{out.device} strides {out.stride()}")


def _check_bwd(dout, x, weight, nhw, mean, rstd):
    op = "bnrelu_avgpool_conv1x1_bwd"
    n, h, w = nhw
    mo = n * (h // 2) * (w // 2)
    if dout.shape != (mo, weight.shape[0]) or dout.dtype != x.dtype or (dout.shape[1] > 1 and dout.stride(1) != 1):
        raise RuntimeError(f"{op}: expected dout of shape ({mo}, {weight.shape[0]}) and dtype {x.dtype} with unit "
                           f"channel stride, got {tuple(dout.shape)} {dout.dtype} strides {dout.stride()}")
    check_channel_vectors(op, x, (("mean", mean), ("rstd", rstd)), " and ")


# ----------------------------------------------------------------------------- ATen (float64 on CUDA)
def _pooled_activation(x, scale, shift, nhw):
    """(the 2x2 average pool of relu(x*scale + shift) as (N*(H/2)*(W/2), C) rows, the activation (N, H, W, C))."""
    n, h, w = nhw
    c = x.shape[1]
    a = torch.relu(torch.addcmul(shift, x.to(scale.dtype), scale)).view(n, h, w, c)
    return a[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4)).reshape(-1, c), a


def aten_fwd(x, scale, shift, weight, nhw, out):
    """ATen forward: the float64 CUDA path."""
    _check(x, scale, shift, weight, nhw, "bnrelu_avgpool_conv1x1_fwd")
    _check_out(out, x, weight, nhw)
    torch.mm(_pooled_activation(x, scale, shift, nhw)[0].to(x.dtype), weight.t(), out=out)


def aten_bwd(dout, x, scale, shift, weight, nhw, mean, rstd, batch_stats):
    """ATen backward: the float64 CUDA path."""
    _check(x, scale, shift, weight, nhw, "bnrelu_avgpool_conv1x1_bwd")
    _check_bwd(dout, x, weight, nhw, mean, rstd)
    n, h, w = nhw
    c = x.shape[1]
    acc = scale.dtype
    pooled, act = _pooled_activation(x, scale, shift, nhw)
    db = dout.to(acc)
    dweight = db.t() @ pooled.to(x.dtype).to(acc)
    if h % 2 or w % 2:
        # the pixels the floor dropped (gradient 0): torch's transition convolves before it pools, so its
        # dweight[:, c] also holds 0*relu(y) there, NaN where relu(y) is NaN or +Inf
        z = (act[:, h // 2 * 2:] * 0).sum((0, 1, 2)) + (act[:, :h // 2 * 2, w // 2 * 2:] * 0).sum((0, 1, 2))
        dweight = torch.where(z.isnan(), z, dweight)
    da = (db @ weight.to(acc)).view(n, h // 2, 1, w // 2, 1, c) * 0.25
    d = torch.zeros((n, h, w, c), dtype=acc, device=x.device)  # 0 on the pixels the floor dropped
    d[:, :h // 2 * 2, :w // 2 * 2] = da.expand(n, h // 2, 2, w // 2, 2, c).reshape(n, h // 2 * 2, w // 2 * 2, c)
    dx, dgamma, dbeta = aten_bn_grad(d.view(-1, c), x, scale, shift, mean, rstd, batch_stats)
    return dx, dweight, dgamma, dbeta


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _window_base(r, H, W, HO, WO):
    """Row of x (NHWC pixel index) of the top-left pixel of pooled row r, as int64."""
    r64 = r.to(tl.int64)
    img = r64 // (HO * WO)
    rem = r64 % (HO * WO)
    return (img * H + 2 * (rem // WO)) * W + 2 * (rem % WO)


@triton.jit
def _pooled_tile(X, ldx, base, W, rk, mask, s, h):
    """avgpool2x2(relu(x*scale + shift)) of a (pooled rows, channels) tile in fp32 (0 off ``mask``)."""
    p = X + base[:, None] * ldx + rk[None, :]
    y = tl.load(p, mask=mask, other=0.0).to(tl.float32) * s[None, :] + h[None, :]
    a = tl.where(y <= 0.0, 0.0, y)  # relu keeping a NaN, as torch's
    y = tl.load(p + ldx, mask=mask, other=0.0).to(tl.float32) * s[None, :] + h[None, :]
    a += tl.where(y <= 0.0, 0.0, y)
    y = tl.load(p + W * ldx, mask=mask, other=0.0).to(tl.float32) * s[None, :] + h[None, :]
    a += tl.where(y <= 0.0, 0.0, y)
    y = tl.load(p + (W + 1) * ldx, mask=mask, other=0.0).to(tl.float32) * s[None, :] + h[None, :]
    a += tl.where(y <= 0.0, 0.0, y)
    return tl.where(mask, a * 0.25, 0.0)


@triton.jit
def _fwd_kernel(X, ldx, SCALE, SHIFT, Wt, ldw, OUT, ldo, MO, C, COUT, H, W, HO, WO,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < MO
    col_ok = rn < COUT
    base = _window_base(tl.where(row_ok, rm, 0), H, W, HO, WO)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < C
        s = tl.load(SCALE + rk, mask=k_ok, other=0.0)
        h = tl.load(SHIFT + rk, mask=k_ok, other=0.0)
        a = _pooled_tile(X, ldx, base, W, rk, row_ok[:, None] & k_ok[None, :], s, h).to(X.dtype.element_ty)
        wt = tl.load(Wt + rn[None, :] * ldw + rk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    tl.store(OUT + rm.to(tl.int64)[:, None] * ldo + rn[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dw_kernel(DOUT, lddo, X, ldx, SCALE, SHIFT, PDW, MO, C, COUT, H, W, HO, WO, SPLITS,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """Per-split partial of dW[n-tile, c-tile] = dout^T @ pooled activation (recomputed)."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    tiles_per_split = tl.cdiv(tl.cdiv(MO, BLOCK_M), SPLITS)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n_ok = rn < COUT
    c_ok = rc < C
    s = tl.load(SCALE + rc, mask=c_ok, other=0.0)
    h = tl.load(SHIFT + rc, mask=c_ok, other=0.0)
    dw = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for i in range(0, tiles_per_split):
        rm = (split * tiles_per_split + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rm < MO
        base = _window_base(tl.where(r_ok, rm, 0), H, W, HO, WO)
        a = _pooled_tile(X, ldx, base, W, rc, r_ok[:, None] & c_ok[None, :], s, h).to(X.dtype.element_ty)
        db = tl.load(DOUT + rm.to(tl.int64)[:, None] * lddo + rn[None, :], mask=r_ok[:, None] & n_ok[None, :],
                     other=0.0)
        dw = tl.dot(tl.trans(db), a, dw, input_precision=PRECISION)
    tl.store(PDW + split * COUT * C + rn[:, None] * C + rc[None, :], dw, mask=n_ok[:, None] & c_ok[None, :])


@triton.jit
def _dx_kernel(DOUT, lddo, X, ldx, SCALE, SHIFT, Wt, ldw, MEAN, RSTD, P, Q, DX, PSG, PSGX, MO, C, COUT, H, W, HO, WO,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PASS: tl.constexpr,
               BATCH: tl.constexpr, PRECISION: tl.constexpr):
    """g = (dout @ W)/4 on the 4 pixels of each window of a (pooled rows, channels) tile, times the
    ReLU mask.  Pass 1: per-tile partial sums of g and g*xhat (and dx = scale*g without batch
    statistics); pass 2: dx = scale*g - P - (x - mean)*Q."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rm < MO
    c_ok = rc < C
    rm64 = rm.to(tl.int64)
    da = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, COUT, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < COUT
        db = tl.load(DOUT + rm64[:, None] * lddo + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(Wt + rn[:, None] * ldw + rc[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        da = tl.dot(db, w, da, input_precision=PRECISION)
    da = da * 0.25
    s, h, mu, rs, pp, qq = load_bn_vectors(SCALE, SHIFT, MEAN, RSTD, P, Q, rc, c_ok)
    mask = r_ok[:, None] & c_ok[None, :]
    base = _window_base(tl.where(r_ok, rm, 0), H, W, HO, WO)
    sg = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sgx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for q in tl.static_range(4):
        pix = base + (q // 2) * W + (q % 2)
        sg, sgx = bn_grad_tile(X, ldx, DX, C, pix, rc, mask, da, s, h, mu, rs, pp, qq, sg, sgx, PASS, BATCH)
    if PASS == 1:
        tl.store(PSG + pid_m * C + rc, sg, mask=c_ok)
        tl.store(PSGX + pid_m * C + rc, sgx, mask=c_ok)


@triton.jit
def _dropped_pixel(k, H, W, HO, WO):
    """Row of x (NHWC pixel index, int64) of the k-th pixel the floor drops: per image, first the last
    column of rows [0, 2*HO) (odd W), then the last row (odd H)."""
    k64 = k.to(tl.int64)
    col = W - 2 * WO  # 1 for odd W, else 0
    per_image = 2 * HO * col + (H - 2 * HO) * W
    img = k64 // per_image
    j = k64 % per_image
    j2 = j - 2 * HO * col
    pix = tl.where(j2 < 0, j * W + W - 1, (2 * HO + j2 // W) * W + j2 % W)
    return img * (H * W) + pix


@triton.jit
def _dropped_kernel(X, ldx, SCALE, SHIFT, MEAN, RSTD, P, Q, DX, DGAMMA, DWEIGHT, ND, C, COUT, H, W, HO, WO,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BATCH: tl.constexpr):
    """The ND pixels the floor dropped (last row / column of odd H / W), where g = 0.  Batch statistics:
    dx = -P - (x - mean)*Q.  Running statistics (dx = 0 there already): the terms torch's transition
    (convolution, then the pool) has there and the other kernels never read, dgamma += 0*xhat and
    dweight[:, c] += 0*relu(x*scale + shift): 0, or NaN where x is not finite; ``+= NaN`` is a store of
    NaN, so racing programs agree and nothing is written in the finite case."""
    rk = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    k_ok = rk < ND
    c_ok = rc < C
    pix = _dropped_pixel(tl.where(k_ok, rk, 0), H, W, HO, WO)
    mask = k_ok[:, None] & c_ok[None, :]
    x = tl.load(X + pix[:, None] * ldx + rc[None, :], mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(MEAN + rc, mask=c_ok, other=0.0)
    if BATCH:
        pp = tl.load(P + rc, mask=c_ok, other=0.0)
        qq = tl.load(Q + rc, mask=c_ok, other=0.0)
        dx = -pp[None, :] - (x - mu[None, :]) * qq[None, :]
        tl.store(DX + pix[:, None] * C + rc[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    else:
        s = tl.load(SCALE + rc, mask=c_ok, other=0.0)
        h = tl.load(SHIFT + rc, mask=c_ok, other=0.0)
        rs = tl.load(RSTD + rc, mask=c_ok, other=0.0)
        y = x * s[None, :] + h[None, :]
        zg = tl.sum(0.0 * ((x - mu[None, :]) * rs[None, :]), axis=0)
        zw = tl.sum(0.0 * tl.where(y <= 0.0, 0.0, y), axis=0)  # relu keeping a NaN, as torch's
        nan = tl.full((BLOCK_C,), float("nan"), tl.float32)
        tl.store(DGAMMA + rc, nan, mask=c_ok & (zg != zg))
        for n0 in range(0, COUT, BLOCK_M):
            rn = n0 + tl.arange(0, BLOCK_M)
            tl.store(DWEIGHT + rn[:, None] * C + rc[None, :], tl.broadcast_to(nan[None, :], (BLOCK_M, BLOCK_C)),
                     mask=(rn < COUT)[:, None] & (c_ok & (zw != zw))[None, :])


# ----------------------------------------------------------------------------- launchers
# Tiles: ``tiles.TRANSITION_FWD`` / ``TRANSITION_DW`` / ``TRANSITION_DX`` (fixed per dtype and dot
# precision; small under the interpreter).
def triton_fwd(x, scale, shift, weight, nhw, out):
    """Triton forward launcher (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1): writes ``out``."""
    _check(x, scale, shift, weight, nhw, "bnrelu_avgpool_conv1x1_fwd")
    _check_out(out, x, weight, nhw)
    if x.dtype == torch.float64:
        raise RuntimeError("bnrelu_avgpool_conv1x1_fwd: the Triton kernel takes float32/float16/bfloat16; "
                           "float64 runs aten_fwd")
    n, h, w = nhw
    mo, c, cout = n * (h // 2) * (w // 2), x.shape[1], weight.shape[0]
    if mo == 0:
        return
    if c == 0:
        out.zero_()
        return
    prec = dot_precision(x.dtype)
    t = choose(TRANSITION_FWD, x, dtype=x.dtype, precision=prec).kwargs
    launch(_fwd_kernel, (cdiv(mo, t["BLOCK_M"]), cdiv(cout, t["BLOCK_N"])), (x, x.stride(0), scale, shift, weight,
        weight.stride(0), out, out.stride(0), mo, c, cout, h, w, h // 2, w // 2), **t, PRECISION=prec)


def triton_bwd(dout, x, scale, shift, weight, nhw, mean, rstd, batch_stats):
    """Triton backward launcher (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(x, scale, shift, weight, nhw, "bnrelu_avgpool_conv1x1_bwd")
    _check_bwd(dout, x, weight, nhw, mean, rstd)
    if x.dtype == torch.float64:
        raise RuntimeError("bnrelu_avgpool_conv1x1_bwd: the Triton kernel takes float32/float16/bfloat16; "
                           "float64 runs aten_bwd")
    n, h, w = nhw
    ho, wo = h // 2, w // 2
    m, c = x.shape
    mo, cout = n * ho * wo, weight.shape[0]
    dropped = h != 2 * ho or w != 2 * wo
    dx = torch.zeros((m, c), dtype=x.dtype, device=x.device) if dropped and not batch_stats else x.new_empty((m, c))
    if mo == 0 or c == 0:
        z = torch.zeros(c, dtype=torch.float32, device=x.device)
        return dx.zero_(), torch.zeros((cout, c), dtype=torch.float32, device=x.device), z, z.clone()
    prec = dot_precision(x.dtype)
    t = choose(TRANSITION_DW, x, dtype=x.dtype, precision=prec, mo=mo)
    splits = t.splits
    pdw = torch.empty((splits, cout, c), dtype=torch.float32, device=x.device)
    launch(_dw_kernel, (cdiv(cout, t.kwargs["BLOCK_N"]), cdiv(c, t.kwargs["BLOCK_C"]), splits), (dout,
        dout.stride(0), x, x.stride(0), scale, shift, pdw, mo, c, cout, h, w, ho, wo, splits), **t.kwargs,
        PRECISION=prec)
    t = choose(TRANSITION_DX, x, dtype=x.dtype, precision=prec).kwargs
    bc = t["BLOCK_C"]
    dweight = pdw.sum(0)  # fixed order over the splits
    tiles = cdiv(mo, t["BLOCK_M"])
    grid = (tiles, cdiv(c, bc))
    args = (dout, dout.stride(0), x, x.stride(0), scale, shift, weight, weight.stride(0), mean, rstd)
    geo = (mo, c, cout, h, w, ho, wo)

    def dx_pass(p, q, psg, psgx, pass_, batch):  # the partial sums per tile of pooled rows
        launch(_dx_kernel, grid, (*args, p, q, dx, psg, psgx, *geo), **t, PASS=pass_, BATCH=batch, PRECISION=prec)

    dgamma, dbeta, p, q = bn_grad_passes(dx_pass, tiles, x, scale, rstd, batch_stats)
    if dropped:
        nd = m - 4 * mo  # the pixels the floor dropped
        bmd = 32 if interpreted(x) else 64
        if not batch_stats:
            p = q = mean  # P and Q are not read with running statistics
        launch(_dropped_kernel, (cdiv(nd, bmd), cdiv(c, bc)), (x, x.stride(0), scale, shift, mean, rstd,
            p, q, dx, dgamma, dweight, nd, c, cout, h, w, ho, wo), BLOCK_M=bmd, BLOCK_C=bc, BATCH=batch_stats,
            num_warps=4)
    return dx, dweight, dgamma, dbeta


def cuda_fwd(x, scale, shift, weight, nhw, out):
    if x.dtype == torch.float64:
        aten_fwd(x, scale, shift, weight, nhw, out)
    else:
        triton_fwd(x, scale, shift, weight, nhw, out)


def cuda_bwd(dout, x, scale, shift, weight, nhw, mean, rstd, batch_stats):
    if x.dtype == torch.float64:
        return aten_bwd(dout, x, scale, shift, weight, nhw, mean, rstd, batch_stats)
    return triton_bwd(dout, x, scale, shift, weight, nhw, mean, rstd, batch_stats)


_lib.impl("bnrelu_avgpool_conv1x1_fwd", on_tensor_device(cuda_fwd), "CUDA")
_lib.impl("bnrelu_avgpool_conv1x1_bwd", on_tensor_device(cuda_bwd), "CUDA")


# The tensor arguments each Triton kernel of this file writes ("w") or reads and writes ("rw"); every other
# tensor argument is read (what `densenet-fused cost` counts as a launch's traffic).
TRITON_WRITES = {
    "_fwd_kernel": {"OUT": "w"},
    "_dw_kernel": {"PDW": "w"},
    "_dx_kernel": {"DX": "w", "PSG": "w", "PSGX": "w"},
    "_dropped_kernel": {"DX": "w", "DGAMMA": "w", "DWEIGHT": "w"},
}
