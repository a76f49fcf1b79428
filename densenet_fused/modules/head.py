"""The fused DenseNet head: norm5, ReLU and the global average pool as one op (docs/design.md section 9).

``fused_head(norm5, x, stats)`` returns ``flatten(adaptive_avg_pool2d(relu(norm5(x)), 1), 1)``
(N, C), reading x (the last block's buffer) once; with the block's batch statistics
(``stats=(mean, var)``) there is no statistics pass.  Backward is elementwise from the saved
input: nothing of activation size is saved besides it.  norm5's running statistics are updated
exactly as ``nn.BatchNorm2d`` does.  With an nn.SyncBatchNorm norm5 (or ``sync_group``) the batch
statistics and the backward's two gradient sums are over the process group.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_input, has_hooks
from ..autograd._norm import NormSpec, nhwc_rows
from ..autograd.head import FusedHeadFunction, _head_forward
from ._norm import batch_or_running, check_norm, checked_input


def fused_head(norm5: nn.Module, x: Tensor, stats=None, sync_group=None) -> Tensor:
    """``torch.flatten(F.adaptive_avg_pool2d(F.relu(norm5(x)), 1), 1)`` as one op; ``stats`` = the
    batch (mean, biased var) of x's channels when known (the last block's), else None."""
    who = "fused head (norm5, ReLU, global average pool)"
    if has_hooks(norm5):
        raise RuntimeError(f"{who}: norm5 has hooks, which the fused head would never call; run norm5 as a module")
    c = norm5.num_features
    check_norm(norm5, c, who)
    check_input(x, c, who, 1)
    if norm5.weight.device != x.device:
        raise ValueError(f"{who}: expected the input on the device of norm5's parameters, got the input on "
                         f"{x.device} and norm5.weight on {norm5.weight.device}")
    xin, stats, sync, dtype, acc = checked_input(x, norm5, norm5.weight, stats, sync_group, who)
    if x.shape[0] == 0:  # an empty batch: torchvision's modules one by one (an empty output)
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(norm5(x)), 1), 1)
    training = norm5.training
    n, _, h, w = x.shape
    mean, var, count = batch_or_running(norm5, nhwc_rows(xin), stats, training, acc, sync)
    spec = NormSpec(nhw=(n, h, w), eps=float(norm5.eps), training=training, dtype=dtype, sync=sync, count=count)
    if torch.is_grad_enabled() and (xin.requires_grad or norm5.weight.requires_grad or norm5.bias.requires_grad):
        return FusedHeadFunction.apply(spec, xin, norm5.weight, norm5.bias, mean, var)
    with torch.autocast(x.device.type, enabled=False):
        return _head_forward(spec, xin, norm5.weight, norm5.bias, mean, var)[0]
