"""convert(model): swap torchvision ``_DenseBlock`` and timm ``DenseBlock`` for FusedDenseBlock,
and torchvision ``_Transition`` for FusedTransition.

The new modules hold the very same BatchNorm and Conv2d modules (so the same parameters
and buffers: optimizers built before the conversion keep working), the same eps and
momentum, and the same train/eval mode.  A torchvision ``DenseNet``'s ``features`` becomes a
FusedFeatures holding the same children, which threads each block's batch statistics into the
transition that reads its output.  (torchvision's ``DenseNet.forward`` applies ReLU and the
global pool itself after ``features``: norm5 stays an nn.BatchNorm2d there; the package's own
DenseNet fuses norm5, ReLU and the pool.)  timm transitions are left as they are.
``torch.jit.script`` of a converted model compiles the unfused computation (torchvision's) on the same
parameters; the model itself stays fused.
"""
import copy
import sys
from collections import OrderedDict

import torch
from torch import nn

from .features import FusedFeatures
from .dense import FusedDenseBlock
from .transition import FusedTransition


def _source_block_types():
    """Dense block classes of the libraries already imported (never imports them)."""
    types = []
    if "torchvision.models.densenet" in sys.modules or "torchvision" in sys.modules:
        from torchvision.models.densenet import _DenseBlock
        types.append(_DenseBlock)
    if "timm" in sys.modules:
        from timm.models.densenet import DenseBlock
        types.append(DenseBlock)
    return tuple(types)


def _check_bn(bn, where):
    if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):  # SyncBatchNorm: convert_sync_batchnorm first
        raise ValueError(f"convert: {where} must be a BatchNorm2d or SyncBatchNorm, got {type(bn).__name__}")
    if not bn.affine or not bn.track_running_stats:
        raise ValueError(f"convert: {where} must have affine=True and track_running_stats=True, got "
                         f"affine={bn.affine}, track_running_stats={bn.track_running_stats}")
    act = getattr(bn, "act", None)  # timm BatchNormAct2d
    if act is not None and not isinstance(act, nn.ReLU):
        raise ValueError(f"convert: {where} applies {type(act).__name__}; the fused block implements ReLU only")
    drop = getattr(bn, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        raise ValueError(f"convert: {where} has dropout inside its norm layer ({type(drop).__name__}), "
                         f"which the fused block does not implement")


def _torchvision_types():
    """(_Transition, DenseNet) of torchvision when it is imported, else None."""
    if "torchvision.models.densenet" in sys.modules or "torchvision" in sys.modules:
        from torchvision.models.densenet import DenseNet, _Transition
        return _Transition, DenseNet
    return None


def convert_transition(trans: nn.Module) -> FusedTransition:
    """A FusedTransition sharing a torchvision ``_Transition``'s modules."""
    _check_bn(trans.norm, "transition norm")
    fused = FusedTransition.from_modules(trans.norm, trans.relu, trans.conv, trans.pool)
    fused.training = trans.training
    return fused


def convert_block(block: nn.Module, keep_bottleneck: bool = False) -> FusedDenseBlock:
    """A FusedDenseBlock sharing ``block``'s modules (torchvision or timm dense block)."""
    layers = list(block.children())
    if not layers:
        raise ValueError("convert: the dense block has no layers")
    first = layers[0]
    c0 = first.norm1.num_features
    k = first.conv2.out_channels
    cb = first.conv1.out_channels
    if cb % k:
        raise ValueError(f"convert: bottleneck width {cb} is not a multiple of the growth rate {k}")
    drop_rates = {float(getattr(layer, "drop_rate", 0.0)) for layer in layers}
    if len(drop_rates) != 1:
        raise ValueError(f"convert: expected one drop_rate for the whole block, got {sorted(drop_rates)}")
    for i, layer in enumerate(layers):
        for name in ("norm1", "norm2"):
            _check_bn(getattr(layer, name), f"layer {i + 1} {name}")
        for name in ("conv1", "conv2"):
            if getattr(layer, name).bias is not None:
                raise ValueError(f"convert: layer {i + 1} {name} has a bias; DenseNet convolutions have none")
    with torch.device("meta"):
        fused = FusedDenseBlock(len(layers), c0, cb // k, k, drop_rates.pop(),
                                memory_efficient=bool(getattr(first, "memory_efficient", False)),
                                keep_bottleneck=keep_bottleneck)
    for src, dst in zip(layers, fused.children()):
        for name in ("norm1", "conv1", "norm2", "conv2"):
            setattr(dst, name, getattr(src, name))  # shared modules: they keep their own mode
        # the layer's own flag (its dropout), not recursively: that would reset the shared modules
        dst.training = src.training
        dst.relu1.training = dst.relu2.training = src.training
    fused.training = block.training
    return fused


def convert(model: nn.Module, keep_bottleneck: bool = False) -> nn.Module:
    """Replace, in place, every torchvision ``_DenseBlock`` / timm ``DenseBlock`` inside
    ``model`` by a :class:`FusedDenseBlock` holding the same modules, every torchvision
    ``_Transition`` by a :class:`FusedTransition`, and a torchvision DenseNet's ``features`` by a
    :class:`FusedFeatures` with the same children; returns ``model`` (or the new block /
    transition, when ``model`` itself is one).  ``keep_bottleneck`` is passed to every new block
    (see FusedDenseBlock).  All or nothing: every replacement is built (each block and transition
    checked) before the first one is made, so a refused conversion raises with ``model`` unchanged."""
    types = _source_block_types()
    if not types:
        return model
    new, replacements = _plan(model, "", keep_bottleneck, types, _torchvision_types())
    for parent, name, child in replacements:  # nothing below can fail
        setattr(parent, name, child)
        if not hasattr(parent, "__prepare_scriptable__"):
            parent.__prepare_scriptable__ = _ScriptCopy(parent)
    return new


class _ScriptCopy:
    """``__prepare_scriptable__`` given to a module whose children convert() replaced.  For a module
    without that hook, torch.jit.script swaps the children's scriptable equivalents (the unfused
    modules) into the module itself; with it, torch works on a shallow copy holding the same
    parameters and its own child dict, and the eager model stays fused."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self) -> nn.Module:
        new = copy.copy(self.module)
        new._modules = OrderedDict(self.module._modules)
        return new


def _plan(model, path, keep_bottleneck, types, tv):
    """(what ``model`` (named ``path``) becomes, the (parent, name, new child) replacements to make
    inside it), every new module built and checked; nothing replaced yet."""
    try:
        if isinstance(model, types):
            return convert_block(model, keep_bottleneck), []
        if tv is not None and isinstance(model, tv[0]):
            return convert_transition(model), []
    except ValueError as e:  # name the module: the message only knows the layer
        raise ValueError(f"{e} (in {path or type(model).__name__}; nothing was converted)") from None
    todo = []
    for name, child in model.named_children():
        new, inner = _plan(child, f"{path}.{name}" if path else name, keep_bottleneck, types, tv)
        todo += inner
        if new is not child:
            todo.append((model, name, new))
    if tv is not None and isinstance(model, tv[1]) and type(model.features) is nn.Sequential:
        children = OrderedDict(model.features.named_children())
        children.update({name: new for parent, name, new in todo if parent is model.features})
        features = FusedFeatures(children)
        features.training = model.features.training
        todo.append((model, "features", features))
    return model, todo
