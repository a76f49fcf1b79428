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
from torch.autograd.function import once_differentiable

from .._checks import check_batch, check_input, compute_dtype, has_hooks
from ..autograd.distributed import StatsGroup, stats_group
from ..ops import (bn_grad_finish, bn_scale_shift, bnrelu_avgpool_conv1x1_bwd, bnrelu_avgpool_conv1x1_fwd,
                  channel_stats, running_stats_update)
from ..ops._common import acc_dtype



def refuse_inner_hooks(module: nn.Module, who: str) -> None:
    """Hooks on the modules inside a fused module would never fire (nothing calls them): refuse."""
    for name, sub in module.named_children():
        if has_hooks(sub):
            raise RuntimeError(f"{who}: hooks on its {name} are not supported: the fused op never calls the modules "
                               f"inside it. Hook the {who} itself instead.")


def synced_grad_finish(sync: StatsGroup, dx, x2, mean, rstd, scale, dgamma, dbeta, count: int, dtype):
    """The BatchNorm input gradient over a process group: ``dx`` = scale*g (the op run without the mean
    terms), ``dgamma``/``dbeta`` this rank's sums of g*xhat and g; the mean terms from the sums over the
    group (one all_reduce), as nn.SyncBatchNorm's backward.  Returns dx (M, C) in ``dtype``."""
    sums = sync.sum_(torch.stack((dgamma, dbeta)).to(mean.dtype))
    return bn_grad_finish(dx.to(mean.dtype), x2, mean, scale * sums[1] / count, scale * rstd * sums[0] / count,
                          dtype)


def check_norm(bn: nn.Module, channels: int, who: str) -> None:
    if not isinstance(bn, nn.BatchNorm2d) and not isinstance(bn, nn.SyncBatchNorm):
        raise TypeError(f"{who}: expected its norm to be an nn.BatchNorm2d, got {type(bn).__name__}")
    if not bn.affine or not bn.track_running_stats:
        raise ValueError(f"{who}: its norm must have affine=True and track_running_stats=True, got "
                         f"affine={bn.affine}, track_running_stats={bn.track_running_stats}")
    if bn.num_features != channels:
        raise ValueError(f"{who}: its norm has {bn.num_features} features, expected {channels}")


def check_stats(stats, channels: int, acc: torch.dtype, device, who: str):
    """Validated (mean, var) from the block, or None."""
    if stats is None or stats[0] is None:
        return None
    mean, var = stats
    for name, t in (("mean", mean), ("var", var)):
        if not isinstance(t, Tensor) or t.shape != (channels,) or t.dtype != acc or t.device != device:
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{who}: expected stats {name} to be a 1-D {acc} tensor of {channels} channels on "
                             f"{device}, got {got}")
    return mean.detach(), var.detach()


def checked_input(x: Tensor, norm: nn.Module, param: Tensor, stats, sync_group, who: str):
    """The checks of a fused BN-ReLU op's call on x that follow the shape and device ones, before any
    state changes: (x in the compute dtype with channels-last strides, the given batch statistics
    checked (training) or None, the process group of the batch statistics or None, dtype, acc).
    ``param``: the parameter whose dtype the input must have outside autocast."""
    dtype = compute_dtype(x, param, who)
    acc = acc_dtype(dtype)
    training = norm.training
    stats = check_stats(stats, norm.num_features, acc, x.device, who) if training else None
    n, _, h, w = x.shape
    sync = stats_group([norm], who, sync_group) if training else None
    check_batch(training, n * h * w, x.size())
    xin = x.to(dtype) if x.dtype != dtype else x
    # NHWC rows: a view of a block's output; other layouts get one (autograd-tracked) channels-last copy
    xin = xin.contiguous(memory_format=torch.channels_last)
    return xin, stats, sync, dtype, acc


def nhwc_rows(x: Tensor) -> Tensor:
    """x (N, C, H, W) with channels-last strides as its (N*H*W, C) NHWC row matrix (a view)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).view(n * h * w, c)


def batch_or_running(bn: nn.Module, x2: Tensor, stats, training: bool, acc: torch.dtype,
                     sync: Optional[StatsGroup] = None):
    """(mean, var, count) the norm normalizes with: the block's batch statistics, or computed here, or
    the running statistics in eval; updates the running statistics in training (once, as
    nn.BatchNorm2d).  With ``sync`` the statistics are over the process group (a block's given
    statistics already are; count = values per channel over the group)."""
    count = x2.shape[0]
    if not training:
        return bn.running_mean.detach().to(acc), bn.running_var.detach().to(acc), count
    if stats is None:
        mean, var, _ = channel_stats(x2.detach(), bn.eps)
        if sync is not None:
            count, mean, var = sync.merge_moments(count, mean, var, want_count=True)
    else:
        mean, var = stats
        if sync is not None:
            count = sync.total_count(count)
    running_stats_update([bn], [mean], [var], count=count)
    return mean, var, count


@dataclass
class TransitionSpec:
    nhw: Tuple[int, int, int]
    eps: float
    training: bool
    dtype: torch.dtype
    sync: Optional[StatsGroup] = None  # batch statistics over this process group
    count: int = 0                     # values per channel of the batch statistics (over the group)


class FusedTransitionFunction(torch.autograd.Function):
    """One autograd node: BN (given statistics), ReLU, 2x2 average pool, 1x1 convolution."""

    @staticmethod
    def forward(ctx, spec: TransitionSpec, x: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor, mean: Tensor,
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


def _transition_forward(spec: TransitionSpec, x, gamma, beta, weight, mean, var, out: Optional[Tensor] = None):
    """(output (N, Cout, H/2, W/2) with channels-last strides, what backward needs).  ``out``: the
    (N*(H/2)*(W/2), Cout) rows to write it into (the first channels of the next block's buffer)."""
    n, h, w = spec.nhw
    x2 = nhwc_rows(x)
    scale, shift, rstd = bn_scale_shift(gamma, beta, mean, var, spec.eps)
    w2 = weight.view(weight.shape[0], -1).to(spec.dtype)
    out = bnrelu_avgpool_conv1x1_fwd(x2, scale, shift, w2, spec.nhw, out)
    out = out.view(n, h // 2, w // 2, -1).permute(0, 3, 1, 2)  # also a view of strided rows
    return out, (mean, rstd, scale, shift, w2)


def transition_backward(spec: TransitionSpec, x: Tensor, saved, dout: Tensor, param_dtypes):
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
    spec = TransitionSpec(nhw=(n, h, w), eps=float(norm.eps), training=norm.training, dtype=prep.dtype,
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
