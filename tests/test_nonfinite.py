"""NaN and Inf in a whole block and a whole model go where torchvision's modules send them: the
same positions are NaN / +Inf / -Inf in the output, the input gradient, every parameter gradient
and every buffer (running statistics) after one step, in train and eval mode; the block also on its
Triton kernels (interpreted on CPU tensors without a GPU), a transition with odd sizes on its CPU,
Triton and ATen kernels.  The per-op checks are in
tests/ops/test_nonfinite_ops.py."""
import os

import contextlib

import pytest
import torch
import torchvision
from torchvision.models.densenet import _Transition

import densenet_fused
import densenet_fused.autograd.transition as transition_mod
from blockutil import make_pair, nonfinite_mismatch, randomize_bn, triton_block_ops
from densenet_fused.ops import bnrelu_avgpool_conv1x1 as transition_op
from densenet_fused.ops.table import substituted
from densenet_fused.modules.transition import FusedTransition
from flags import patched, tf32_disabled

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
NAN, INF = float("nan"), float("inf")


def _poison(x, kind):
    """x with non-finite entries at chosen positions: one NaN, or +Inf and -Inf, or all three."""
    x = x.clone()
    if kind in ("nan", "all"):
        x[0, 1, 2, 3] = NAN
    if kind in ("inf", "all"):
        x[1, 0, 4, 1] = INF
        x[0, 2, 1, 5] = -INF
    return x


def _step(module, x, grad):
    module.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    y = module(xi)
    y.backward(grad)
    return dict(output=y.detach(), input_grad=xi.grad,
                **{f"grad {n}": p.grad for n, p in module.named_parameters()},
                **{f"buffer {n}": b.clone() for n, b in module.named_buffers()})


def _compare(got, want):
    assert set(got) == set(want)
    bad = {k: nonfinite_mismatch(got[k], want[k]) for k in want}
    bad = {k: v for k, v in bad.items() if v is not None}
    assert not bad, f"{len(bad)} of {len(want)} results differ from torchvision's: {bad}"
    return sum(int((~torch.isfinite(t.double())).sum()) for t in want.values())


@pytest.mark.parametrize("kind", ["nan", "inf", "all"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_block_nonfinite_positions_match_torchvision(mode, kind):
    ref, fused = make_pair(torch.float64)
    ref.train(mode == "train"), fused.train(mode == "train")
    x = _poison(torch.randn(2, 13, 6, 7, dtype=torch.float64), kind)
    grad = torch.randn(2, 13 + 5 * 7, 6, 7, dtype=torch.float64)
    want = _step(ref, x, grad)
    assert _compare(_step(fused, x, grad), want) > 0


@pytest.mark.skipif(not INTERPRET, reason="substitutes interpreted Triton kernels on CPU tensors")
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_block_on_triton_kernels_nonfinite_positions_match_torchvision(mode):
    ref, fused = make_pair(torch.float64, num_layers=3)
    fused.float()
    ref.train(mode == "train"), fused.train(mode == "train")
    x = _poison(torch.randn(2, 13, 6, 7, dtype=torch.float64), "all")
    grad = torch.randn(2, 13 + 3 * 7, 6, 7, dtype=torch.float64)
    want = _step(ref, x, grad)
    with tf32_disabled(), substituted(triton_block_ops()):
        got = _step(fused, x.float(), grad.float())
    assert _compare(got, want) > 0


def _transition_kernels(impl):
    """The fused transition on the op's CPU kernel (the registered op), or with its Triton or ATen
    launchers in its place (interpreted Triton on CPU tensors)."""
    if impl == "cpu":
        return contextlib.nullcontext()
    fwd_impl = {"triton": transition_op.triton_fwd, "aten": transition_op.aten_fwd}[impl]
    bwd_impl = {"triton": transition_op.triton_bwd, "aten": transition_op.aten_bwd}[impl]

    def fwd(x, scale, shift, weight, nhw, out=None):
        out = x.new_empty((nhw[0] * (nhw[1] // 2) * (nhw[2] // 2), weight.shape[0])) if out is None else out
        fwd_impl(x, scale, shift, weight, nhw, out)
        return out
    return patched(transition_mod, bnrelu_avgpool_conv1x1_fwd=fwd, bnrelu_avgpool_conv1x1_bwd=bwd_impl)


@pytest.mark.parametrize("impl", ["cpu", "triton", "aten"])
@pytest.mark.parametrize("kind", ["nan", "inf", "all", "grad"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transition_with_odd_sizes_nonfinite_positions_match_torchvision(mode, kind, impl):
    """A transition on a 7x9 input (the pool drops the last row and column) against torchvision's
    _Transition: NaN / Inf of x on those pixels, inside, or NaN in the upstream gradient."""
    if impl == "triton" and not INTERPRET:
        pytest.skip("substitutes interpreted Triton kernels on CPU tensors")
    torch.manual_seed(0)
    ref = randomize_bn(_Transition(6, 4)).double()
    fused = FusedTransition(6, 4).double()
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref.train(mode == "train"), fused.train(mode == "train")
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    grad = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    if kind == "grad":
        grad[1, 2, 0, 3] = NAN
    else:
        x = _poison(x, "nan" if kind == "nan" else "inf")
        if kind in ("nan", "all"):
            x[1, 3, 6, 4] = NAN   # last row
        if kind in ("inf", "all"):
            x[0, 4, 2, 8] = INF   # last column
            x[1, 5, 6, 8] = -INF  # the corner
    want = _step(ref, x, grad)
    if impl == "triton":
        fused.float()
        x, grad = x.float(), grad.float()
    with tf32_disabled(), _transition_kernels(impl):
        got = _step(fused, x, grad)
    assert _compare(got, want) > 0


def _model_pair():
    torch.manual_seed(0)
    cfg = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3)
    tv = randomize_bn(torchvision.models.DenseNet(**cfg)).double()
    ours = densenet_fused.DenseNet(**cfg).double()
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv, ours


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_nonfinite_positions_match_torchvision(mode, kind):
    """A small DenseNet (fused stem, blocks, transition, head) against torchvision's with the same
    weights: the loss of the old fused ReLU (finite while torchvision's is NaN) cannot happen."""
    tv, ours = _model_pair()
    tv.train(mode == "train"), ours.train(mode == "train")
    x = _poison(torch.randn(2, 3, 32, 32, dtype=torch.float64), kind)
    grad = torch.randn(2, 3, dtype=torch.float64)
    want = _step(tv, x, grad)
    assert _compare(_step(ours, x, grad), want) > 0
    if mode == "train" and kind == "nan":  # what a training loop sees: NaN logits, NaN running statistics
        assert torch.isnan(want["output"]).all() and torch.isnan(want["buffer features.norm5.running_mean"]).all()


def test_model_nan_step_then_eval_matches_torchvision():
    """After a training step on a batch with one NaN pixel, the weights and statistics are NaN in
    both; eval on clean inputs then gives NaN logits (not finite ones) in both."""
    tv, ours = _model_pair()
    x = _poison(torch.randn(2, 3, 32, 32, dtype=torch.float64), "nan")
    for m in (tv, ours):
        m.train()
        m(x).sum().backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.1 * p.grad
        m.eval()
    clean = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want, got = tv(clean), ours(clean)
    assert torch.isnan(want).all() and nonfinite_mismatch(got, want) is None
