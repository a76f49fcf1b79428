"""bn_grad_finish: dx = G [* G_scale] - P - (x - mean) * Q over a channel slice (docs/design.md section 2,
fact 3; with G_scale, one BatchNorm's whole input gradient in one pass).

Kernels: ``csrc/cpu/bn_grad_finish.cpp`` (CPU), ``csrc/cuda/bn_grad_finish.cu`` (CUDA).
"""
import torch


@torch.library.register_fake("densenet_fused::bn_grad_finish")
def _(G, x, mean, P, Q, dtype, nchw_hw=0, G_scale=None):
    m, c = x.shape
    if nchw_hw > 0:
        return x.new_empty((m // nchw_hw, c, nchw_hw), dtype=dtype)
    return x.new_empty((m, c), dtype=dtype)


def bn_grad_finish(G, x, mean, P, Q, dtype: torch.dtype, nchw_hw: int = 0, G_scale=None) -> torch.Tensor:
    """dx = G [* G_scale] - P - (x - mean) * Q for the channels of x; see the op schema in csrc/ops.cpp."""
    return torch.ops.densenet_fused.bn_grad_finish(G, x, mean, P, Q, dtype, nchw_hw, G_scale)
