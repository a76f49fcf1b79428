"""Which implementation of the GEMM-shaped ops the block calls.

The registered ops (``torch.ops.densenet_fused.*``, with their fakes) are what ``torch.compile``,
``torch.export`` and ``opcheck`` see, and what runs on the CPU.  The eager CUDA hot path calls the
same CUDA implementations those ops dispatch to, directly: the dispatcher's boxing and the Python
op wrapper cost more host time than a launch (tests/autograd/test_block_kernels.py checks that both give
identical results)."""
import contextlib
import contextvars
from typing import Callable, NamedTuple, Optional

import torch

import importlib

from ._triton_common import cuda_gemm_impl
from .launch import cuda_path


# the modules (the package's names bn_scale_shift, ... are the ops, which shadow them)
_ss, _c1, _c3 = (importlib.import_module(f"densenet_fused.ops.{m}")
                 for m in ("bn_scale_shift", "bnrelu_conv1x1", "bnrelu_conv3x3"))


class BlockOps(NamedTuple):
    bnrelu_conv1x1_fwd: Callable
    bnrelu_conv1x1_bwd: Callable
    bnrelu_conv3x3_fwd: Callable
    bnrelu_conv3x3_bwd: Callable
    bn_scale_shift: Callable


REGISTERED = BlockOps(_c1.bnrelu_conv1x1_fwd, _c1.bnrelu_conv1x1_bwd, _c3.bnrelu_conv3x3_fwd, _c3.bnrelu_conv3x3_bwd,
                      _ss.bn_scale_shift)
# (no device guard per call: the block holds one, _common.device_guard, for its whole sweep)
CUDA_DIRECT = BlockOps(_c1.cuda_fwd_trusted, _c1.cuda_bwd_trusted, _c3.cuda_fwd_trusted, _c3.cuda_bwd_trusted,
                       _ss.cuda_scale_shift)
# CUDA_DIRECT where every GEMM-shaped op of the step runs Triton (the implementation chosen once per step)
TRITON_DIRECT = BlockOps(_c1.triton_fwd_direct, _c1.triton_bwd_direct, _c3.triton_fwd_direct, _c3.triton_bwd_direct,
                         _ss.cuda_scale_shift)
_substitute: contextvars.ContextVar = contextvars.ContextVar("densenet_fused_block_ops", default=None)


@contextlib.contextmanager
def substituted(ops: BlockOps):
    """Blocks whose forward starts within take ``ops`` (tests: the Triton launchers on CPU tensors under
    the interpreter); restored on exit."""
    token = _substitute.set(ops)
    try:
        yield
    finally:
        _substitute.reset(token)


def block_ops(device: torch.device, direct: bool = True, dtype: Optional[torch.dtype] = None,
              conv3x3: str = "") -> BlockOps:
    """The ops the block runs on ``device``: the CUDA implementations called directly on the eager CUDA
    path (``direct``; also for the device type ``launch.routing`` names), the registered ops otherwise
    (CPU, and while ``torch.compile`` traces).  Given the step's compute ``dtype`` and 3x3 implementation
    (``conv3x3``, "" for the default), a step whose GEMM-shaped ops all run Triton gets the Triton launchers
    themselves (``TRITON_DIRECT``): the choice made once for the step, not per call."""
    sub = _substitute.get()
    if sub is not None:
        return sub
    if direct and cuda_path(device) and not torch.compiler.is_compiling():
        if dtype is not None and cuda_gemm_impl(dtype) == "triton" and (conv3x3 or _c3.conv3x3_impl()) == "triton":
            return TRITON_DIRECT
        return CUDA_DIRECT
    return REGISTERED
