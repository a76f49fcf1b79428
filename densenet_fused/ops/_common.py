"""Helpers shared by the op files: dtype rules of the densenet_fused ops."""
import contextlib
import functools

import torch

from .._route import code_path_device_type


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of Python integers (``triton.cdiv`` is a constexpr function, slow on the host:
    benchmarks/results/host_overheads.md)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n itself for 0 and 1), as ``triton.next_power_of_2`` in plain Python."""
    return n if n <= 1 else 1 << (n - 1).bit_length()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype for a feature dtype (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_off(device_type: str):
    """torch.autocast disabled on ``device_type``'s code path (``launch.code_path_device_type``: CUDA's for the
    routed meta tensors of `cost --host`; nothing to disable where it has none)."""
    device_type = code_path_device_type(device_type)
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _current_device(default: int) -> int:
    """torch.cuda.current_device(), or ``default`` where there is no CUDA driver (fake CUDA tensors:
    `densenet-fused cost`; there is no device to switch to)."""
    try:
        return torch.cuda.current_device()
    except RuntimeError:
        return default


def device_guard(device: torch.device):
    """Launches within go to ``device``'s GPU: ``torch.cuda.device(device)`` when it is a CUDA device other
    than the current one, else nothing (one device query).  Triton launches on the current CUDA device;
    with a model on ``cuda:1`` while ``cuda:0`` is current, its kernels would be issued to the wrong GPU."""
    if device.type == "cuda" and device.index is not None and device.index != _current_device(device.index):
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_tensor_device(fn):
    """A CUDA kernel registration that launches on its first tensor argument's GPU (``device_guard``):
    the C++ CUDA kernels hold a ``CUDAGuard``; this is the same guard for the Python-registered (Triton)
    kernels.  (The block's direct hot path holds one guard for a whole sweep instead: autograd/block.py.)"""
    @functools.wraps(fn)
    def guarded(first, *args, **kwargs):
        with device_guard(first.device):
            return fn(first, *args, **kwargs)

    return guarded
