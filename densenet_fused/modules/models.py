"""DenseNet models on FusedDenseBlock, FusedTransition and the fused head, state_dict-compatible
with torchvision's.

``DenseNet``, ``densenet121/161/169/201/264`` mirror ``torchvision.models.densenet``
(module names, initialization, forward), so torchvision checkpoints load with
``strict=True``.  ``densenet_bc(depth, growth_rate, num_classes)`` is DenseNet-BC for
32x32 inputs (Huang et al., CIFAR setting).  ``torch.jit.script(model)`` compiles torchvision's
forward on the same parameters (``__prepare_scriptable__``): the scripted model runs unfused.
"""
from collections import OrderedDict
from typing import Dict, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import FusedFeatures
from .dense import FusedDenseBlock
from .transition import FusedTransition


class DenseNetConfig(NamedTuple):
    """The architecture of a DenseNet: ``DenseNet(**config._asdict())``."""
    growth_rate: int
    block_config: Tuple[int, ...]
    num_init_features: int


# torchvision's configurations (densenet264: Huang et al. 2017), the one table the tools read as well.
CONFIGS: Dict[str, DenseNetConfig] = {
    "densenet121": DenseNetConfig(32, (6, 12, 24, 16), 64),
    "densenet161": DenseNetConfig(48, (6, 12, 36, 24), 96),
    "densenet169": DenseNetConfig(32, (6, 12, 32, 32), 64),
    "densenet201": DenseNetConfig(32, (6, 12, 48, 32), 64),
    "densenet264": DenseNetConfig(32, (6, 12, 64, 48), 64),
}


def densenet_bc_config(depth: int, growth_rate: int) -> DenseNetConfig:
    """DenseNet-BC for 32x32 inputs: 3 blocks of (depth - 4) / 6 layers, 2k stem features."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"densenet_bc: expected depth = 6n + 4 with n >= 1 (e.g. 100, 190, 250), got {depth}")
    n = (depth - 4) // 6
    return DenseNetConfig(growth_rate, (n, n, n), 2 * growth_rate)


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al. 2017) with fused dense blocks.

    Args are torchvision's (defaults: densenet121); ``small_inputs=True`` uses the CIFAR stem (one 3x3
    convolution, no BN/pooling before the first block) for 32x32 inputs.
    """

    def __init__(self, growth_rate: int = CONFIGS["densenet121"].growth_rate,
                 block_config: Sequence[int] = CONFIGS["densenet121"].block_config,
                 num_init_features: int = CONFIGS["densenet121"].num_init_features, bn_size: int = 4,
                 drop_rate: float = 0.0, num_classes: int = 1000, memory_efficient: bool = False,
                 small_inputs: bool = False) -> None:
        super().__init__()
        if small_inputs:
            stem = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False))]
        else:
            stem = [
                ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = FusedFeatures(OrderedDict(stem))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = FusedDenseBlock(num_layers=num_layers, num_input_features=num_features, bn_size=bn_size,
                                    growth_rate=growth_rate, drop_rate=drop_rate, memory_efficient=memory_efficient)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = FusedTransition(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def __prepare_scriptable__(self) -> "ScriptableDenseNet":
        """What ``torch.jit.script`` compiles: torchvision's DenseNet forward (features, ReLU, global
        average pool, classifier) on these very modules; the blocks and transitions run unfused."""
        return ScriptableDenseNet(self.features, self.classifier, self.training)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.features, FusedFeatures):  # norm5, ReLU and the global pool fused
            return self.classifier(self.features.forward_pooled(x))
        features = self.features(x)  # features replaced by the user: torchvision's head
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


class ScriptableDenseNet(nn.Module):
    """torchvision's ``DenseNet.forward`` in TorchScript-compatible code, holding a DenseNet's
    ``features`` and ``classifier`` modules (what ``torch.jit.script`` compiles for DenseNet)."""

    def __init__(self, features: nn.Module, classifier: nn.Module, training: bool) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.training = training

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


def _named(name: str, kwargs) -> DenseNet:
    return DenseNet(**CONFIGS[name]._asdict(), **kwargs)


def densenet121(**kwargs) -> DenseNet:
    return _named("densenet121", kwargs)


def densenet161(**kwargs) -> DenseNet:
    return _named("densenet161", kwargs)


def densenet169(**kwargs) -> DenseNet:
    return _named("densenet169", kwargs)


def densenet201(**kwargs) -> DenseNet:
    return _named("densenet201", kwargs)


def densenet264(**kwargs) -> DenseNet:
    return _named("densenet264", kwargs)


def densenet_bc(depth: int = 100, growth_rate: int = 12, num_classes: int = 10, **kwargs) -> DenseNet:
    """DenseNet-BC for 32x32 inputs: 3 blocks of (depth - 4) / 6 layers, 2k stem features."""
    return DenseNet(**densenet_bc_config(depth, growth_rate)._asdict(), num_classes=num_classes, small_inputs=True,
                    **kwargs)
