"""Helpers shared by the op tests: where the Triton kernels run and the parametrizations that every
op's CPU-kernel and Triton-kernel checks use."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton kernels: interpreted on CPU tensors (TRITON_INTERPRET=1, set by conftest without a GPU) or on CUDA
TRITON_DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None,
                                  reason="Triton kernels need TRITON_INTERPRET=1 or a CUDA device")


def cpu_kernel_cases(shapes, float32_tol):
    """A CPU-kernel check over batch/running statistics, ``shapes`` and float64 (tolerance 1e-12) and
    float32 (``float32_tol``): parameters batch_stats, shape, dtype, tol."""
    marks = (pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, float32_tol)]),
             pytest.mark.parametrize("shape", shapes), pytest.mark.parametrize("batch_stats", [True, False]))
    return lambda test: _marked(test, marks)


def triton_kernel_cases(shapes):
    """A Triton-kernel check over batch/running statistics and ``shapes`` (parameters batch_stats,
    shape), skipped where Triton kernels cannot run."""
    marks = (pytest.mark.parametrize("shape", shapes), pytest.mark.parametrize("batch_stats", [True, False]),
             needs_triton)
    return lambda test: _marked(test, marks)


def _marked(test, marks):
    for mark in marks:  # innermost first, as stacked decorators apply
        test = mark(test)
    return test


def assert_deterministic(run):
    """``run()`` twice: every tensor of the two results equal bit for bit."""
    first, second = run(), run()
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def conv1x1_backward_into_zeros(bwd, dout, x, scale, shift, weight, mean, rstd):
    """(G, dweight, dgamma, dbeta) of one bnrelu_conv1x1 backward ``bwd`` accumulating into a zero G."""
    G = torch.zeros(x.shape, dtype=scale.dtype, device=x.device)
    return (G,) + bwd(dout, x, scale, shift, weight, mean, rstd, G)
