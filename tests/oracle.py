"""Plain-PyTorch oracles of the densenet_fused ops (test-only, never used by the package)."""
import torch


def channel_stats(x, eps):
    xd = x.double()
    mean = xd.mean(0)
    var = (xd - mean).pow(2).mean(0)
    return mean, var, (var + eps).rsqrt()


def bn_grad_finish(G, x, mean, P, Q, G_scale=None):
    g = G.double() if G_scale is None else G.double() * G_scale.double()
    return g - P.double() - (x.double() - mean.double()) * Q.double()


def bnrelu(x, scale, shift):
    """relu(x*scale+shift) rounded to the dtype of x (what the fused kernels feed the GEMM)."""
    return torch.relu(x.to(scale.dtype) * scale + shift).to(x.dtype)


def bnrelu_conv1x1_fwd(x, scale, shift, weight):
    a = torch.relu(x.double() * scale.double() + shift.double())
    if x.dtype != torch.float64:
        a = a.to(x.dtype).double()
    return a @ weight.double().t()


def bnrelu_conv1x1_bwd(dout, x, scale, shift, weight, mean, rstd):
    """(G increment, dweight, dgamma, dbeta) in float64."""
    xd, sd, hd = x.double(), scale.double(), shift.double()
    y = xd * sd + hd
    on = y > 0
    g = torch.where(on, dout.double() @ weight.double(), 0)
    a = torch.where(on, y, 0)
    if x.dtype != torch.float64:
        a = a.to(x.dtype).double()
    xhat = (xd - mean.double()) * rstd.double()
    return sd * g, dout.double().t() @ a, (g * xhat).sum(0), g.sum(0)


def strided_slice(m, c_total, c_begin, c, dtype, offset=0.0, scale=1.0, generator=None, device="cpu"):
    """A channel slice [c_begin, c_begin + c) of a wider (m, c_total) buffer on ``device``: a
    strided matrix (slice after moving: ``.to(device)`` of a slice would copy it contiguous)."""
    buf = torch.randn(m, c_total, dtype=torch.float64, generator=generator) * scale + offset
    return buf.to(dtype).to(device)[:, c_begin:c_begin + c]
