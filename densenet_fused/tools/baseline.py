"""The unfused baseline of the tools: torchvision's DenseNet of one of densenet_fused.modules.models'
configurations, with the same module names and state_dict keys as the package's model."""
from collections import OrderedDict

from torch import nn

from ..modules.models import DenseNetConfig

_IMAGENET_STEM = ("conv0", "norm0", "relu0", "pool0")


def torchvision_densenet(config: DenseNetConfig, num_classes: int = 1000, small_inputs: bool = False,
                         memory_efficient: bool = False) -> nn.Module:
    """torchvision's DenseNet (unfused blocks) of ``config``; ``small_inputs`` gives it the CIFAR stem
    of ``densenet_fused.DenseNet`` (one 3x3 convolution, no BN/pooling before the first block)."""
    import torchvision

    m = torchvision.models.DenseNet(**config._asdict(), num_classes=num_classes, memory_efficient=memory_efficient)
    if small_inputs:
        conv0 = nn.Conv2d(3, config.num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv0.weight)
        rest = [(n, c) for n, c in m.features.named_children() if n not in _IMAGENET_STEM]
        m.features = nn.Sequential(OrderedDict([("conv0", conv0)] + rest))
    return m
