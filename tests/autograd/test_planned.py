"""A block's planned training step (densenet_fused/autograd/planned.py) against the unplanned one, bit for
bit, on the Triton launchers under the interpreter: output, input and parameter gradients, running
statistics, over several steps (the first records its forward and backward, the later ones replay both,
on workspaces filled with NaN so that nothing a replay reads is left to chance)."""
import contextlib
import copy
import os

import pytest
import torch

from blockutil import triton_block_ops
from densenet_fused import FusedDenseBlock
from densenet_fused.autograd.planned import _plans, planning
from densenet_fused.ops.plan import poisoned
from densenet_fused.ops.table import substituted

INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="the interpreter's replay")


def _steps(blk, xs, gs, planned, autocast=None):
    outs = []
    ctx = planning(planned)
    amp = torch.autocast("cuda", autocast) if autocast is not None else contextlib.nullcontext()
    with substituted(triton_block_ops()), ctx, poisoned(), amp:
        for i, (x, g) in enumerate(zip(xs, gs)):
            torch.manual_seed(100 + i)  # the dropout seeds
            x = x.clone().requires_grad_()
            out = blk(x)
            out.backward(g)
            outs.append((out.detach(), x.grad, [p.grad.clone() for p in blk.parameters()],
                         [b.clone() for b in blk.buffers()]))
            for p in blk.parameters():
                p.grad = None
    return outs


@INTERPRETED
@pytest.mark.parametrize("drop_rate", [0.0, 0.25])
def test_planned_steps_equal_unplanned_ones_bit_for_bit(drop_rate):
    torch.manual_seed(0)
    ref = FusedDenseBlock(3, 5, 2, 4, drop_rate=drop_rate).train()
    blk = copy.deepcopy(ref)
    xs = [torch.randn(2, 5, 6, 5) for _ in range(3)]
    gs = [torch.randn(2, 17, 6, 5) for _ in range(3)]
    want = _steps(ref, xs, gs, planned=False)
    got = _steps(blk, xs, gs, planned=True)
    plans = _plans.get(next(iter(blk.values())))
    assert plans is not None and len(plans) == 1 and _plans.get(next(iter(ref.values()))) is None
    bp = next(iter(plans.values()))
    assert bp.fwd is not None and bp.bwd is not None and len(bp.grads) == 6 * 3
    for (o1, dx1, g1, b1), (o2, dx2, g2, b2) in zip(want, got):
        assert torch.equal(o1, o2) and torch.equal(dx1, dx2)
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))
        assert all(torch.equal(a, b) for a, b in zip(b1, b2))


def _shapes_and_retained(blk, planned):
    """Steps on two input shapes (A, B, A: the third replays A's plan), each with two backwards
    (retain_graph: the recording step's second backward runs unplanned, a replayed step's replays again)."""
    outs = []
    with substituted(triton_block_ops()), planning(planned), poisoned():
        for i, n in enumerate((2, 3, 2)):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(n, 5, 4, 3, generator=g).requires_grad_()
            torch.manual_seed(10 + i)
            out = blk(x)
            grad = torch.randn(out.shape, generator=g)
            first = torch.autograd.grad(out, [x, *blk.parameters()], grad, retain_graph=True)
            second = torch.autograd.grad(out, [x, *blk.parameters()], grad)
            outs.append((out.detach(), first, second))
    return outs


@INTERPRETED
def test_a_second_signature_and_a_retained_graph_equal_unplanned_steps():
    torch.manual_seed(0)
    ref = FusedDenseBlock(2, 5, 2, 3, drop_rate=0.2).train()
    blk = copy.deepcopy(ref)
    want = _shapes_and_retained(ref, planned=False)
    got = _shapes_and_retained(blk, planned=True)
    plans = _plans.get(next(iter(blk.values())))
    assert len(plans) == 2 and all(p.bwd is not None for p in plans.values())
    for (o1, f1, s1), (o2, f2, s2) in zip(want, got):
        assert torch.equal(o1, o2)
        assert all(torch.equal(a, b) for a, b in zip(f1 + s1, f2 + s2))


