"""Which device type's code path a tensor takes: ``routing(device_type)`` makes tensors of another device
type (meta tensors in `densenet-fused cost --host`) take the CUDA implementations of the ops and CUDA's
autocast state, within its scope (a context variable, restored on exit: no process-wide switch).
Imports nothing of the package, so every layer may use it (the launch seam re-exports it)."""
import contextlib
import contextvars

import torch

_cuda_route: contextvars.ContextVar = contextvars.ContextVar("densenet_fused_cuda_route", default=None)


@contextlib.contextmanager
def routing(device_type: str):
    """Within, tensors of ``device_type`` (e.g. "meta") take the ops' CUDA implementations, and the modules
    choose their compute dtype by CUDA's autocast state (``code_path_device_type``)."""
    token = _cuda_route.set(device_type)
    try:
        yield
    finally:
        _cuda_route.reset(token)


def code_path_device_type(device) -> str:
    """The device type whose code path, and whose autocast state, tensors on ``device`` (a torch.device or a
    device type) take: "cuda" for the device type ``routing`` names (meta tensors in `cost --host` run as
    CUDA tensors, under CUDA's autocast as a model on the GPU does), else the device's own."""
    t = device if isinstance(device, str) else device.type
    return "cuda" if t == _cuda_route.get() else t


def cuda_path(device: torch.device) -> bool:
    """Whether ops on ``device`` take their CUDA (Triton) implementations."""
    return device.type == "cuda" or device.type == _cuda_route.get()
