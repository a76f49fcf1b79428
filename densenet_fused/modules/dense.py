"""FusedDenseLayer and FusedDenseBlock: torchvision-compatible modules on the fused block.

Same constructor signatures, child names (``denselayer1..L`` with ``norm1, relu1, conv1,
norm2, relu2, conv2``) and state_dict keys as ``torchvision.models.densenet._DenseLayer``
and ``_DenseBlock``; the parameters are real ``nn.BatchNorm2d`` / ``nn.Conv2d`` modules.
"""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_batch, check_input, compute_dtype, has_hooks
from ..autograd.block import BlockSpec, FusedDenseBlockFunction, block_forward
from ..autograd.distributed import stats_group
from ..ops import block_ops
from ..ops._common import autocast_off
from ..ops.bnrelu_conv3x3 import conv3x3_impl as default_conv3x3_impl


class FusedDenseLayer(nn.Module):
    """One DenseNet-BC layer: BN-ReLU-conv1x1 (bn_size*k) then BN-ReLU-conv3x3 (k), dropout.

    Called on its own it takes a tensor or a list of tensors (concatenated, as torchvision's
    ``_DenseLayer``) and returns the k new features; inside a ``FusedDenseBlock`` it is
    a holder of parameters and the block runs all layers as one fused node (the block calls
    its layers one by one only when a layer has hooks, so that they fire).
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0,
                 memory_efficient: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient  # accepted for compatibility: always linear memory
        self.sync_group = None  # see FusedDenseBlock.sync_group

    def __prepare_scriptable__(self) -> "ScriptableDenseLayer":
        """What ``torch.jit.script`` compiles: torchvision's layer computation on these very modules
        (see ScriptableDenseLayer; the scripted layer runs unfused)."""
        return ScriptableDenseLayer.sharing(self)

    def forward(self, input: Union[Tensor, List[Tensor]]) -> Tensor:  # noqa: A002 (torchvision's name)
        proxy = _fx_proxy(input)
        if proxy is not None:
            return _fx_leaf(self, proxy, input)
        _layers_with_hooks([self], ["FusedDenseLayer"])
        x = torch.cat(input, 1) if isinstance(input, (list, tuple)) else input
        c_in = self.norm1.num_features
        out = run_block([self], x, c_in, self.conv2.out_channels, "FusedDenseLayer", sync_group=self.sync_group)
        return out[:, c_in:]


class FusedDenseBlock(nn.ModuleDict):
    """Drop-in replacement for ``torchvision.models.densenet._DenseBlock``.

    Input (N, num_input_features, H, W), NCHW or channels-last; output
    (N, num_input_features + num_layers*growth_rate, H, W) with channels-last strides.
    ``memory_efficient`` is accepted for signature compatibility: memory is always linear in
    depth, with no checkpointing and running statistics updated once per step.
    ``keep_bottleneck=True`` saves each layer's bottleneck output (N*H*W x bn_size*k) for
    backward instead of recomputing it: more memory (still linear in depth), one GEMM less
    per layer in backward.
    Hooks on the dense layers fire as in torchvision: with a hook on any layer the block runs
    layer by layer (torchvision's loop and memory, each layer a one-layer fused block).  Hooks on
    the BatchNorm/ReLU/Conv2d modules inside the layers raise (nothing calls those modules).
    Under torch.fx symbolic tracing the block (and a layer) is recorded as one leaf call.
    ``torch.jit.script`` compiles torchvision's layer-by-layer computation on the same parameters
    (``__prepare_scriptable__``: ScriptableDenseBlock): a scripted block runs unfused, with
    torchvision's memory.  (torch's protocol swaps the block for that equivalent inside a parent
    module that has no ``__prepare_scriptable__`` of its own, e.g. an ``nn.Sequential`` built by
    hand: script a ``copy.deepcopy`` of such a container to keep the eager one fused.  The package's
    DenseNet and FusedFeatures, and the models ``convert()`` changed, hand torch.jit.script a copy.)
    """

    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0, memory_efficient: bool = False, *, keep_bottleneck: bool = False) -> None:
        super().__init__()
        for name, value in (("num_layers", num_layers), ("num_input_features", num_input_features),
                            ("bn_size", bn_size), ("growth_rate", growth_rate)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FusedDenseBlock: expected {name} to be a positive int, got {value!r}")
        if not 0.0 <= float(drop_rate) <= 1.0:
            raise ValueError(f"FusedDenseBlock: expected drop_rate in [0, 1], got {drop_rate!r}")
        self.num_input_features = num_input_features
        self.growth_rate = growth_rate
        self.bn_size = bn_size
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient
        self.keep_bottleneck = keep_bottleneck
        self.conv3x3_impl = ""  # "" (the default: ops.using_conv3x3), "aten" or "triton" on CUDA
        for i in range(num_layers):
            layer = FusedDenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate, bn_size=bn_size,
                                    drop_rate=drop_rate, memory_efficient=memory_efficient)
            self.add_module("denselayer%d" % (i + 1), layer)

    @property
    def sync_group(self):
        """Batch statistics over this process group in training (set by
        densenet_fused.convert_sync_batchnorm); None: local statistics, or those of the process group
        of nn.SyncBatchNorm norms when the norms are such.  Setting it sets it on every dense layer."""
        layers = list(self.values())
        return layers[0].sync_group if layers else None

    @sync_group.setter
    def sync_group(self, group) -> None:
        for layer in self.values():
            layer.sync_group = group

    def __prepare_scriptable__(self) -> "ScriptableDenseBlock":
        """What ``torch.jit.script`` compiles (see the class docstring)."""
        block = ScriptableDenseBlock()
        for name, layer in self.items():
            block.add_module(name, ScriptableDenseLayer.sharing(layer))
        block.training = self.training
        return block

    def forward(self, init_features: Tensor) -> Tensor:
        proxy = _fx_proxy(init_features)
        if proxy is not None:
            return _fx_leaf(self, proxy, init_features)
        layers = list(self.values())
        if _layers_with_hooks(layers):
            _validate(layers, init_features, self.num_input_features, self.growth_rate, "FusedDenseBlock")
            return _run_layer_by_layer(layers, init_features)
        return run_block(layers, init_features, self.num_input_features, self.growth_rate,
                         "FusedDenseBlock", keep_bottleneck=self.keep_bottleneck, conv3x3_impl=self.conv3x3_impl,
                         sync_group=self.sync_group)

    def forward_with_stats(self, init_features: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``(out, mean, var)``: the block's output and, in training, the batch mean and biased
        variance of its channels as the block computed them (float32, float64 for float64 input;
        over the process group with SyncBatchNorm norms), which a BatchNorm reading the output
        (a transition, the final norm) can use instead of a statistics pass of its own.  The
        statistics are constants to autograd: such a module differentiates its BatchNorm through
        them itself.  ``mean`` and ``var`` are None in eval mode and for an empty batch.  Hooks on the dense layers are
        not supported here (use forward)."""
        layers = list(self.values())
        if _layers_with_hooks(layers):
            raise RuntimeError("FusedDenseBlock.forward_with_stats: the dense layers have hooks, which only the "
                               "layer-by-layer forward runs; call forward instead")
        return run_block(layers, init_features, self.num_input_features, self.growth_rate,
                         "FusedDenseBlock", keep_bottleneck=self.keep_bottleneck, conv3x3_impl=self.conv3x3_impl,
                         sync_group=self.sync_group, with_stats=True)

    def extra_repr(self) -> str:
        return (f"num_layers={len(self)}, num_input_features={self.num_input_features}, "
                f"bn_size={self.bn_size}, growth_rate={self.growth_rate}, drop_rate={self.drop_rate}"
                + (", keep_bottleneck=True" if self.keep_bottleneck else ""))


