"""FusedTransition against torchvision's _Transition (float64, odd sizes): output, input gradient,
every parameter gradient and running statistics over several steps, train and eval; statistics
given by the caller (a block's); state_dict compatibility; errors before any state change."""
import copy

import pytest
import torch
from torchvision.models.densenet import _Transition

from blockutil import assert_close, randomize_bn
from densenet_fused.modules.transition import FusedTransition


def _pair(c_in=13, c_out=6, dtype=torch.float64, momentum=0.1):
    ref = randomize_bn(_Transition(c_in, c_out)).to(dtype)
    ref.norm.momentum = momentum
    fused = FusedTransition(c_in, c_out).to(dtype)
    fused.load_state_dict(ref.state_dict(), strict=True)
    fused.norm.momentum = momentum
    return ref, fused


def _step(module, x, grad, **kw):
    module.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    y = module(xi, **kw)
    y.backward(grad)
    return y.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()}


def _compare(ref, fused, x, steps=3, tol=1e-10, given_stats=False):
    for step in range(steps):
        xs = x * (1 + 0.1 * step)
        n, _, h, w = xs.shape
        grad = torch.randn(n, ref.conv.out_channels, h // 2, w // 2, dtype=xs.dtype)
        y_r, dx_r, g_r = _step(ref, xs, grad)
        kw = {}
        if given_stats:
            kw["stats"] = (xs.mean((0, 2, 3)), xs.var((0, 2, 3), unbiased=False))
        y_f, dx_f, g_f = _step(fused, xs, grad, **kw)
        assert y_f.shape == y_r.shape
        assert_close(y_f, y_r, tol, f"step {step} output")
        assert_close(dx_f, dx_r, tol, f"step {step} input grad")
        for name, g in g_r.items():
            assert_close(g_f[name], g, tol, f"step {step} {name}")
        for (name, b_r), b_f in zip(ref.named_buffers(), fused.buffers()):
            assert_close(b_f.double(), b_r.double(), tol, f"step {step} {name}")


@pytest.mark.parametrize("hw", [(7, 5), (8, 6), (2, 3)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_torchvision(hw, mode):
    ref, fused = _pair()
    getattr(ref, mode)()
    getattr(fused, mode)()
    x = torch.randn(3, 13, *hw, dtype=torch.float64) * 1.5 + 0.3
    _compare(ref, fused, x)
    _compare(ref, fused, x.contiguous(memory_format=torch.channels_last), steps=1)


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_given_statistics_and_momentum(momentum):
    """The block's statistics given in place of the statistics pass: same values, running statistics
    updated once per step (momentum=None: cumulative average)."""
    ref, fused = _pair(momentum=momentum)
    x = torch.randn(2, 13, 9, 7, dtype=torch.float64) * 1.5 + 0.3
    _compare(ref, fused, x, given_stats=True)
    assert int(fused.norm.num_batches_tracked) == 3


def test_float32():
    ref, fused = _pair(29, 11, dtype=torch.float32)
    x = torch.randn(2, 29, 11, 9) * 1.5 + 0.3
    _compare(ref, fused, x, steps=2, tol=1e-4)


def test_no_grad_and_eval_save_nothing_and_match():
    ref, fused = _pair()
    x = torch.randn(2, 13, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fused(x), ref(x), 1e-10, "no_grad training output")
    ref.eval(), fused.eval()
    with torch.no_grad():
        assert_close(fused(x), ref(x), 1e-10, "no_grad eval output")


def test_state_dict_compatible_both_ways():
    ref, fused = _pair()
    assert list(fused.state_dict()) == list(ref.state_dict())
    back = _Transition(13, 6).double()
    back.load_state_dict(fused.state_dict(), strict=True)
    assert [n for n, _ in fused.named_children()] == ["norm", "relu", "conv", "pool"]


def test_bad_input_raises_before_any_state_change():
    _, fused = _pair()
    before = copy.deepcopy(fused.state_dict())
    with pytest.raises(ValueError, match="expected input with 13 channels"):
        fused(torch.randn(2, 12, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected H and W >= 2"):
        fused(torch.randn(2, 13, 1, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="4-D input"):
        fused(torch.randn(13, 6, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="expected input of dtype torch.float64"):
        fused(torch.randn(2, 13, 6, 6))
    with pytest.raises(ValueError, match="stats mean to be a 1-D torch.float64 tensor of 13 channels"):
        fused(torch.randn(2, 13, 6, 6, dtype=torch.float64), stats=(torch.zeros(12, dtype=torch.float64),) * 2)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused call"


def test_hooks_inside_are_refused():
    _, fused = _pair()
    fused.norm.register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="hooks on its norm"):
        fused(torch.randn(2, 13, 4, 4, dtype=torch.float64))


def test_fx_trace_keeps_the_four_modules():
    _, fused = _pair()
    gm = torch.fx.symbolic_trace(fused)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["norm", "relu", "conv", "pool"]


def test_empty_batch_as_torchvision():
    from torchvision.models.densenet import _Transition
    from blockutil import assert_empty_batch_as_torchvision, randomize_bn
    ref = randomize_bn(_Transition(6, 3)).double()
    fused = FusedTransition(6, 3).double()
    fused.load_state_dict(ref.state_dict())
    assert_empty_batch_as_torchvision(ref, fused, (0, 6, 5, 4))
