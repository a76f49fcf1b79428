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

from .distributed import _WORLD
from .modules import FusedDenseBlock, FusedDenseLayer


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (same arguments; returns the converted
    module), but fused dense blocks and layers keep their nn.BatchNorm2d norms and synchronize their
    batch statistics over ``process_group`` (None: the default group) themselves."""
    if isinstance(module, (FusedDenseBlock, FusedDenseLayer)):
        module.sync_group = _WORLD if process_group is None else process_group
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in list(module.named_children()):
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            module.add_module(name, new)
    return module