class ScriptableDenseLayer(nn.Module):
    """torchvision's ``_DenseLayer`` computation (BN-ReLU-conv1x1, BN-ReLU-conv3x3, dropout) as
    separate torch ops, in TorchScript-compatible code: what ``torch.jit.script`` compiles for a
    FusedDenseLayer (``sharing``: the very same modules, so the same parameters and buffers)."""

    def __init__(self, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_rate = float(drop_rate)

    @classmethod
    def sharing(cls, layer: nn.Module) -> "ScriptableDenseLayer":
        new = cls(layer.drop_rate)
        for name in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
            new.add_module(name, getattr(layer, name))
        new.training = layer.training
        return new

    def forward(self, input: Union[Tensor, List[Tensor]]) -> Tensor:  # noqa: A002 (torchvision's name)
        if isinstance(input, Tensor):
            x = input
        else:
            x = torch.cat(input, 1)
        out = self.conv1(self.relu1(self.norm1(x)))
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class ScriptableDenseBlock(nn.ModuleDict):
    """torchvision's ``_DenseBlock`` loop over ScriptableDenseLayers (TorchScript-compatible): what
    ``torch.jit.script`` compiles for a FusedDenseBlock."""

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def _fx_proxy(x):
    """The torch.fx Proxy among the inputs, when a symbolic trace calls the module."""
    for t in (x if isinstance(x, (list, tuple)) else (x,)):
        if isinstance(t, torch.fx.Proxy):
            return t
    return None


def _fx_leaf(module: nn.Module, proxy, input):  # noqa: A002
    """Under torch.fx symbolic tracing (torch.fx.symbolic_trace, torchvision's
    create_feature_extractor): record one call of ``module`` as a leaf node, as FX does for
    torch.nn modules; the traced GraphModule then runs the real fused forward.  The tracer is
    inside its ``call_module`` for this module, so the node gets this module's qualified name."""
    tracer = proxy.tracer
    path = tracer.path_of_module(module)
    if not path:
        raise TypeError(f"{type(module).__name__}: torch.fx cannot trace inside a fused block (it runs as one "
                        f"autograd node); trace a model that contains it, where it is recorded as a leaf call")
    return tracer.create_proxy("call_module", path, (input,), {})




def _layers_with_hooks(layers, names=None) -> bool:
    """Whether a dense layer has hooks (then the block runs layer by layer, so they fire as in
    torchvision).  Hooks on the modules inside a layer raise: no path calls them (a fused layer
    runs BN-ReLU-conv1x1-BN-ReLU-conv3x3 as one op), and they must not be silently skipped."""
    hooked = False
    for i, layer in enumerate(layers):
        hooked = hooked or has_hooks(layer)
        for name, sub in layer._modules.items():
            if has_hooks(sub):
                where = names[i] if names else f"denselayer{i + 1}"
                raise RuntimeError(
                    f"FusedDenseBlock: hooks on {where}.{name} are not supported: a fused layer never calls "
                    f"the BatchNorm, ReLU and Conv2d modules inside it (it runs them as one op). Hook the dense "
                    f"layer ({where}: its hooks fire with its input features and new channels) or the "
                    f"FusedDenseBlock instead, or keep torchvision's _DenseBlock for this model.")
    return hooked


def _run_layer_by_layer(layers, x: Tensor) -> Tensor:
    """torchvision's loop: every layer called as a module on the list of features before it, so
    its forward (pre-)hooks and backward hooks fire with torchvision's arguments, and tensor hooks
    on a layer's output get its full gradient.  Each layer is a one-layer fused block: the same
    values and running statistics as the fused block, with torchvision's concatenation memory."""
    features = [x]
    for layer in layers:
        features.append(layer(features))
    return torch.cat(features, 1)


def _validate(layers, x, c_in: int, growth: int, who: str) -> bool:
    """Check everything before any state changes; returns whether batch statistics are used.
    (nn.SyncBatchNorm norms are checked by run_block: distributed.stats_group.)"""
    check_input(x, c_in, who, channels_name="num_input_features")
    modes = set()
    dev = x.device
    for i, layer in enumerate(layers):
        c_l = c_in + i * growth
        mods = layer._modules  # (direct: nn.Module.__getattr__ costs host time in every step)
        conv1, conv2 = mods["conv1"], mods["conv2"]
        for bn_name, channels in (("norm1", c_l), ("norm2", conv1.out_channels)):
            bn = mods[bn_name]
            if not bn.affine or not bn.track_running_stats:
                raise ValueError(f"{who}: layer {i + 1} {bn_name} must have affine=True and "
                                 f"track_running_stats=True, got affine={bn.affine}, "
                                 f"track_running_stats={bn.track_running_stats}")
            if bn.num_features != channels:
                raise ValueError(f"{who}: layer {i + 1} {bn_name} expected {channels} features, has "
                                 f"{bn.num_features}")
            modes.add(bn.training)
        for mod in ("norm1", "conv1", "norm2", "conv2"):  # the parameters and the running statistics the block reads
            m = mods[mod]
            tensors = (m._parameters, m._buffers) if mod[0] == "n" else (m._parameters,)
            for attrs in tensors:
                for attr, p in attrs.items():
                    if p is not None and p.device != dev and attr != "num_batches_tracked":
                        raise ValueError(f"{who}: expected the input on the device of the parameters and buffers, "
                                         f"got the input on {x.device} and layer {i + 1} {mod}.{attr} on {p.device}")
        w1, w2 = conv1._parameters["weight"], conv2._parameters["weight"]
        if w1.shape[1:] != (c_l, 1, 1) or w2.shape != (growth, conv1.out_channels, 3, 3):
            raise ValueError(f"{who}: layer {i + 1} convolutions do not match a dense layer with {c_l} inputs "
                             f"and growth rate {growth}")
    if len(modes) > 1:
        raise ValueError(f"{who}: expected all BatchNorm layers in the same mode (all train or all eval)")
    training = modes.pop() if modes else False
    n, _, h, w = x.shape
    check_batch(training, n * h * w, x.size())
    return training


def _empty_batch(layers, x: Tensor) -> Tensor:
    """A block on an empty batch does what torchvision's does: its modules run one by one (the
    output is empty; in training each BatchNorm counts the batch in num_batches_tracked and keeps its
    running statistics, and backward gives zero parameter gradients), channels-last as the fused output."""
    features = [x]
    for layer in layers:
        features.append(ScriptableDenseLayer.sharing(layer)(features))
    return torch.cat(features, 1).contiguous(memory_format=torch.channels_last)


def block_setup(layers, x: Tensor, c_in: int, growth: int, who: str, keep_bottleneck: bool = False,
                conv3x3_impl: str = "", with_stats: bool = False, sync_group=None):
    """(spec, params) of a block call on x, every check done before any state changes."""
    training = _validate(layers, x, c_in, growth, who)
    sync = None
    if training:
        sync = stats_group([layer._modules[n] for layer in layers for n in ("norm1", "norm2")], who, sync_group)
    dtype = compute_dtype(x, layers[0].conv1.weight, who)
    impl = conv3x3_impl or default_conv3x3_impl()
    spec = BlockSpec(layers=layers, num_input_features=c_in, growth_rate=growth, training=training, dtype=dtype,
                     keep_bottleneck=keep_bottleneck, conv3x3_impl=impl, sync=sync, with_stats=with_stats,
                     ops=block_ops(x.device, dtype=dtype, conv3x3=impl))
    params = []
    for layer in layers:
        mods = layer._modules
        n1, n2 = mods["norm1"]._parameters, mods["norm2"]._parameters
        params += [n1["weight"], n1["bias"], mods["conv1"]._parameters["weight"], n2["weight"], n2["bias"],
                   mods["conv2"]._parameters["weight"]]
    return spec, params


def fused_block_setup(block: "FusedDenseBlock", x: Tensor, with_stats: bool = False):
    """block_setup for a FusedDenseBlock run as one fused node (raises on hooks inside its layers)."""
    layers = list(block.values())
    if _layers_with_hooks(layers):
        raise RuntimeError("FusedDenseBlock: the dense layers have hooks, which only the layer-by-layer forward "
                           "runs; call forward instead")
    return block_setup(layers, x, block.num_input_features, block.growth_rate, "FusedDenseBlock",
                       keep_bottleneck=block.keep_bottleneck, conv3x3_impl=block.conv3x3_impl,
                       sync_group=block.sync_group, with_stats=with_stats)


def run_block(layers, x: Tensor, c_in: int, growth: int, who: str, keep_bottleneck: bool = False,
              conv3x3_impl: str = "", with_stats: bool = False, sync_group=None):
    """The block's output, or ``(out, mean, var)`` with ``with_stats`` (see forward_with_stats)."""
    spec, params = block_setup(layers, x, c_in, growth, who, keep_bottleneck, conv3x3_impl, with_stats, sync_group)
    if x.shape[0] == 0:  # an empty batch: torchvision's computation, module by module (an empty output)
        out = _empty_batch(layers, x)
        return (out, None, None) if with_stats else out
    dev = x.device.type
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        if not with_stats:
            return FusedDenseBlockFunction.apply(spec, x, *params)
        out, mean, var = FusedDenseBlockFunction.apply(spec, x, *params)
    else:
        with autocast_off(dev):
            out, _, (_, mean, var) = block_forward(spec, x, params, save=False, extra=True)
    return (out, mean, var) if with_stats else out
