"""The rules shared by the fused modules (dense block, transition, stem, head), each in one place: the
input check, the hooks a fused module cannot call, the batch of one in training, the compute dtype.
Every message names what was expected.  Imports nothing of the package but the launch seam (ops/launch.py,
the lowest layer: which device type's code path a tensor takes), so any layer may use it."""
from typing import Optional

import torch
from torch import Tensor, nn

from .ops.launch import code_path_device_type

HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward, forward-pre, backward or backward-pre hooks of its own."""
    d = module.__dict__  # (direct, and no generator: it runs for every module of a block in every step)
    return bool(d.get("_forward_hooks") or d.get("_forward_pre_hooks") or d.get("_backward_hooks")
                or d.get("_backward_pre_hooks"))


def check_batch(training: bool, values_per_channel: int, size) -> None:
    """nn.BatchNorm2d's refusal of one value per channel in training (its message)."""
    if training and values_per_channel == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def compute_dtype(x: Tensor, param: Tensor, who: str, never_cast: bool = False) -> torch.dtype:
    """The dtype a fused module computes in: torch.autocast's where it is on (and applies: not with
    ``never_cast``, e.g. float64 tensors), else the parameters', which the input must have."""
    dev = code_path_device_type(x.device)
    amp: Optional[torch.dtype] = None
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        amp = torch.get_autocast_dtype(dev)
    if amp is not None and not never_cast:
        return amp
    if x.dtype != param.dtype:
        raise TypeError(f"{who}: expected input of dtype {param.dtype} (the parameters' dtype), got {x.dtype}; "
                        f"use torch.autocast for mixed precision")
    return param.dtype


def check_input(x, channels: int, who: str, min_hw: int = 0, channels_name: str = "") -> None:
    """x: a floating-point 4-D (N, C, H, W) tensor with ``channels`` channels (``channels_name``:
    the argument that sets them, named in the message) and H, W >= ``min_hw``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{who}: expected a 4-D input (N, C, H, W), got a {x.dim()}-D tensor of shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] != channels:
        named = f" ({channels_name})" if channels_name else ""
        raise ValueError(f"{who}: expected input with {channels} channels{named}, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point input, got {x.dtype}")
    if x.shape[2] < min_hw or x.shape[3] < min_hw:
        raise ValueError(f"{who}: expected H and W >= {min_hw}, got input shape {tuple(x.shape)}")
