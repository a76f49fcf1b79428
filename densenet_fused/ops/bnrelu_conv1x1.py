"""bnrelu_conv1x1: ``out = relu(x*scale + shift) @ W^T`` straight from the shared buffer,
and its one-pass backward (docs/design.md section 2 facts 1-3, section 3 steps 2 and 4).

- CPU kernel: ``csrc/cpu/bnrelu_conv1x1.cpp``.
- CUDA kernel: the Triton kernels below (float32, float16, bfloat16).  The BN-ReLU
  prologue is applied to every A tile as it is loaded, so the normalized input never
  exists in memory; the forward epilogue emits per-tile (mean, M2) partials of the output
  that ``_triton_common.stats_merge_kernel`` merges (Chan) in a fixed order; the backward reads x once,
  accumulates ``scale*g`` into G, and writes per-split partials of dW and of the two
  per-channel sums that are reduced in a fixed order.  No atomics, no host
  synchronization, workspace sizes depend on shapes only (CUDA-graph capturable).
  float64 on CUDA, and float32 without TF32, run ``fwd_chunked`` / ``bwd_chunked`` (cuBLAS
  GEMMs over row chunks; ``_triton_common.cuda_gemm_impl`` decides): accuracy modes, not speed
  ones (Triton's full-fp32 ``tl.dot`` is FMAs with heavy register spills).
Under ``TRITON_INTERPRET=1`` the Triton launchers run on CPU tensors (the CI tests).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import launch
from .plan import alloc
from .options import Accumulate, FoldBN, GradFinish, lowered
from ._common import acc_dtype, cdiv, next_pow2, on_tensor_device
from ._triton_common import bnrelu_tile, cuda_gemm_impl, dot_precision, merge_stats, store_tile_stats
from .bn_scale_shift import bn_scale_shift
from .channel_stats import channel_stats
from .tiles import CONV1X1_BWD, CONV1X1_FWD, autotuned, choose

_CHUNK_ROWS = 16384
_lib = torch.library.Library("densenet_fused", "IMPL")


# ----------------------------------------------------------------------------- fakes
@torch.library.register_fake("densenet_fused::bnrelu_conv1x1_fwd")
def _(x, scale, shift, weight, stats, bn_out=None, bn_gamma=None, bn_beta=None, bn_eps=0.0):
    m = x.shape[0]
    cout = weight.shape[0]
    acc = acc_dtype(x.dtype)
    n = cout if stats else 0
    return x.new_empty((m, cout)), x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc)


@torch.library.register_fake("densenet_fused::bnrelu_conv1x1_bwd")
def _(dout, x, weight, bn, G, pq=None, count=0, finish=None):
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    return (x.new_empty((weight.shape[0], c), dtype=acc), x.new_empty(c, dtype=acc),
            x.new_empty(c, dtype=acc))


def bnrelu_conv1x1_fwd(x, scale, shift, weight, stats: bool = False, *, fold: Optional[FoldBN] = None):
    """(out, mean, var): out = relu(x*scale+shift) @ weight^T; mean/var of out when stats.  With ``fold``
    (stats=True), also the folded map (scale, shift, rstd) of the BatchNorm that normalizes out with those
    statistics, written into ``fold.out`` (3, Cout)."""
    return torch.ops.densenet_fused.bnrelu_conv1x1_fwd(x, scale, shift, weight, stats, *(fold or _NO_FOLD))


def _check_bn_out(x, cout, stats, bn_out, gamma, beta, eps):
    op = "bnrelu_conv1x1_fwd"
    given = [t is not None for t in (bn_out, gamma, beta)]
    if not any(given):
        return
    if not all(given):
        raise RuntimeError(f"{op}: expected bn_out, bn_gamma and bn_beta together (or none)")
    if not stats:
        raise RuntimeError(f"{op}: expected stats=True with bn_out")
    acc = acc_dtype(x.dtype)
    if bn_out.shape != (3, cout) or bn_out.stride(1) != 1 or bn_out.dtype != acc:
        raise RuntimeError(f"{op}: expected bn_out of shape (3, {cout}) with unit column stride and dtype {acc}, "
                           f"got {tuple(bn_out.shape)} {bn_out.dtype} strides {bn_out.stride()}")
    for name, t in (("bn_gamma", gamma), ("bn_beta", beta)):
        if t.shape != (cout,) or not t.is_floating_point():
            raise RuntimeError(f"{op}: expected {name} to be a 1-D floating tensor of {cout} channels, got "
                               f"{tuple(t.shape)} {t.dtype}")
    if eps < 0:
        raise RuntimeError(f"{op}: expected bn_eps >= 0, got {eps}")


def bnrelu_conv1x1_bwd(dout, x, scale, shift, weight, mean, rstd, G, *, accumulate: Optional[Accumulate] = None,
                       finish: Optional[GradFinish] = None):
    """(dweight, dgamma, dbeta); accumulates scale * g into G in place, and with ``accumulate`` also
    P += scale*dbeta/count, Q += scale*rstd*dgamma/count.  With ``finish`` (its scale given), dout is the fp32
    gradient g2 after BN2's ReLU and the gradient used is its BatchNorm input gradient
    dB = scale*dout - p - (x - mean)*q in x's dtype, formed tile by tile (bn_grad_finish's)."""
    pq, count = ([accumulate.P, accumulate.Q], accumulate.count) if accumulate is not None else (None, 0)
    if accumulate is not None and (accumulate.P is None or accumulate.Q is None):
        raise RuntimeError("bnrelu_conv1x1_bwd: expected P and Q together in accumulate=Accumulate(P, Q, count)")
    if finish is not None and any(t is None for t in finish):
        raise RuntimeError("bnrelu_conv1x1_bwd: expected finish=GradFinish(x, mean, p, q, scale): all five, the "
                           "scale included")
    return torch.ops.densenet_fused.bnrelu_conv1x1_bwd(dout, x, weight, [scale, shift, mean, rstd], G, pq, count,
                                                       None if finish is None else list(finish))


def _check(x, scale, shift, weight, op):
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise RuntimeError(f"{op}: expected x to be a 2-D (rows, channels) matrix with unit channel stride, "
                           f"got shape {tuple(x.shape)} strides {x.stride()}")
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape != (c,) or t.dtype != acc or t.device != x.device:
            raise RuntimeError(f"{op}: expected {name} to be a 1-D tensor of {c} channels, dtype {acc} on "
                               f"{x.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    if weight.dim() != 2 or weight.shape[1] != c or weight.dtype != x.dtype or weight.device != x.device:
        raise RuntimeError(f"{op}: expected weight of shape (out_channels, {c}) and dtype {x.dtype} on "
                           f"{x.device}, got {tuple(weight.shape)} {weight.dtype} on {weight.device}")


def _check_pq(P, Q, count, c, acc):
    if (P is None) != (Q is None):
        raise RuntimeError("bnrelu_conv1x1_bwd: expected P and Q together (or neither)")
    if P is None:
        return
    for name, t in (("P", P), ("Q", Q)):
        if t.shape != (c,) or t.dtype != acc:
            raise RuntimeError(f"bnrelu_conv1x1_bwd: expected {name} to be a 1-D tensor of {c} channels and "
                               f"dtype {acc}, got {tuple(t.shape)} {t.dtype}")
    if count <= 0:
        raise RuntimeError(f"bnrelu_conv1x1_bwd: expected count > 0 (values per channel) with P and Q, got {count}")


def _check_bwd(dout, x, weight, mean, rstd, G, fin=(None,) * 5):
    op = "bnrelu_conv1x1_bwd"
    m, c = x.shape
    cout = weight.shape[0]
    acc = acc_dtype(x.dtype)
    given = sum(t is not None for t in fin)
    if given not in (0, 5):
        raise RuntimeError(f"{op}: expected db_b, db_mean, db_p, db_q and db_scale together (or none), got {given} "
                           f"of them")
    dout_dtype = acc if given else x.dtype
    if dout.shape != (m, cout) or dout.dtype != dout_dtype or (dout.shape[1] > 1 and dout.stride(1) != 1):
        raise RuntimeError(f"{op}: expected dout of shape ({m}, {cout}) and dtype {dout_dtype}"
                           f"{' (the fp32 gradient g2 when db_b is given)' if given else ''} with unit "
                           f"channel stride, got {tuple(dout.shape)} {dout.dtype} strides {dout.stride()}")
    if given:
        db_b = fin[0]
        if db_b.shape != (m, cout) or db_b.dtype != x.dtype or (cout > 1 and db_b.stride(1) != 1) \
                or db_b.device != x.device:
            raise RuntimeError(f"{op}: expected db_b of shape ({m}, {cout}) and dtype {x.dtype} on {x.device} with "
                               f"unit channel stride, got {tuple(db_b.shape)} {db_b.dtype} on {db_b.device} "
                               f"strides {db_b.stride()}")
        for name, t in zip(("db_mean", "db_p", "db_q", "db_scale"), fin[1:]):
            if t.shape != (cout,) or t.dtype != acc or t.device != x.device or (cout > 1 and t.stride(0) != 1):
                raise RuntimeError(f"{op}: expected {name} to be a contiguous 1-D tensor of {cout} channels, dtype "
                                   f"{acc} on {x.device}, got {tuple(t.shape)} {t.dtype} on {t.device} "
                                   f"strides {t.stride()}")
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.shape != (c,) or t.dtype != acc:
            raise RuntimeError(f"{op}: expected {name} to be a 1-D tensor of {c} channels and dtype {acc}, "
                               f"got {tuple(t.shape)} {t.dtype}")
    if G.shape != (m, c) or G.dtype != acc or (c > 1 and G.stride(1) != 1):
        raise RuntimeError(f"{op}: expected G of shape ({m}, {c}) and dtype {acc} with unit channel stride, "
                           f"got {tuple(G.shape)} {G.dtype} strides {G.stride()}")


def _check_bwd_args(dout, x, scale, shift, weight, mean, rstd, G, P, Q, count, fin):
    """Every check of the backward's arguments (``fin``: db_b, db_mean, db_p, db_q, db_scale)."""
    _check(x, scale, shift, weight, "bnrelu_conv1x1_bwd")
    _check_bwd(dout, x, weight, mean, rstd, G, fin)
    _check_pq(P, Q, count, x.shape[1], scale.dtype)


