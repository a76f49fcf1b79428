"""The launch plan (densenet_fused/ops/plan.py, work in progress): a recorded sequence of launches replayed on
new roots and a new workspace gives what the unplanned launches give, views at recorded offsets."""
import os

import pytest
import torch
import triton
import triton.language as tl

from densenet_fused.ops import plan

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs a GPU or the interpreter")


@triton.jit
def _scale_kernel(X, sx, OUT, a, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    tl.store(OUT + i, a * tl.load(X + i * sx, mask=ok), mask=ok)


@triton.jit
def _add_kernel(X, Y, OUT, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    tl.store(OUT + i, tl.load(X + i, mask=ok) + tl.load(Y + i, mask=ok), mask=ok)


def _sweep(x, y, out, layers=2):
    """Per layer: t = 3 * x[layer::2] (a transient), out[layer] = t + y (out: a root)."""
    from densenet_fused.ops.launch import launch
    n = y.shape[0]
    for l in range(layers):
        t = plan.alloc((n,), torch.float32, x.device)
        launch(_scale_kernel, (triton.cdiv(n, 32),), (x[l:], 2, t, 3.0, n), BLOCK=32)
        launch(_add_kernel, (triton.cdiv(n, 32),), (t, y, out[l], n), BLOCK=32)
        plan.next_layer()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2 * 50 + 1, generator=g), torch.randn(50, generator=g)
    return x.to(DEVICE), y.to(DEVICE), torch.zeros(2, 50, device=DEVICE)


def test_a_replay_on_new_roots_equals_the_unplanned_sweep():
    x, y, out = _inputs(0)
    rec = plan.Recorder([x, y, out])
    with plan.recording(rec):
        _sweep(x, y, out)
    p = rec.plan
    assert len(p.launches) == 4
    assert p.transient_bytes == 256 and p.kept_bytes == 0  # the second layer's transient reuses the first's place
    assert [a.root for a in p.launches[0].args if isinstance(a, plan.Ref)] == [0, plan.TRANSIENT]
    assert p.launches[2].args[0].offset == 4  # x[1:]: one float in
    assert p.launches[3].args[2].offset == 50 * 4  # out[1]
    x2, y2, out2 = _inputs(1)
    p.run([x2, y2, out2], p.new_workspaces(x2.device))
    ref = torch.zeros_like(out2)
    _sweep(x2, y2, ref)
    torch.testing.assert_close(out2, ref, rtol=0, atol=0)
    torch.testing.assert_close(out2[1], 3.0 * x2[1::2][:50] + y2, rtol=0, atol=0)


def test_a_launch_argument_that_is_neither_a_root_nor_planned_is_refused():
    x, y, out = _inputs(0)
    stray = torch.zeros(50, device=DEVICE)  # allocated outside plan.alloc
    from densenet_fused.ops.launch import launch
    with pytest.raises(RuntimeError, match="neither a root nor allocated through plan.alloc"):
        with plan.recording(plan.Recorder([x, y, out])):
            launch(_add_kernel, (2,), (stray, y, out[0], 50), BLOCK=32)
    assert plan._recorder.get() is None  # restored after the error


def test_kept_allocations_survive_the_next_layer_and_transients_reuse_its_region():
    rec = plan.Recorder([])
    with plan.recording(rec):
        b = plan.alloc((10,), torch.float32, "cpu")
        a = plan.alloc((10,), torch.float32, "cpu", keep=True)
        refs = [rec.ref(a), rec.ref(b)]
        rec.next_layer()
        c = plan.alloc((100,), torch.float32, "cpu")
        d = plan.alloc((70,), torch.float32, "cpu", keep=True)
        refs += [rec.ref(c), rec.ref(d)]
    assert [(r.root, r.offset) for r in refs] == [
        (plan.KEPT, 0), (plan.TRANSIENT, 0), (plan.TRANSIENT, 0), (plan.KEPT, 256)]
    assert rec.plan.transient_bytes == 512 and rec.plan.kept_bytes == 256 + 512


def test_a_transient_used_after_its_layer_is_refused_and_let_go():
    import weakref
    from densenet_fused.ops.launch import launch
    x, y, out = _inputs(0)
    rec = plan.Recorder([x, y, out])
    with pytest.raises(RuntimeError, match="neither a root nor allocated through plan.alloc"):
        with plan.recording(rec):
            t = plan.alloc((50,), torch.float32, x.device)
            gone = weakref.ref(plan.alloc((50,), torch.float32, x.device))
            plan.next_layer()
            assert gone() is None  # the recording holds no transient past its layer
            launch(_add_kernel, (2,), (t, y, out[0], 50), BLOCK=32)  # t's region belongs to the next layer


_COMPILED_REPLAY = r"""
import json, sys, torch, triton
sys.path.insert(0, sys.argv[1])
import test_plan as T
from densenet_fused.ops import plan
from densenet_fused.tools.host_cost import stand_in
calls = []
with stand_in(triton.runtime.driver):
    utils = triton.runtime.driver.active.utils
    utils.launch = lambda *a: calls.append(a)  # the stub: what would reach cuLaunchKernel
    def ptrs(call):  # what the C launcher gets, tensors as their pointers, other objects by type
        def norm(a):
            if isinstance(a, torch.Tensor):
                return a.data_ptr()
            if isinstance(a, (tuple, list)):
                return [norm(b) for b in a]
            return a if a is None or isinstance(a, (int, float, str)) else type(a).__name__
        return norm(call)
    x, y, out = (t.cpu() for t in T._inputs(0))
    rec = plan.Recorder([x, y, out])
    with plan.recording(rec):
        T._sweep(x, y, out)
    x2, y2, out2 = (t.cpu() for t in T._inputs(1))
    kept, ws = rec.plan.new_workspaces("cpu")
    calls.clear()
    rec.plan.run([x2, y2, out2], (kept, ws))
    planned = [ptrs(c) for c in calls]
    calls.clear()
    # the unplanned sweep on the same roots, its transients where the plan puts them
    n = 50
    t0 = ws[:n * 4].view(torch.float32)
    from densenet_fused.ops.launch import launch
    for l in range(2):
        launch(T._scale_kernel, (triton.cdiv(n, 32),), (x2[l:], 2, t0, 3.0, n), BLOCK=32)
        launch(T._add_kernel, (triton.cdiv(n, 32),), (t0, y2, out2[l], n), BLOCK=32)
    print(json.dumps({"planned": planned, "unplanned": [ptrs(c) for c in calls]}))
"""


def test_the_compiled_replay_passes_the_pointers_the_unplanned_launches_pass(tmp_path):
    """The integer-pointer replay (compiled for sm_90a under the stand-in driver, its launch call captured):
    every launch gets the same arguments, pointers included, as the unplanned launches on the same roots."""
    import json
    import subprocess
    import sys
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", _COMPILED_REPLAY, os.path.dirname(__file__)], capture_output=True,
                         text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(got["planned"]) == 4 and got["planned"] == got["unplanned"]


def test_a_later_recording_takes_an_earlier_ones_kept_allocations_as_parts_of_a_root():
    """A backward's recording sees its forward's kept outputs (statistics, folded maps) as offsets into the
    forward's kept workspace, one of its roots."""
    x, y, out = _inputs(0)
    fwd = plan.Recorder([x])
    with plan.recording(fwd):
        t = plan.alloc((50,), torch.float32, x.device)
        kept = plan.alloc((50,), torch.float32, x.device, keep=True)
        second = plan.alloc((7,), torch.float32, x.device, keep=True)
    bwd = plan.Recorder([y, out], inherit=(fwd, 2))
    assert (bwd.ref(kept).root, bwd.ref(kept).offset) == (2, 0)
    assert (bwd.ref(second[3:]).root, bwd.ref(second[3:]).offset) == (2, 256 + 12)
    with pytest.raises(RuntimeError, match="neither a root"):
        bwd.ref(t)  # the forward's transients are dead by its backward


def test_a_blocks_training_step_records_every_launch_argument():
    """A small block's training step on the Triton launchers (interpreted): the forward's and the backward's
    every launch argument is a root or a planned allocation (the backward inheriting the forward's kept
    ones), four launches per layer forward (plus the first layer's BN map) and six backward."""
    from blockutil import triton_block_ops
    from densenet_fused import FusedDenseBlock
    from densenet_fused.ops.table import substituted
    torch.manual_seed(0)
    blk = FusedDenseBlock(3, 5, 2, 4, drop_rate=0.2).train()
    x = torch.randn(2, 5, 6, 5, requires_grad=True)
    fwd = plan.Recorder([])
    from densenet_fused import planning
    with substituted(triton_block_ops()), planning(False):  # (the block's own plan would record inside)
        with plan.recording(fwd):
            out = blk(x)
        bwd = plan.Recorder([], inherit=(fwd, -3))
        with plan.recording(bwd):
            out.backward(torch.randn_like(out))
    assert len(fwd.plan.launches) == 4 * 3 + 1 and len(bwd.plan.launches) == 6 * 3
    assert fwd.plan.kept_bytes > 0 and fwd.plan.transient_bytes > 0
    inherited = {a.root for pl in bwd.plan.launches for a in pl.args if isinstance(a, plan.Ref)}
    assert -3 in inherited  # the forward's statistics and folded maps