def test_planning_takes_a_bool():
    with pytest.raises(TypeError, match="expected enabled to be a bool"):
        with planning("no"):
            pass


def _recorded(blk):
    plans = _plans.get(next(iter(blk.values())))
    return plans is not None and len(plans) == 1 and next(iter(plans.values())).bwd is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled replay needs a GPU")
def test_planned_steps_on_the_gpu_equal_unplanned_ones_bit_for_bit():
    """The compiled replay (integer pointers into the launchers), bf16 autocast, channels-last, dropout on:
    the kernels reduce in a fixed order, so planned and unplanned steps agree bit for bit."""
    torch.manual_seed(0)
    ref = FusedDenseBlock(6, 64, 4, 32, drop_rate=0.1).cuda().to(memory_format=torch.channels_last).train()
    blk = copy.deepcopy(ref)
    xs = [torch.randn(8, 64, 14, 14, device="cuda").to(memory_format=torch.channels_last) for _ in range(3)]
    gs = [torch.randn(8, 64 + 6 * 32, 14, 14, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    want = _steps(ref, xs, gs, planned=False, autocast=torch.bfloat16)
    got = _steps(blk, xs, gs, planned=True, autocast=torch.bfloat16)
    assert _recorded(blk) and not _recorded(ref)
    for (o1, dx1, g1, b1), (o2, dx2, g2, b2) in zip(want, got):
        assert torch.equal(o1, o2) and torch.equal(dx1, dx2)
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))
        assert all(torch.equal(a, b) for a, b in zip(b1, b2))


def _train_steps(blk, planned, wrap, steps=2):
    """``steps`` training steps of blk with ``wrap(blk, x)`` as the forward: (output, dx, gradients) each."""
    outs = []
    with substituted(triton_block_ops()), planning(planned), poisoned():
        for i in range(steps):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(2, 5, 4, 3, generator=g).requires_grad_()
            torch.manual_seed(10 + i)
            out = wrap(blk, x)
            grads = torch.autograd.grad(out, [x, *blk.parameters()], torch.randn(out.shape, generator=g))
            outs.append((out.detach(), grads))
    return outs


def _on_cpu(blk, x):
    with torch.autograd.graph.save_on_cpu():
        return blk(x)


def _checkpointed(blk, x):
    from torch.utils.checkpoint import checkpoint
    return checkpoint(blk, x, use_reentrant=False)


@INTERPRETED
@pytest.mark.parametrize("wrap", [_on_cpu, _checkpointed], ids=["save_on_cpu", "checkpoint"])
def test_saved_tensors_handed_back_anew_refuse_the_plan_and_train_as_unplanned(wrap):
    """A saved-tensor hook or a recomputing checkpoint gives the backward new tensors, whose places the
    forward's recording does not know: the backward runs unplanned, with the same results (after a hook the
    signature is refused; under a checkpoint the recomputed forward's recording supersedes the first, and
    no backward is recorded against either)."""
    torch.manual_seed(0)
    ref = FusedDenseBlock(2, 5, 2, 3, drop_rate=0.2).train()
    blk = copy.deepcopy(ref)
    want = _train_steps(ref, False, wrap, steps=3)
    got = _train_steps(blk, True, wrap, steps=3)
    for (o1, g1), (o2, g2) in zip(want, got):
        assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    plans = _plans.get(next(iter(blk.values())))
    assert len(plans) == 1
    bp = next(iter(plans.values()))
    if wrap is _on_cpu:
        assert "saved tensors back as new tensors" in bp.refused
    else:
        assert bp.refused is None and bp.fwd is not None and bp.bwd is None


