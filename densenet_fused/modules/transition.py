"""FusedTransition: torchvision's ``_Transition`` (BN-ReLU-conv1x1-avgpool2x2) as one fused op
(docs/design.md section 9).

Same children (``norm, relu, conv, pool``) and state_dict keys as
``torchvision.models.densenet._Transition``.  The 2x2 average pool runs before the 1x1
convolution, inside its GEMM's prologue (they commute), so the GEMM is 4x smaller and the
normalized activations never exist; backward recomputes them from the input, which is all it
saves besides per-channel vectors.  Inside a DenseNet (``features.FusedFeatures``) the input is the
block's buffer and its batch statistics come from the block (``stats=(mean, var)``): no
statistics pass.  Called alone it computes them (one ``channel_stats`` pass).
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_input, has_hooks
from ..autograd._norm import NormSpec, nhwc_rows
from ..autograd.distributed import StatsGroup
from ..autograd.transition import FusedTransitionFunction, _transition_forward
from ._norm import batch_or_running, check_norm, checked_input


def refuse_inner_hooks(module: nn.Module, who: str) -> None:
    """Hooks on the modules inside a fused module would never fire (nothing calls them): refuse."""
    for name, sub in module.named_children():
        if has_hooks(sub):
            raise RuntimeError(f"{who}: hooks on its {name} are not supported: the fused op never calls the modules "
                               f"inside it. Hook the {who} itself instead.")


@dataclass
class Prepared:
    """A checked transition call: nothing has changed yet."""
    module: nn.Module
    x: Tensor              # the input in the compute dtype, channels-last
    stats: Optional[Tuple[Tensor, Tensor]]  # the given batch statistics (training), or None
    sync: Optional[StatsGroup]
    dtype: torch.dtype
    acc: torch.dtype

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        n, _, h, w = self.x.shape
        return n, self.module.conv.out_channels, h // 2, w // 2


def prepare_transition(module: "FusedTransition", x: Tensor, stats=None) -> Prepared:
    """Every check of a transition call on x, before any state changes."""
    who = "FusedTransition"
    norm, conv = module.norm, module.conv
    refuse_inner_hooks(module, who)
    c = conv.in_channels
    check_norm(norm, c, who)
    check_input(x, c, who, 2)
    for name, p in (("norm.weight", norm.weight), ("norm.running_mean", norm.running_mean),
                    ("conv.weight", conv.weight)):
        if p.device != x.device:
            raise ValueError(f"{who}: expected the input on the device of the parameters and buffers, got the input "
                             f"on {x.device} and {name} on {p.device}")
    xin, stats, sync, dtype, acc = checked_input(x, norm, conv.weight, stats, getattr(module, "sync_group", None),
                                                 who)
    return Prepared(module, xin, stats, sync, dtype, acc)


def begin_transition(prep: Prepared):
    """(spec, params, mean, var) of a prepared call: the statistics it normalizes with, the running
    statistics updated (the call's state change)."""
    norm, conv = prep.module.norm, prep.module.conv
    n, _, h, w = prep.x.shape
    mean, var, count = batch_or_running(norm, nhwc_rows(prep.x), prep.stats, norm.training, prep.acc, prep.sync)
    spec = NormSpec(nhw=(n, h, w), eps=float(norm.eps), training=norm.training, dtype=prep.dtype,
                          sync=prep.sync, count=count)
    return spec, (norm.weight, norm.bias, conv.weight), mean, var


def transition_forward(module: "FusedTransition", x: Tensor, stats=None) -> Tensor:
    """The fused transition of ``module`` (norm, relu, conv, pool) on x; ``stats`` = the batch
    (mean, biased var) of x's channels when known (a block's), else None."""
    prep = prepare_transition(module, x, stats)
    if x.shape[0] == 0:  # an empty batch: torchvision's modules one by one (an empty output), as its _Transition
        return module.pool(module.conv(module.relu(module.norm(x))))
    spec, params, mean, var = begin_transition(prep)
    xin = prep.x
    if torch.is_grad_enabled() and (xin.requires_grad or any(p.requires_grad for p in params)):
        return FusedTransitionFunction.apply(spec, xin, *params, mean, var)
    with torch.autocast(x.device.type, enabled=False):
        return _transition_forward(spec, xin, *params, mean, var)[0]


def _check_structure(module: "FusedTransition") -> None:
    conv, pool = module.conv, module.pool
    if (not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.stride != (1, 1)
            or conv.padding not in ((0, 0), "valid") or conv.groups != 1 or conv.bias is not None):
        raise ValueError(f"FusedTransition: expected conv to be a bias-free 1x1 nn.Conv2d (stride 1, no padding, "
                         f"groups 1), got {conv}")
    if (not isinstance(pool, nn.AvgPool2d) or pool.kernel_size not in (2, (2, 2)) or pool.stride not in (2, (2, 2))
            or pool.padding not in (0, (0, 0)) or pool.ceil_mode or pool.divisor_override is not None):
        raise ValueError(f"FusedTransition: expected pool to be nn.AvgPool2d(kernel_size=2, stride=2), got {pool}")
    if not isinstance(module.relu, nn.ReLU):
        raise ValueError(f"FusedTransition: expected relu to be an nn.ReLU, got {type(module.relu).__name__}")


class FusedTransition(nn.Sequential):
    """Drop-in replacement for ``torchvision.models.densenet._Transition``: BN-ReLU-conv1x1-avgpool2x2
    as one op (pool first, in the GEMM's prologue), saving only its input for backward.

    ``forward(x, stats=None)``: ``stats = (mean, var)``, the batch mean and biased variance of x's
    channels (what ``FusedDenseBlock.forward_with_stats`` returns), spare the statistics pass in
    training; running statistics are updated exactly as ``nn.BatchNorm2d`` does.  Under torch.fx
    symbolic tracing it runs its four modules one by one (so they appear as nodes).
    ``torch.jit.script`` compiles an ``nn.Sequential`` of the same four modules (torchvision's
    ``_Transition`` computation, unfused; ``__prepare_scriptable__``)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.sync_group = None  # batch statistics over a process group (densenet_fused.convert_sync_batchnorm)

    @classmethod
    def from_modules(cls, norm: nn.Module, relu: nn.Module, conv: nn.Module, pool: nn.Module) -> "FusedTransition":
        """A FusedTransition holding these very modules (convert())."""
        with torch.device("meta"):
            new = cls(1, 1)
        new.norm, new.relu, new.conv, new.pool = norm, relu, conv, pool
        _check_structure(new)
        return new

    def __prepare_scriptable__(self) -> nn.Sequential:
        """What ``torch.jit.script`` compiles: the four modules themselves, run one by one."""
        seq = nn.Sequential(OrderedDict(self.named_children()))
        seq.training = self.training
        return seq

    def forward(self, x: Tensor, stats: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return super().forward(x)
        _check_structure(self)
        return transition_forward(self, x, stats)
