"""The model ``densenet-fused train`` trains: the package's DenseNets, torchvision's or timm's
(converted), or the same architecture on torchvision's unfused blocks (``--baseline``)."""
import os
from typing import Optional

import torch
from torch import nn

from ...modules.models import CONFIGS, densenet_bc_config
from ..baseline import torchvision_densenet
from .config import TrainError, first_line

PACKAGE_MODELS = tuple(CONFIGS)
MODEL_NAMES = ("densenet_bc",) + PACKAGE_MODELS


def check_model_name(name: str) -> None:
    if name in MODEL_NAMES:
        return
    prefix, _, rest = name.partition(":")
    if prefix in ("torchvision", "timm") and rest:
        return
    raise TrainError(f"--model {name}: unknown model; expected one of {', '.join(MODEL_NAMES)}, "
                     f"torchvision:NAME or timm:NAME")


def _package_model(name, num_classes, depth, growth_rate, baseline) -> nn.Module:
    from ...modules import models

    if name == "densenet_bc":
        depth = 100 if depth is None else depth
        growth = 12 if growth_rate is None else growth_rate
        try:
            config = densenet_bc_config(depth, growth)
        except ValueError as exc:
            raise TrainError(f"--depth {depth}: {exc}") from None
        if growth < 1:
            raise TrainError(f"--growth-rate {growth}: expected a positive integer")
        return (torchvision_densenet(config, num_classes, small_inputs=True) if baseline
                else models.densenet_bc(depth, growth, num_classes))
    if baseline:
        return torchvision_densenet(CONFIGS[name], num_classes)
    return getattr(models, name)(num_classes=num_classes)


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
    from ...modules.convert import convert
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