# ----------------------------------------------------------------------------- ATen (float64 on CUDA)
def fwd_chunked(x, scale, shift, weight, stats, bn_out=None, bn_gamma=None, bn_beta=None, bn_eps=0.0):
    """Row-chunked ATen forward: the CUDA path of float64 and of float32 without TF32."""
    _check(x, scale, shift, weight, "bnrelu_conv1x1_fwd")
    _check_bn_out(x, weight.shape[0], stats, bn_out, bn_gamma, bn_beta, bn_eps)
    m = x.shape[0]
    out = x.new_empty((m, weight.shape[0]))
    wt = weight.t()
    for r0 in range(0, m, _CHUNK_ROWS):
        xs = x[r0:r0 + _CHUNK_ROWS].to(scale.dtype)
        a = torch.relu(torch.addcmul(shift, xs, scale)).to(x.dtype)
        torch.mm(a, wt, out=out[r0:r0 + _CHUNK_ROWS])
    if not stats:
        acc = acc_dtype(x.dtype)
        return out, x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)
    mean, var, _ = channel_stats(out, 0.0)
    if bn_out is not None:
        bn_out.copy_(torch.stack(bn_scale_shift(bn_gamma, bn_beta, mean, var, bn_eps)))
    return out, mean, var


def bwd_chunked(dout, x, scale, shift, weight, mean, rstd, G, P=None, Q=None, count=0, db_b=None, db_mean=None,
                db_p=None, db_q=None, db_scale=None):
    """Row-chunked ATen backward: the CUDA path of float64 and of float32 without TF32."""
    _check_bwd_args(dout, x, scale, shift, weight, mean, rstd, G, P, Q, count, (db_b, db_mean, db_p, db_q, db_scale))
    acc = scale.dtype
    c = x.shape[1]
    dweight = torch.zeros((weight.shape[0], c), dtype=acc, device=x.device)
    dgamma = torch.zeros(c, dtype=acc, device=x.device)
    dbeta = torch.zeros(c, dtype=acc, device=x.device)
    w = weight.to(acc)
    for r0 in range(0, x.shape[0], _CHUNK_ROWS):
        if db_b is None:
            db = dout[r0:r0 + _CHUNK_ROWS].to(acc)
        else:  # bn_grad_finish's dB, rounded to x's dtype
            bs = db_b[r0:r0 + _CHUNK_ROWS].to(acc)
            db = (dout[r0:r0 + _CHUNK_ROWS] * db_scale - db_p - torch.where(db_q == 0, 0, (bs - db_mean) * db_q))
            db = db.to(x.dtype).to(acc)
        xs = x[r0:r0 + _CHUNK_ROWS].to(acc)
        y = torch.addcmul(shift, xs, scale)
        on = ~(y <= 0)  # torch's relu backward: a NaN passes
        g = torch.where(on, db @ w, 0)
        G[r0:r0 + _CHUNK_ROWS].addcmul_(g, scale)
        dbeta += g.sum(0)
        dgamma += (g * (xs - mean) * rstd).sum(0)
        a = torch.where(on, y, 0).to(x.dtype).to(acc)
        dweight.addmm_(db.t(), a)
    if P is not None:
        P.add_(scale * dbeta / count)
        Q.add_(scale * rstd * dgamma / count)
    return dweight, dgamma, dbeta


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _fwd_kernel(X, ldx, SCALE, SHIFT, W, ldw, OUT, PMEAN, PM2, M, C, COUT, C_BUCKET,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                STATS: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < M
    col_ok = rn < COUT
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < C
        a = bnrelu_tile(X, rm64, ldx, rk, row_ok[:, None] & k_ok[None, :], SCALE, SHIFT, k_ok).to(X.dtype.element_ty)
        w = tl.load(W + rn[None, :] * ldw + rk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    out = acc.to(OUT.dtype.element_ty)
    tl.store(OUT + rm64[:, None] * COUT + rn[None, :], out, mask=row_ok[:, None] & col_ok[None, :])
    if STATS:
        store_tile_stats(out, row_ok, col_ok, rn, pid_m, M, COUT, PMEAN, PM2, BLOCK_M)


@triton.jit
def _bwd_kernel(DOUT, lddo, X, ldx, SCALE, SHIFT, W, ldw, MEAN, RSTD, G, ldg,
                PDW, PSG, PSGX, M, C, COUT, C_BUCKET, SPLITS, DB_B, lddb, DB_MEAN, DB_P, DB_Q, DB_SCALE,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, COUT_PAD: tl.constexpr,
                PRECISION: tl.constexpr, FINISH: tl.constexpr):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    TILES_PER_SPLIT = tl.cdiv(tl.cdiv(M, BLOCK_M), SPLITS)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rn = tl.arange(0, COUT_PAD)
    c_ok = rc < C
    n_ok = rn < COUT
    s = tl.load(SCALE + rc, mask=c_ok, other=0.0)
    h = tl.load(SHIFT + rc, mask=c_ok, other=0.0)
    mu = tl.load(MEAN + rc, mask=c_ok, other=0.0)
    rs = tl.load(RSTD + rc, mask=c_ok, other=0.0)
    # W[:, c-tile]: (COUT_PAD, BLOCK_C), resident for the whole split
    w = tl.load(W + rn[:, None] * ldw + rc[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
    dw = tl.zeros((COUT_PAD, BLOCK_C), dtype=tl.float32)
    sg = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sgx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if FINISH:  # BN2's per-channel input-gradient terms: dB = scale2*g2 - p2 - (b - mean2)*q2
        f_s = tl.load(DB_SCALE + rn, mask=n_ok, other=0.0)  # = scale2*g2 - q2*b + (mean2*q2 - p2): three
        f_q = tl.load(DB_Q + rn, mask=n_ok, other=0.0)      # vectors held per thread, not four (registers)
        f_c = tl.load(DB_MEAN + rn, mask=n_ok, other=0.0) * f_q - tl.load(DB_P + rn, mask=n_ok, other=0.0)
    for i in range(0, TILES_PER_SPLIT):
        rm = (split * TILES_PER_SPLIT + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rm < M
        rm64 = rm.to(tl.int64)
        dbm = r_ok[:, None] & n_ok[None, :]
        db = tl.load(DOUT + rm64[:, None] * lddo + rn[None, :], mask=dbm, other=0.0)
        if FINISH:  # DOUT = g2 (fp32): BN2's input gradient rounded to x's dtype (bn_grad_finish's, regrouped)
            bb = tl.load(DB_B + rm64[:, None] * lddb + rn[None, :], mask=dbm, other=0.0).to(tl.float32)
            bq = tl.where(f_q[None, :] == 0.0, 0.0, bb * f_q[None, :])  # none for q = 0: an Inf b stays out
            db = tl.where(dbm, db * f_s[None, :] - bq + f_c[None, :], 0.0).to(X.dtype.element_ty)
        xm = r_ok[:, None] & c_ok[None, :]
        x = tl.load(X + rm64[:, None] * ldx + rc[None, :], mask=xm, other=0.0).to(tl.float32)
        y = x * s[None, :] + h[None, :]
        on = ~(y <= 0.0) & xm  # a NaN passes, as in torch
        da = tl.dot(db, w, input_precision=PRECISION)                      # dA = dout @ W
        g = tl.where(on, da, 0.0)
        gp = G + rm64[:, None] * ldg + rc[None, :]
        tl.store(gp, tl.load(gp, mask=xm, other=0.0) + s[None, :] * g, mask=xm)
        sg += tl.sum(g, axis=0)
        sgx += tl.sum(g * ((x - mu[None, :]) * rs[None, :]), axis=0)
        a = tl.where(on, y, 0.0).to(X.dtype.element_ty)
        dw = tl.dot(tl.trans(db), a, dw, input_precision=PRECISION)     # dW += dout^T @ relu(bn(x))
    tl.store(PDW + split * COUT * C + rn[:, None] * C + rc[None, :], dw, mask=n_ok[:, None] & c_ok[None, :])
    tl.store(PSG + split * C + rc, sg, mask=c_ok)
    tl.store(PSGX + split * C + rc, sgx, mask=c_ok)


# ----------------------------------------------------------------------------- launchers
@triton.jit
def _bwd_finish_kernel(PDW, DW, NW, PSG, PSGX, SPLITS, C, SCALE, RSTD, DBETA, DGAMMA, P, Q, inv_count, W_PROGRAMS,
                       UPDATE_PQ: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK: tl.constexpr):
    """One launch reduces every per-split partial in a fixed order: programs [0, W_PROGRAMS) sum the
    dW partials into dweight (NW = Cout*C elements); the others sum the per-channel sums into
    dbeta/dgamma and, for the block, accumulate P += scale*dbeta/count, Q += scale*rstd*dgamma/count."""
    pid = tl.program_id(0)
    if pid < W_PROGRAMS:
        e = pid * BLOCK_W + tl.arange(0, BLOCK_W)  # (names differ from the other branch's: Triton types them)
        e_ok = e < NW
        dw = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for s in range(0, SPLITS):
            dw += tl.load(PDW + s * NW + e, mask=e_ok, other=0.0)
        tl.store(DW + e, dw, mask=e_ok)
    else:
        rc = (pid - W_PROGRAMS) * BLOCK + tl.arange(0, BLOCK)
        ok = rc < C
        sg = tl.zeros((BLOCK,), dtype=tl.float32)
        sgx = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, SPLITS):
            sg += tl.load(PSG + s * C + rc, mask=ok, other=0.0)
            sgx += tl.load(PSGX + s * C + rc, mask=ok, other=0.0)
        tl.store(DBETA + rc, sg, mask=ok)
        tl.store(DGAMMA + rc, sgx, mask=ok)
        if UPDATE_PQ:
            scale = tl.load(SCALE + rc, mask=ok, other=0.0)
            rstd = tl.load(RSTD + rc, mask=ok, other=0.0)
            tl.store(P + rc, tl.load(P + rc, mask=ok, other=0.0) + scale * sg * inv_count, mask=ok)
            tl.store(Q + rc, tl.load(Q + rc, mask=ok, other=0.0) + scale * rstd * sgx * inv_count, mask=ok)


# Tiles: ``tiles.CONV1X1_FWD`` / ``tiles.CONV1X1_BWD`` (candidates, their fits on the device, the
# forward's BLOCK_M and the backward's splits); autotuned on CUDA, fixed small tiles under the interpreter.
_fwd_tuned = autotuned(CONV1X1_FWD, _fwd_kernel, key=["C_BUCKET", "COUT", "STATS", "BLOCK_M", "PRECISION"],
                       cache_results=True)
_bwd_tuned = autotuned(CONV1X1_BWD, _bwd_kernel, key=["C_BUCKET", "COUT", "PRECISION", "FINISH"], restore_value=["G"],
                       cache_results=True)


def triton_fwd(x, scale, shift, weight, stats, bn_out=None, bn_gamma=None, bn_beta=None, bn_eps=0.0):
    """Triton forward launcher (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    _check(x, scale, shift, weight, "bnrelu_conv1x1_fwd")
    _check_bn_out(x, weight.shape[0], stats, bn_out, bn_gamma, bn_beta, bn_eps)
    if x.dtype == torch.float64:
        raise RuntimeError("bnrelu_conv1x1_fwd: the Triton kernel takes float32/float16/bfloat16; "
                           "float64 runs fwd_chunked")
    out, mean, var = _triton_fwd(x, scale, shift, weight, stats, bn_out, bn_gamma, bn_beta, bn_eps)
    if not stats:
        mean = var = torch.empty(0, dtype=torch.float32, device=x.device)
    return out, mean, var


def _triton_fwd(x, scale, shift, weight, stats, bn_out=None, bn_gamma=None, bn_beta=None, bn_eps=0.0):
    """triton_fwd without the checks (the block's hot path: its arguments are right by construction)."""
    m, c = x.shape
    cout = weight.shape[0]
    out = alloc((m, cout), x.dtype, x.device)  # (plan: a transient, consumed within the layer)
    t = choose(CONV1X1_FWD, x, m=m, cout=cout)
    block_m = t.kwargs["BLOCK_M"]
    tiles = cdiv(m, block_m)
    if stats:
        pmean, pm2 = alloc((2, tiles, cout), torch.float32, x.device).unbind(0)
    else:
        pmean = pm2 = out  # unused
    if m > 0:
        args = (x, x.stride(0), scale, shift, weight, weight.stride(0), out, pmean, pm2, m, c, cout,
                next_pow2(max(c, 1)))
        if not t.tuned:
            launch(_fwd_kernel, (tiles, cdiv(cout, t.kwargs["BLOCK_N"])), args, **t.kwargs,
                STATS=stats, PRECISION=dot_precision(x.dtype))
        else:
            grid = lambda meta: (tiles, cdiv(cout, meta["BLOCK_N"]))  # noqa: E731
            launch(_fwd_tuned, grid, args, **t.kwargs, STATS=stats, PRECISION=dot_precision(x.dtype))
    if not stats:
        return out, None, None
    mean, var = merge_stats(pmean, pm2, m, block_m,
                            affine=None if bn_out is None else (bn_out, bn_gamma, bn_beta, float(bn_eps)))
    return out, mean, var


def triton_bwd(dout, x, scale, shift, weight, mean, rstd, G, P=None, Q=None, count=0, db_b=None, db_mean=None,
               db_p=None, db_q=None, db_scale=None):
    """Triton one-pass backward launcher (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    fin = (db_b, db_mean, db_p, db_q, db_scale)
    _check_bwd_args(dout, x, scale, shift, weight, mean, rstd, G, P, Q, count, fin)
    if x.dtype == torch.float64:
        raise RuntimeError("bnrelu_conv1x1_bwd: the Triton kernel takes float32/float16/bfloat16; "
                           "float64 runs bwd_chunked")
    return _triton_bwd(dout, x, scale, shift, weight, mean, rstd, G, P, Q, count, *fin)


def _triton_bwd(dout, x, scale, shift, weight, mean, rstd, G, P=None, Q=None, count=0, db_b=None, db_mean=None,
                db_p=None, db_q=None, db_scale=None):
    """triton_bwd without the checks (the block's hot path)."""
    m, c = x.shape
    cout = weight.shape[0]
    cout_pad = max(16, next_pow2(cout))
    t = choose(CONV1X1_BWD, x, m=m, c=c)
    splits = t.splits
    pdw = alloc((splits, cout, c), torch.float32, x.device)
    psum = alloc((2, splits, c), torch.float32, x.device)
    psg, psgx = psum.unbind(0)
    if m > 0 and c > 0:
        args = (dout, dout.stride(0), x, x.stride(0), scale, shift, weight, weight.stride(0), mean, rstd,
                G, G.stride(0), pdw, psg, psgx, m, c, cout, next_pow2(c), splits)
        finish = db_b is not None
        args += (db_b, db_b.stride(0), db_mean, db_p, db_q, db_scale) if finish else (dout, 0, scale, scale, scale,
                                                                                      scale)  # unused
        if not t.tuned:
            launch(_bwd_kernel, (cdiv(c, t.kwargs["BLOCK_C"]), splits), args, **t.kwargs, COUT_PAD=cout_pad,
                PRECISION=dot_precision(x.dtype), FINISH=finish)
        else:
            grid = lambda meta: (cdiv(c, meta["BLOCK_C"]), splits)  # noqa: E731
            launch(_bwd_tuned, grid, args, **t.kwargs, COUT_PAD=cout_pad, PRECISION=dot_precision(x.dtype),
                FINISH=finish)
    else:
        pdw.zero_()
        psum.zero_()
    # fixed-order reductions over the splits (dweight, the sums and the block's P, Q): one launch
    dweight = alloc((cout, c), torch.float32, x.device, keep=True)
    dbeta, dgamma = alloc((2, c), torch.float32, x.device, keep=True).unbind(0)
    if c > 0:
        update = P is not None
        block_w = 1024
        w_programs = cdiv(cout * c, block_w)
        launch(_bwd_finish_kernel, (w_programs + cdiv(c, 256),), (pdw, dweight, cout * c, psg, psgx,
            splits, c, scale, rstd, dbeta, dgamma, P if update else dbeta, Q if update else dgamma,
            1.0 / count if update else 0.0, w_programs), UPDATE_PQ=update, BLOCK_W=block_w, BLOCK=256)
    return dweight, dgamma, dbeta


def cuda_fwd(x, scale, shift, weight, stats, bn_out=None, bn_gamma=None, bn_beta=None, bn_eps=0.0):
    """The CUDA implementation of the op (checked), as the dispatcher runs it."""
    if cuda_gemm_impl(x.dtype) == "aten":
        return fwd_chunked(x, scale, shift, weight, stats, bn_out, bn_gamma, bn_beta, bn_eps)
    return triton_fwd(x, scale, shift, weight, stats, bn_out, bn_gamma, bn_beta, bn_eps)


def cuda_fwd_trusted(x, scale, shift, weight, stats=False, *, fold=None):
    """cuda_fwd for the block's hot path (bnrelu_conv1x1_fwd's arguments): no argument checks, (out, None,
    None) without ``stats``."""
    if cuda_gemm_impl(x.dtype) == "aten":
        return fwd_chunked(x, scale, shift, weight, stats, *(fold or _NO_FOLD))
    return _triton_fwd(x, scale, shift, weight, stats, *(fold or _NO_FOLD))


def triton_fwd_direct(x, scale, shift, weight, stats=False, *, fold=None):
    """The Triton forward on the block's hot path, where ``ops.block_ops`` chose Triton for the step."""
    return _triton_fwd(x, scale, shift, weight, stats, *(fold or _NO_FOLD))


def cuda_bwd(dout, x, scale, shift, weight, mean, rstd, G, P=None, Q=None, count=0, db_b=None, db_mean=None,
             db_p=None, db_q=None, db_scale=None):
    """The CUDA implementation of the op (checked), as the dispatcher runs it."""
    fin = (db_b, db_mean, db_p, db_q, db_scale)
    if cuda_gemm_impl(x.dtype) == "aten":
        return bwd_chunked(dout, x, scale, shift, weight, mean, rstd, G, P, Q, count, *fin)
    return triton_bwd(dout, x, scale, shift, weight, mean, rstd, G, P, Q, count, *fin)


def cuda_bwd_trusted(dout, x, scale, shift, weight, mean, rstd, G, *, accumulate=None, finish=None):
    """cuda_bwd for the block's hot path (bnrelu_conv1x1_bwd's arguments): no argument checks."""
    impl = bwd_chunked if cuda_gemm_impl(x.dtype) == "aten" else _triton_bwd
    return impl(dout, x, scale, shift, weight, mean, rstd, G, *(accumulate or _NO_ACCUMULATE), *(finish or ()))


def triton_bwd_direct(dout, x, scale, shift, weight, mean, rstd, G, *, accumulate=None, finish=None):
    """The Triton backward on the block's hot path, where ``ops.block_ops`` chose Triton for the step."""
    return _triton_bwd(dout, x, scale, shift, weight, mean, rstd, G, *(accumulate or _NO_ACCUMULATE),
                       *(finish or ()))


def _cuda_bwd_op(dout, x, weight, bn, G, pq=None, count=0, finish=None):
    """The registered backward (its schema's lists, csrc/ops.cpp) on CUDA: cuda_bwd."""
    scale, shift, mean, rstd = lowered("bnrelu_conv1x1_bwd", "bn", bn, ("scale", "shift", "mean", "rstd"))
    P, Q = lowered("bnrelu_conv1x1_bwd", "pq", pq, ("P", "Q"), optional=True)
    fin = lowered("bnrelu_conv1x1_bwd", "finish", finish, ("b", "mean", "p", "q", "scale"), optional=True)
    return cuda_bwd(dout, x, scale, shift, weight, mean, rstd, G, P, Q, count, *fin)


_NO_FOLD = (None, None, None, 0.0)  # bn_out, bn_gamma, bn_beta, bn_eps of the launchers
_NO_ACCUMULATE = (None, None, 0)    # P, Q, count
_lib.impl("bnrelu_conv1x1_fwd", on_tensor_device(cuda_fwd), "CUDA")
_lib.impl("bnrelu_conv1x1_bwd", on_tensor_device(_cuda_bwd_op), "CUDA")


# The tensor arguments each Triton kernel of this file writes ("w") or reads and writes ("rw"); every other
# tensor argument is read (what `densenet-fused cost` counts as a launch's traffic).
TRITON_WRITES = {
    "_fwd_kernel": {"OUT": "w", "PMEAN": "w", "PM2": "w"},
    "_bwd_kernel": {"G": "rw", "PDW": "w", "PSG": "w", "PSGX": "w"},
    "_bwd_finish_kernel": {"DW": "w", "DBETA": "w", "DGAMMA": "w", "P": "rw", "Q": "rw"},
}