@INTERPRETED
def test_a_training_forward_in_inference_mode_is_not_planned():
    torch.manual_seed(0)
    blk = FusedDenseBlock(2, 5, 2, 3).train()
    with substituted(triton_block_ops()), torch.inference_mode():
        out = blk(torch.randn(2, 5, 4, 3))
    assert out.shape == (2, 11, 4, 3) and _plans.get(next(iter(blk.values()))) is None


@INTERPRETED
def test_a_recording_forward_without_its_backward_keeps_nothing_alive():
    """The recording handed to the backward holds no root: a forward whose backward never runs frees its
    output (and the autograd graph behind it) at once, with no help from the cycle collector."""
    import gc
    import weakref
    torch.manual_seed(0)
    blk = FusedDenseBlock(2, 5, 2, 3).train()
    gc.disable()
    try:
        with substituted(triton_block_ops()):
            out = blk(torch.randn(2, 5, 4, 3, requires_grad=True))
        alive = weakref.ref(out)
        assert out.grad_fn is not None
        del out
        assert alive() is None
    finally:
        gc.enable()


def _traced_backward_steps(blk, planned, monkeypatch, traced):
    """Three steps; the backward of those in ``traced`` runs with torch.compiler.is_compiling() true, as
    under compiled autograd (which traces the block's backward; the interpreter cannot be traced, so the
    trace is stood in for)."""
    outs = []
    with substituted(triton_block_ops()), planning(planned), poisoned():
        for i in range(3):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(2, 5, 4, 3, generator=g).requires_grad_()
            out = blk(x)
            grad = torch.randn(out.shape, generator=g)
            with monkeypatch.context() as mp:
                if i in traced:
                    mp.setattr(torch.compiler, "is_compiling", lambda: True)
                grads = torch.autograd.grad(out, [x, *blk.parameters()], grad)
            outs.append((out.detach(), grads))
    return outs


@INTERPRETED
def test_a_traced_backward_refuses_the_plan_and_trains_as_unplanned(monkeypatch):
    """A backward traced from the first step on (compiled autograd) records nothing (its launches would not
    pass the seam as pointers): the signature is refused and every step equals an unplanned one."""
    torch.manual_seed(0)
    ref = FusedDenseBlock(2, 5, 2, 3).train()
    blk = copy.deepcopy(ref)
    want = _traced_backward_steps(ref, False, monkeypatch, traced=(0, 1, 2))
    got = _traced_backward_steps(blk, True, monkeypatch, traced=(0, 1, 2))
    for (o1, g1), (o2, g2) in zip(want, got):
        assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    bp = next(iter(_plans[next(iter(blk.values()))].values()))
    assert "traced (compiled autograd)" in bp.refused and bp.fwd is None and bp.bwd is None


@INTERPRETED
def test_a_traced_backward_after_a_replayed_forward_raises_and_refuses_the_plan(monkeypatch):
    """Step 0 records, step 1's forward replays and its backward is traced: a replayed forward kept its
    statistics only in the plan's workspace, so that backward cannot run unplanned; it says so, and the
    signature's later steps run unplanned."""
    torch.manual_seed(0)
    blk = FusedDenseBlock(2, 5, 2, 3).train()
    with pytest.raises(RuntimeError, match=r"replayed a recorded launch plan.*planning\(False\)"):
        _traced_backward_steps(blk, True, monkeypatch, traced=(1,))
    bp = next(iter(_plans[next(iter(blk.values()))].values()))
    assert "traced (compiled autograd)" in bp.refused


def test_a_backward_recording_without_launches_refuses_the_plan():
    """A recorded backward whose launches did not pass the seam would replay as nothing: refused instead."""
    from densenet_fused.autograd.planned import BlockPlan
    from densenet_fused.ops.plan import Recorder
    bp = BlockPlan()
    bp.record_backward(Recorder([torch.zeros(4)]), [])
    assert bp.bwd is None and "launched no kernel" in bp.refused
