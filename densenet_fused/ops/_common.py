"""Helpers shared by the op files: dtype rules of the densenet_fused ops."""
import functools

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype for a feature dtype (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def on_tensor_device(fn):
    """A CUDA kernel registration that launches on its first tensor argument's GPU.

    Triton launches on the current CUDA device; with a model on ``cuda:1`` while ``cuda:0`` is
    current, its kernels would be issued to the wrong GPU. The C++ CUDA kernels hold a
    ``CUDAGuard``; this is the same guard for the Python-registered (Triton) kernels, and costs
    one device query when the device is already current."""
    @functools.wraps(fn)
    def guarded(first, *args, **kwargs):
        dev = first.device
        if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return guarded
