"""bnrelu_conv1x1: ``out = relu(x*scale + shift) @ W^T`` straight from the shared buffer,
and its one-pass backward (DESIGN section 3, steps 2 and 4).

Kernels: ``csrc/cpu/bnrelu_conv1x1.cpp`` (CPU).  CUDA: row-chunked ATen kernels below
(registered for the CUDA dispatch key), which never hold more than one chunk of the
normalized input; the Triton kernels of the 1x1 issue replace them.
"""
import torch

from ._common import acc_dtype
from .channel_stats import channel_stats

_CHUNK_ROWS = 16384
_lib = torch.library.Library("densenet_fused", "IMPL")


@torch.library.register_fake("densenet_fused::bnrelu_conv1x1_fwd")
def _(x, scale, shift, weight, stats):
    m = x.shape[0]
    cout = weight.shape[0]
    acc = acc_dtype(x.dtype)
    n = cout if stats else 0
    return x.new_empty((m, cout)), x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc)


@torch.library.register_fake("densenet_fused::bnrelu_conv1x1_bwd")
def _(dout, x, scale, shift, weight, mean, rstd, G):
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    return (x.new_empty((weight.shape[0], c), dtype=acc), x.new_empty(c, dtype=acc),
            x.new_empty(c, dtype=acc))


def bnrelu_conv1x1_fwd(x, scale, shift, weight, stats: bool = False):
    """(out, mean, var): out = relu(x*scale+shift) @ weight^T; mean/var of out when stats."""
    return torch.ops.densenet_fused.bnrelu_conv1x1_fwd(x, scale, shift, weight, stats)


def bnrelu_conv1x1_bwd(dout, x, scale, shift, weight, mean, rstd, G):
    """(dweight, dgamma, dbeta); accumulates scale * g into G in place."""
    return torch.ops.densenet_fused.bnrelu_conv1x1_bwd(dout, x, scale, shift, weight, mean, rstd, G)


def _check(x, scale, shift, weight, op):
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise RuntimeError(f"{op}: expected x to be a 2-D (rows, channels) matrix with unit channel stride, "
                           f"got shape {tuple(x.shape)} strides {x.stride()}")
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape != (c,) or t.dtype != acc or t.device != x.device:
            raise RuntimeError(f"{op}: expected {name} of shape ({c},), dtype {acc} on {x.device}, "
                               f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    if weight.dim() != 2 or weight.shape[1] != c or weight.dtype != x.dtype or weight.device != x.device:
        raise RuntimeError(f"{op}: expected weight of shape (out_channels, {c}) and dtype {x.dtype} on "
                           f"{x.device}, got {tuple(weight.shape)} {weight.dtype} on {weight.device}")


def fwd_chunked(x, scale, shift, weight, stats):
    """Row-chunked ATen forward (the CUDA kernel until the Triton kernels land)."""
    _check(x, scale, shift, weight, "bnrelu_conv1x1_fwd")
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
    return out, mean, var


def bwd_chunked(dout, x, scale, shift, weight, mean, rstd, G):
    """Row-chunked ATen backward (the CUDA kernel until the Triton kernels land)."""
    _check(x, scale, shift, weight, "bnrelu_conv1x1_bwd")
    acc = scale.dtype
    c = x.shape[1]
    if G.shape != x.shape or G.dtype != acc:
        raise RuntimeError(f"bnrelu_conv1x1_bwd: expected G of shape {tuple(x.shape)} and dtype {acc}, "
                           f"got {tuple(G.shape)} {G.dtype}")
    dweight = torch.zeros((weight.shape[0], c), dtype=acc, device=x.device)
    dgamma = torch.zeros(c, dtype=acc, device=x.device)
    dbeta = torch.zeros(c, dtype=acc, device=x.device)
    w = weight.to(acc)
    for r0 in range(0, x.shape[0], _CHUNK_ROWS):
        db = dout[r0:r0 + _CHUNK_ROWS].to(acc)
        xs = x[r0:r0 + _CHUNK_ROWS].to(acc)
        y = torch.addcmul(shift, xs, scale)
        on = y > 0
        g = torch.where(on, db @ w, 0)
        G[r0:r0 + _CHUNK_ROWS].addcmul_(g, scale)
        dbeta += g.sum(0)
        dgamma += (g * (xs - mean) * rstd).sum(0)
        a = torch.where(on, y, 0).to(x.dtype).to(acc)
        dweight.addmm_(db.t(), a)
    return dweight, dgamma, dbeta


_lib.impl("bnrelu_conv1x1_fwd", fwd_chunked, "CUDA")
_lib.impl("bnrelu_conv1x1_bwd", bwd_chunked, "CUDA")
