"""The fused head (norm5, ReLU, global average pool) against torchvision's head
(``flatten(adaptive_avg_pool2d(relu(norm5(x)), 1), 1)``) in float64: output, input gradient,
norm5's gradients and running statistics over several steps, train and eval, with and without
the block's statistics given; errors before any state change."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockutil import assert_close, randomize_bn
from densenet_fused.modules.head import fused_head


def _ref_head(bn, x):
    return torch.flatten(F.adaptive_avg_pool2d(F.relu(bn(x)), (1, 1)), 1)


def _step(fn, bn, x, grad):
    bn.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    y = fn(bn, xi)
    y.backward(grad)
    return y.detach(), xi.grad, bn.weight.grad, bn.bias.grad


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("shape", [(3, 13, 5, 7), (4, 9, 1, 1), (2, 17, 4, 3)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_torchvision_head(shape, mode, given):
    ref = randomize_bn(nn.BatchNorm2d(shape[1])).double()
    ours = copy.deepcopy(ref)
    getattr(ref, mode)(), getattr(ours, mode)()
    for step in range(3):
        x = torch.randn(*shape, dtype=torch.float64) * (1.2 + 0.1 * step) + 0.3
        if step == 1:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(shape[0], shape[1], dtype=torch.float64)
        stats = (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)) if given else None
        got = _step(lambda bn, xi: fused_head(bn, xi, stats), ours, x, grad)
        want = _step(_ref_head, ref, x, grad)
        for name, a, b in zip(("output", "input grad", "dgamma", "dbeta"), got, want):
            assert_close(a, b, 1e-10, f"step {step} {name}")
        for (name, b_r), b_o in zip(ref.named_buffers(), ours.buffers()):
            assert_close(b_o.double(), b_r.double(), 1e-10, f"step {step} {name}")
    assert int(ours.num_batches_tracked) == (3 if mode == "train" else 0)


def test_float32():
    ref = randomize_bn(nn.BatchNorm2d(21))
    ours = copy.deepcopy(ref)
    x = torch.randn(4, 21, 6, 5) + 0.2
    grad = torch.randn(4, 21)
    for a, b in zip(_step(fused_head, ours, x, grad), _step(_ref_head, ref, x, grad)):
        assert_close(a, b, 1e-4, "float32")


def test_bad_input_raises_before_any_state_change():
    bn = randomize_bn(nn.BatchNorm2d(5)).double()
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match="expected input with 5 channels"):
        fused_head(bn, torch.randn(2, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused_head(bn, torch.randn(1, 5, 1, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="stats var to be a 1-D torch.float64 tensor of 5 channels"):
        fused_head(bn, torch.randn(2, 5, 3, 3, dtype=torch.float64),
                   (torch.zeros(5, dtype=torch.float64), torch.zeros(5)))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused call"
    bn.register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="norm5 has hooks"):
        fused_head(bn, torch.randn(2, 5, 3, 3, dtype=torch.float64))


def test_empty_batch_as_torchvision():
    from blockutil import assert_empty_batch_as_torchvision, randomize_bn
    ref = randomize_bn(torch.nn.BatchNorm2d(5)).double()
    fused = copy.deepcopy(ref)
    assert_empty_batch_as_torchvision(
        ref, fused, (0, 5, 3, 3),
        call=lambda m, x: (torch.flatten(F.adaptive_avg_pool2d(F.relu(m(x)), 1), 1) if m is ref else fused_head(m, x)))
