"""The BatchNorm input gradient of the ops whose backward ends in a BatchNorm-ReLU read from x
(bnrelu_avgpool_conv1x1, bnrelu_global_avgpool): with d the gradient reaching
relu(x*scale + shift), g = d where x*scale + shift > 0 (else 0) and xhat = (x - mean)*rstd,
pass 1 sums g (dbeta) and g*xhat (dgamma) per part (a tile or an image) and writes dx = scale*g
with running statistics; the partials are reduced in a fixed order; pass 2 writes
dx = scale*g - P - (x - mean)*Q with P = scale*mean(g), Q = scale*rstd*mean(g*xhat).

Here: the launchers' shared checks, the ATen form (the float64 CUDA path), the Triton tile of
both passes and the launch sequence of the two passes."""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype


# ----------------------------------------------------------------------------- checks (Python launchers)
def check_rows(x, op):
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise RuntimeError(f"{op}: expected x to be a 2-D (rows = N*H*W, channels) matrix with unit channel "
                           f"stride, got shape {tuple(x.shape)} strides {x.stride()}")


def check_channel_vectors(op, x, named, joiner):
    """Each (name, t) of ``named``: a 1-D tensor of x's channels in its accumulation dtype, on its
    device (``joiner`` between the channels and the dtype in the message: ", " or " and ")."""
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    for name, t in named:
        if t.shape != (c,) or t.dtype != acc or t.device != x.device:
            raise RuntimeError(f"{op}: expected {name} to be a 1-D tensor of {c} channels{joiner}dtype {acc} on "
                               f"{x.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")


# ----------------------------------------------------------------------------- ATen (float64 on CUDA)
def aten_bn_grad(d, x, scale, shift, mean, rstd, batch_stats):
    """(dx in x's dtype, dgamma, dbeta) from d (M, C), the gradient reaching relu(x*scale + shift),
    in the accumulation dtype."""
    xa = x.to(scale.dtype)
    g = torch.where(torch.addcmul(shift, xa, scale) <= 0, 0, d)  # torch's relu backward: a NaN passes
    xc = xa - mean
    dbeta, dgamma = g.sum(0), (g * (xc * rstd)).sum(0)
    dx = scale * g
    if batch_stats:
        m = x.shape[0]
        dx = dx - scale * dbeta / m - xc * (scale * rstd * dgamma / m)
    return dx.to(x.dtype), dgamma, dbeta


# ----------------------------------------------------------------------------- Triton
@triton.jit
def load_bn_vectors(SCALE, SHIFT, MEAN, RSTD, P, Q, rc, c_ok):
    """(scale, shift, mean, rstd, P, Q) of the channels rc, 0 off ``c_ok``."""
    s = tl.load(SCALE + rc, mask=c_ok, other=0.0)
    h = tl.load(SHIFT + rc, mask=c_ok, other=0.0)
    mu = tl.load(MEAN + rc, mask=c_ok, other=0.0)
    rs = tl.load(RSTD + rc, mask=c_ok, other=0.0)
    pp = tl.load(P + rc, mask=c_ok, other=0.0)
    qq = tl.load(Q + rc, mask=c_ok, other=0.0)
    return s, h, mu, rs, pp, qq


@triton.jit
def bn_grad_tile(X, ldx, DX, C, pix, rc, mask, d, s, h, mu, rs, pp, qq, sg, sgx, PASS: tl.constexpr,
                 BATCH: tl.constexpr):
    """One (pixels, channels) tile of x (pixel rows ``pix``, int64), d broadcast to it.  Pass 1:
    returns (sg + sum(g), sgx + sum(g*xhat)) per channel and stores dx = scale*g without batch
    statistics; pass 2: stores dx = scale*g - P - (x - mean)*Q."""
    x = tl.load(X + pix[:, None] * ldx + rc[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.where(mask & ~(x * s[None, :] + h[None, :] <= 0.0), d, 0.0)  # a NaN passes, as in torch
    if PASS == 1:
        sg += tl.sum(g, axis=0)
        sgx += tl.sum(g * ((x - mu[None, :]) * rs[None, :]), axis=0)
        if not BATCH:
            tl.store(DX + pix[:, None] * C + rc[None, :], (s[None, :] * g).to(DX.dtype.element_ty), mask=mask)
    else:
        dx = s[None, :] * g - pp[None, :] - (x - mu[None, :]) * qq[None, :]
        tl.store(DX + pix[:, None] * C + rc[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    return sg, sgx


def bn_grad_passes(launch, parts, x, scale, rstd, batch_stats):
    """Runs an op's two-pass kernel: ``launch(p, q, psg, psgx, pass_, batch)`` for pass 1 (partial
    sums of ``parts`` parts into psg/psgx, (parts, C) float32; p = q = 0) and, with batch statistics,
    for pass 2 with P and Q.  Returns (dgamma, dbeta, p, q); p and q are None without batch statistics."""
    m, c = x.shape
    psum = torch.empty((2, parts, c), dtype=torch.float32, device=x.device)
    zeros = torch.zeros((2, c), dtype=torch.float32, device=x.device)
    launch(zeros[0], zeros[1], psum[0], psum[1], 1, batch_stats)
    dbeta, dgamma = psum.sum(1).unbind(0)  # fixed order over the parts
    if not batch_stats:
        return dgamma, dbeta, None, None
    p = scale * dbeta / m
    q = scale * rstd * dgamma / m
    launch(p, q, psum[0], psum[1], 2, True)
    return dgamma, dbeta, p, q
