"""convert_sync_batchnorm: synchronized batch statistics for a model with fused dense blocks.

``torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)`` works with fused blocks too (their
norms become nn.SyncBatchNorm and the block takes its statistics over their group), but
DistributedDataParallel refuses any nn.SyncBatchNorm in a CPU model ("SyncBatchNorm layers only
work with GPU modules").  This function gives fused blocks the same synchronized statistics while
their norms stay nn.BatchNorm2d, so gloo (CPU) training works as well; every other BatchNorm of the
model is converted by torch's function.
"""
import torch
from torch import nn

from ..autograd.distributed import _WORLD
from .features import STEM, FusedFeatures
from .dense import FusedDenseBlock, FusedDenseLayer
from .transition import FusedTransition


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (same arguments; returns the converted
    module), but fused modules (dense blocks and layers, transitions, and a FusedFeatures container
    for its fused stem and head) keep their nn.BatchNorm2d norms and synchronize their batch
    statistics over ``process_group`` (None: the default group) themselves."""
    group = _WORLD if process_group is None else process_group
    if isinstance(module, (FusedDenseBlock, FusedDenseLayer, FusedTransition)):
        module.sync_group = group
        return module
    if isinstance(module, FusedFeatures):  # norm0 (fused stem) and norm5 (fused head) synchronized by it
        module.sync_group = group
        for name, child in list(module.named_children()):
            if name in (STEM[1], "norm5") and type(child) is nn.BatchNorm2d:
                continue
            new = convert_sync_batchnorm(child, process_group)
            if new is not child:
                module.add_module(name, new)
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in list(module.named_children()):
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            module.add_module(name, new)
    return module
