"""A transition and the block after it as one node (autograd/transition_block.py): the transition's output is
written straight into the block's buffer (no copy), and everything equals running the two modules
apart (float64, odd sizes, train and eval, several steps); checks of both modules run before any
state changes."""
import copy
import os
from collections import OrderedDict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import densenet_fused.autograd.transition as transition_mod
from blockutil import SavedBytes, assert_close, randomize_bn
from densenet_fused import FusedDenseBlock
from densenet_fused.modules.features import FusedFeatures
from densenet_fused.ops import bnrelu_avgpool_conv1x1 as op
from densenet_fused.modules.transition import FusedTransition
from densenet_fused.modules.transition_block import transition_into_block
from flags import patched, tf32_disabled

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _features(dtype=torch.float64, c_in=11, c_mid=9, layers=(2, 3), k=5, bn_size=2, drop_rate=0.0):
    """block, transition, block: the part of a DenseNet the pair node runs."""
    torch.manual_seed(0)
    b1 = FusedDenseBlock(layers[0], c_in, bn_size, k, drop_rate)
    c1 = c_in + layers[0] * k
    t = FusedTransition(c1, c_mid)
    b2 = FusedDenseBlock(layers[1], c_mid, bn_size, k, drop_rate)
    feats = FusedFeatures(OrderedDict(denseblock1=b1, transition1=t, denseblock2=b2))
    return randomize_bn(feats).to(dtype)


def _step(module, x, grad):
    module.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    y = module(xi)
    y.backward(grad)
    return y.detach(), xi.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


class _Calls(TorchDispatchMode):
    """The storages the transition op writes and the dense layers' 3x3 op writes (block buffers)."""

    def __init__(self):
        super().__init__()
        self.transition_out, self.block_out, self.copies = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name.endswith("bnrelu_avgpool_conv1x1_fwd"):
            self.transition_out.append(args[5].untyped_storage().data_ptr())
        elif name.endswith("bnrelu_conv3x3_fwd"):  # out = [the new channels, statistics...]
            self.block_out.append(args[4][0].untyped_storage().data_ptr())
        elif name == "aten.copy_":
            self.copies.append(tuple(args[1].shape))
        return func(*args, **kwargs)


def test_transition_writes_into_the_blocks_buffer():
    feats = _features().train()
    x = torch.randn(2, 11, 9, 7, dtype=torch.float64, requires_grad=True)
    with _Calls() as calls:
        y = feats(x)
    assert len(calls.transition_out) == 1
    assert calls.transition_out[0] == y.untyped_storage().data_ptr()  # block 2's output is its buffer
    assert calls.transition_out[0] in calls.block_out
    # block 1 copies its input in; block 2 copies nothing (its input is already there)
    assert (2, 11, 9, 7) in calls.copies and (2, 9, 4, 3) not in calls.copies, calls.copies


def test_saves_no_more_than_the_two_modules_apart():
    feats = _features().train()
    x = torch.randn(2, 11, 9, 7, dtype=torch.float64)
    with SavedBytes() as pair:
        feats(x.clone().requires_grad_())
    feats.transition1.register_forward_hook(lambda *a: None)  # hooked: the two run apart
    with SavedBytes() as apart:
        feats(x.clone().requires_grad_())
    params = {p.untyped_storage().data_ptr() for p in feats.parameters()}

    def acts(s):
        return sum(b for ptr, b in s.storages.items() if ptr not in params)
    assert acts(pair) <= acts(apart), (acts(pair), acts(apart))


