"""The model ``densenet-fused train`` trains: the package's DenseNets, torchvision's or timm's
(converted), or the same architecture on torchvision's unfused blocks (``--baseline``)."""
import os
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import nn

from .config import TrainError, first_line

PACKAGE_MODELS = ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264")
MODEL_NAMES = ("densenet_bc",) + PACKAGE_MODELS


def architecture(model: nn.Module) -> Tuple[int, Tuple[int, ...], int]:
    """(growth rate, layers per block, stem features) of one of the package's DenseNets, read from
    the model densenet_fused.models built (the configurations live there alone)."""
    from ...modules import FusedDenseBlock

    blocks = [m for m in model.features.children() if isinstance(m, FusedDenseBlock)]
    return blocks[0].growth_rate, tuple(len(b) for b in blocks), model.features.conv0.out_channels


def _torchvision_densenet(growth, blocks, init, num_classes, small_inputs):
    """torchvision's DenseNet (unfused blocks), with the CIFAR stem (one 3x3 convolution) for
    ``small_inputs``: the same module names and state_dict keys as the package's models."""
    import torchvision

    m = torchvision.models.DenseNet(growth, blocks, init, num_classes=num_classes)
    if small_inputs:
        conv0 = nn.Conv2d(3, init, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv0.weight)
        rest = [(n, c) for n, c in m.features.named_children() if n not in ("conv0", "norm0", "relu0", "pool0")]
        m.features = nn.Sequential(OrderedDict([("conv0", conv0)] + rest))
    return m


def check_model_name(name: str) -> None:
    if name in MODEL_NAMES:
        return
    prefix, _, rest = name.partition(":")
    if prefix in ("torchvision", "timm") and rest:
        return
    raise TrainError(f"--model {name}: unknown model; expected one of {', '.join(MODEL_NAMES)}, "
                     f"torchvision:NAME or timm:NAME")


def _package_model(name, num_classes, depth, growth_rate, baseline) -> nn.Module:
    from ... import models

    if name == "densenet_bc":
        depth = 100 if depth is None else depth
        growth = 12 if growth_rate is None else growth_rate
        if depth < 10 or (depth - 4) % 6:
            raise TrainError(f"--depth {depth}: densenet_bc expects depth = 6n + 4 with n >= 1 (e.g. 40, 100, 190)")
        if growth < 1:
            raise TrainError(f"--growth-rate {growth}: expected a positive integer")
        n = (depth - 4) // 6
        return (_torchvision_densenet(growth, (n, n, n), 2 * growth, num_classes, small_inputs=True) if baseline
                else models.densenet_bc(depth, growth, num_classes))
    if not baseline:
        return getattr(models, name)(num_classes=num_classes)
    with torch.random.fork_rng(devices=[]):  # read its architecture; the baseline's weights draw the same numbers
        arch = architecture(getattr(models, name)(num_classes=num_classes))
    return _torchvision_densenet(*arch, num_classes, small_inputs=False)


def _hub_model(name, num_classes) -> nn.Module:
    prefix, _, arch = name.partition(":")
    if prefix == "torchvision":
        import torchvision
        try:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        except (ValueError, KeyError, TypeError) as exc:
            raise TrainError(f"--model {name}: torchvision cannot build it ({first_line(exc)})") from None
    try:
        import timm
    except ImportError:
        raise TrainError(f"--model {name}: needs timm (pip install timm)") from None
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"--model {name}: timm cannot build it ({first_line(exc)})") from None


def _load_weights(model: nn.Module, weights: str, name: str, num_classes: int) -> None:
    if not os.path.isfile(weights):
        raise TrainError(f"--weights {weights}: no such file")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise TrainError(f"--weights {weights}: cannot load it ({first_line(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "epoch" in state:
        state = state["model"]  # a checkpoint.pt of this command
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise TrainError(f"--weights {weights}: does not match --model {name} with {num_classes} classes "
                         f"({first_line(exc)})") from None


def build_model(name: str, num_classes: int, depth: Optional[int] = None, growth_rate: Optional[int] = None,
                baseline: bool = False, weights: Optional[str] = None) -> nn.Module:
    """The model to train (CPU, float32, training mode); ``weights`` is a local state_dict
    (or a checkpoint.pt of this command) loaded with strict=True."""
    from ...convert import convert
    from ...modules import FusedDenseBlock

    check_model_name(name)
    hub = name.partition(":")[0] in ("torchvision", "timm")
    model = _hub_model(name, num_classes) if hub else _package_model(name, num_classes, depth, growth_rate, baseline)
    if weights is not None:
        _load_weights(model, weights, name, num_classes)
    if hub and not baseline:
        model = convert(model)
        if not any(isinstance(m, FusedDenseBlock) for m in model.modules()):
            raise TrainError(f"--model {name}: has no dense block to fuse; pass --baseline to train it unchanged")
    return model.train()
