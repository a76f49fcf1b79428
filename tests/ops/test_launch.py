"""The launch seam (densenet_fused/ops/launch.py): observers, routing, and the per-signature cache of
compiled launches (GPU machines) agreeing with Triton's own launch path."""
import os

import pytest
import torch
import triton
import triton.language as tl

from densenet_fused.ops import block_ops, launch as seam
from densenet_fused.ops.table import CUDA_DIRECT, REGISTERED, TRITON_DIRECT

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _axpy_kernel(X, Y, OUT, a, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    tl.store(OUT + i, a * tl.load(X + i, mask=ok) + tl.load(Y + i, mask=ok), mask=ok)


def _runnable():
    return torch.cuda.is_available() or INTERPRET


@pytest.mark.skipif(not _runnable(), reason="needs a GPU or TRITON_INTERPRET=1")
def test_launch_runs_the_kernel_and_an_observer_sees_every_launch():
    x, y = torch.randn(100, device=DEVICE), torch.randn(100, device=DEVICE)
    out = torch.zeros(100, device=DEVICE)
    seen = []
    with seam.recording(lambda kernel, args, constexprs: seen.append((kernel, len(args), constexprs)), execute=True):
        seam.launch(_axpy_kernel, (triton.cdiv(100, 32),), (x, y, out, 2.0, 100), BLOCK=32)
    torch.testing.assert_close(out, 2.0 * x + y, rtol=0, atol=0)
    assert seen == [(_axpy_kernel, 5, {"BLOCK": 32})]
    assert seam.observer_active() is None  # restored on exit


@pytest.mark.skipif(not _runnable(), reason="needs a GPU or TRITON_INTERPRET=1")
def test_recording_without_execute_launches_nothing():
    x = torch.randn(64, device=DEVICE)
    out = torch.zeros(64, device=DEVICE)
    calls = []
    with seam.recording(lambda *a: calls.append(a)):
        seam.launch(_axpy_kernel, (2,), (x, x, out, 1.0, 64), BLOCK=32)
    assert len(calls) == 1 and torch.count_nonzero(out) == 0


def test_recording_is_restored_after_an_error():
    with pytest.raises(ZeroDivisionError):
        with seam.recording(lambda *a: None):
            1 / 0
    assert seam.observer_active() is None


def test_routing_sends_meta_tensors_to_the_cuda_implementations_within_its_scope_only():
    meta = torch.device("meta")
    assert block_ops(torch.device("cpu")) is REGISTERED
    assert block_ops(meta) is REGISTERED
    with seam.routing("meta"):
        assert block_ops(meta) is CUDA_DIRECT
        assert block_ops(meta, dtype=torch.bfloat16) is TRITON_DIRECT  # chosen once for the step
        assert block_ops(meta, dtype=torch.bfloat16, conv3x3="aten") is CUDA_DIRECT
        assert block_ops(meta, dtype=torch.float64) is CUDA_DIRECT  # cuBLAS / cuDNN, chosen per call
        assert block_ops(meta, direct=False) is REGISTERED
        assert block_ops(torch.device("cpu")) is REGISTERED
    assert block_ops(meta) is REGISTERED


def test_signature_separates_what_triton_specializes_on():
    base = torch.empty(64, dtype=torch.float32)
    a = seam._signature((base, 16, 1.5), {"B": 32})
    assert a == seam._signature((torch.empty(64, dtype=torch.float32), 16, 2.5), {"B": 32})  # floats by type only
    assert a != seam._signature((base[1:], 16, 1.5), {"B": 32})           # a 4-byte offset: not 16-byte aligned
    assert a != seam._signature((base.to(torch.float16), 16, 1.5), {"B": 32})  # another dtype
    assert a != seam._signature((base, 17, 1.5), {"B": 32})               # another integer
    assert a != seam._signature((base, 16, 1.5), {"B": 64})               # another constexpr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled-launch cache runs on a GPU")
def test_cached_launch_equals_tritons_own_launch():
    """The second launch of a signature goes straight to the compiled kernel's launcher: same result as
    Triton's own path, for another alignment too (a new entry, not a wrong reuse)."""
    seam.clear_cache()
    x, y = torch.randn(1000, device="cuda"), torch.randn(1000, device="cuda")
    for offset in (0, 1):
        xs, ys = x[offset:], y[offset:]
        n = xs.numel()
        ref = torch.empty(n, device="cuda")
        _axpy_kernel[(triton.cdiv(n, 128),)](xs, ys, ref, 3.0, n, BLOCK=128)
        for _ in range(3):  # first: Triton's path; then the cache
            out = torch.empty(n, device="cuda")
            seam.launch(_axpy_kernel, (triton.cdiv(n, 128),), (xs, ys, out, 3.0, n), BLOCK=128)
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert len(seam._compiled) == 2
