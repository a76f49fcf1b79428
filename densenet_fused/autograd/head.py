"""The head's autograd node (modules/head.py checks the call and runs it): BN with given statistics,
ReLU and the global average pool as one op; backward is elementwise from the saved input."""
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ops import bn_scale_shift, bnrelu_global_avgpool_bwd, bnrelu_global_avgpool_fwd
from ._norm import NormSpec, nhwc_rows, synced_grad_finish


def _head_forward(spec: NormSpec, x, gamma, beta, mean, var):
    scale, shift, rstd = bn_scale_shift(gamma, beta, mean, var, spec.eps)
    return bnrelu_global_avgpool_fwd(nhwc_rows(x), scale, shift, spec.nhw), (mean, rstd, scale, shift)


class FusedHeadFunction(torch.autograd.Function):
    """One autograd node: BN (given statistics), ReLU, global average pool, flatten."""

    @staticmethod
    def forward(ctx, spec: NormSpec, x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor):
        with torch.autocast(x.device.type, enabled=False):
            out, saved = _head_forward(spec, x, gamma, beta, mean, var)
        ctx.spec = spec
        ctx.param_dtypes = (gamma.dtype, beta.dtype)
        ctx.save_for_backward(x, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dpooled):
        spec = ctx.spec
        x, mean, rstd, scale, shift = ctx.saved_tensors
        n, h, w = spec.nhw
        with torch.autocast(x.device.type, enabled=False):
            sync = spec.sync if spec.training else None
            x2 = nhwc_rows(x)
            dx, dgamma, dbeta = bnrelu_global_avgpool_bwd(dpooled.to(x.dtype), x2, scale, shift, spec.nhw,
                                                          mean, rstd, spec.training and sync is None)
            if sync is not None:
                dx = synced_grad_finish(sync, dx, x2, mean, rstd, scale, dgamma, dbeta, spec.count, x.dtype)
        dx = dx.view(n, h, w, -1).permute(0, 3, 1, 2)  # channels-last, as the input
        return None, dx, dgamma.to(ctx.param_dtypes[0]), dbeta.to(ctx.param_dtypes[1]), None, None
