"""The transition's autograd node (modules/transition.py checks the call and runs it): BN with given
statistics, ReLU, the 2x2 average pool and the 1x1 convolution as one op, the pool inside the GEMM's
prologue; backward recomputes the normalized activations from the saved input (docs/design.md
section 9)."""
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ops import bn_scale_shift, bnrelu_avgpool_conv1x1_bwd, bnrelu_avgpool_conv1x1_fwd
from ._norm import NormSpec, nhwc_rows, synced_grad_finish


class FusedTransitionFunction(torch.autograd.Function):
    """One autograd node: BN (given statistics), ReLU, 2x2 average pool, 1x1 convolution."""

    @staticmethod
    def forward(ctx, spec: NormSpec, x: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor, mean: Tensor,
                var: Tensor):
        with torch.autocast(x.device.type, enabled=False):
            out, saved = _transition_forward(spec, x, gamma, beta, weight, mean, var)
        ctx.spec = spec
        ctx.param_dtypes = (gamma.dtype, beta.dtype, weight.dtype)
        ctx.save_for_backward(x, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, *saved = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            dx, dgamma, dbeta, dweight = transition_backward(ctx.spec, x, saved, dout, ctx.param_dtypes)
        return None, dx, dgamma, dbeta, dweight, None, None


def _transition_forward(spec: NormSpec, x, gamma, beta, weight, mean, var, out: Optional[Tensor] = None):
    """(output (N, Cout, H/2, W/2) with channels-last strides, what backward needs).  ``out``: the
    (N*(H/2)*(W/2), Cout) rows to write it into (the first channels of the next block's buffer)."""
    n, h, w = spec.nhw
    x2 = nhwc_rows(x)
    scale, shift, rstd = bn_scale_shift(gamma, beta, mean, var, spec.eps)
    w2 = weight.view(weight.shape[0], -1).to(spec.dtype)
    out = bnrelu_avgpool_conv1x1_fwd(x2, scale, shift, w2, spec.nhw, out)
    out = out.view(n, h // 2, w // 2, -1).permute(0, 3, 1, 2)  # also a view of strided rows
    return out, (mean, rstd, scale, shift, w2)


def transition_backward(spec: NormSpec, x: Tensor, saved, dout: Tensor, param_dtypes):
    """(dx, dgamma, dbeta, dweight) of the transition from its input x (channels-last), what
    _transition_forward saved and the output gradient dout (N, Cout, H/2, W/2)."""
    mean, rstd, scale, shift, w2 = saved
    n, h, w = spec.nhw
    d2 = dout.to(spec.dtype).permute(0, 2, 3, 1).reshape(-1, w2.shape[0])
    sync = spec.sync if spec.training else None
    x2 = nhwc_rows(x)
    dx, dweight, dgamma, dbeta = bnrelu_avgpool_conv1x1_bwd(d2, x2, scale, shift, w2, spec.nhw,
                                                            mean, rstd, spec.training and sync is None)
    if sync is not None:
        dx = synced_grad_finish(sync, dx, x2, mean, rstd, scale, dgamma, dbeta, spec.count, spec.dtype)
    dx = dx.view(n, h, w, -1).permute(0, 3, 1, 2)  # channels-last, as the input
    gamma_dtype, beta_dtype, weight_dtype = param_dtypes
    return (dx, dgamma.to(gamma_dtype), dbeta.to(beta_dtype),
            dweight.view(w2.shape[0], w2.shape[1], 1, 1).to(weight_dtype))