@pytest.mark.parametrize("mode,drop_rate", [("train", 0.0), ("eval", 0.0), ("train", 0.3)])
@pytest.mark.parametrize("hw", [(9, 7), (8, 8)])
def test_equals_the_two_modules_apart(mode, hw, drop_rate):
    """Against the same modules run one by one (a hook on the transition makes FusedFeatures call it
    as a module; its values are torchvision's, tests/modules/test_transition.py): output, input gradient,
    every parameter gradient, running statistics, over 3 steps; with dropout the same masks (the
    same seeds drawn in the same order)."""
    pair = _features(drop_rate=drop_rate).train(mode == "train")
    apart = copy.deepcopy(pair)
    apart.transition1.register_forward_hook(lambda *a: None)
    for step in range(3):
        x = torch.randn(3, 11, *hw, dtype=torch.float64) * (1 + 0.2 * step)
        grad = torch.randn(3, 9 + 3 * 5, hw[0] // 2, hw[1] // 2, dtype=torch.float64)
        torch.manual_seed(100 + step)
        y_p, dx_p, g_p = _step(pair, x, grad)
        torch.manual_seed(100 + step)
        y_a, dx_a, g_a = _step(apart, x, grad)
        assert_close(y_p, y_a, 1e-12, f"step {step} output")
        assert_close(dx_p, dx_a, 1e-12, f"step {step} input grad")
        for name, g in g_a.items():
            assert_close(g_p[name], g, 1e-12, f"step {step} {name}")
        for (name, b_a), b_p in zip(apart.named_buffers(), pair.buffers()):
            assert_close(b_p.double(), b_a.double(), 1e-12, f"step {step} {name}")


def test_no_grad_saves_nothing_and_matches():
    feats = _features().train()
    x = torch.randn(2, 11, 8, 6, dtype=torch.float64)
    want = copy.deepcopy(feats)(x)
    with torch.no_grad(), SavedBytes() as saved:
        got = feats(x)
    assert saved.storages == {}
    assert_close(got, want, 1e-12, "output")


def test_parameters_only_gradients():
    """Input without grad: the transition's parameters still get theirs (its backward runs)."""
    feats = _features().train()
    x = torch.randn(2, 21, 8, 6, dtype=torch.float64)  # denseblock1's output, as a leaf without grad
    y = transition_into_block(feats.transition1, feats.denseblock2, x)
    y.sum().backward()
    for name, p in list(feats.transition1.named_parameters()) + list(feats.denseblock2.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_block_raises_before_the_transition_changes_state():
    """The block after the transition expects other channels: nothing of either changes."""
    t = FusedTransition(16, 8).double()
    b = FusedDenseBlock(2, 7, 2, 4).double()
    before = copy.deepcopy(t.state_dict()), copy.deepcopy(b.state_dict())
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="expected input with 7 channels"):
        transition_into_block(t, b, x)
    for sd, want in zip((t.state_dict(), b.state_dict()), before):
        for k, v in want.items():
            assert torch.equal(sd[k], v), k


def test_hooks_on_the_dense_layers_keep_the_modules_apart():
    feats = _features().train()
    seen = []
    feats.denseblock2.denselayer2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    feats(torch.randn(2, 11, 8, 6, dtype=torch.float64))
    assert seen == [(2, 5, 4, 3)]


@pytest.mark.skipif(not INTERPRET, reason="substitutes interpreted Triton kernels on CPU tensors")
def test_on_the_triton_transition_kernels():
    """The pair with the transition's Triton kernels (strided store into the buffer) in place of the
    CPU kernel, float32, against the CPU kernels."""
    def fwd(x, scale, shift, weight, nhw, out=None):
        out = x.new_empty((nhw[0] * (nhw[1] // 2) * (nhw[2] // 2), weight.shape[0])) if out is None else out
        op.triton_fwd(x, scale, shift, weight, nhw, out)
        return out
    cpu = _features(torch.float32).train()
    tri = copy.deepcopy(cpu)
    x = torch.randn(3, 11, 9, 7)
    grad = torch.randn(3, 24, 4, 3)
    y_c, dx_c, g_c = _step(cpu, x, grad)
    with tf32_disabled(), patched(transition_mod, bnrelu_avgpool_conv1x1_fwd=fwd,
                                  bnrelu_avgpool_conv1x1_bwd=op.triton_bwd):
        y_t, dx_t, g_t = _step(tri, x, grad)
    assert_close(y_t, y_c, 1e-5, "output")
    assert_close(dx_t, dx_c, 1e-5, "input grad")
    for name, g in g_c.items():
        assert_close(g_t[name], g, 1e-5, name)
