"""A training step as one CUDA graph, the ways PyTorch users make one (GPU machines; skipped without CUDA):
``torch.cuda.make_graphed_callables`` on a FusedDenseBlock and on a converted densenet121 under bf16
autocast, ``torch.compile(mode="reduce-overhead")`` of a converted model, and dropout drawing new masks on
every replay.  A graphed step equals the eager one by the tolerance rule (here the same kernels on the same
data: equal up to the order of fp32 reductions, which is fixed); the CPU side of capturability (no host
synchronization) is tests/autograd/test_host_path.py."""
import copy

import pytest
import torch

from blockutil import assert_close
from densenet_fused import FusedDenseBlock, convert

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")]


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def _eager_step(module, x, grad):
    return _graphed_step(module, module, x, grad)


def _graphed_step(graphed, module, x, grad):
    """A bf16-autocast training step of ``graphed`` (the module itself: eager), ``module``'s gradients."""
    xs = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        y = graphed(xs)
    y.backward(grad.to(y.dtype))
    return y.detach().float(), xs.grad.detach().clone(), _grads(module)


def _check_same(got, want, what):
    (y, dx, g), (y_e, dx_e, g_e) = got, want
    assert_close(y, y_e, 1e-2, f"{what} output")  # bf16: the same kernels; 1e-2 of the largest magnitude
    assert_close(dx, dx_e, 1e-2, f"{what} input grad")
    for name in g_e:
        assert_close(g[name], g_e[name], 1e-2, f"{what} grad of {name}")


def test_make_graphed_callables_on_a_block_under_bf16_autocast():
    torch.manual_seed(0)
    blk = FusedDenseBlock(4, 32, 4, 16).cuda().to(memory_format=torch.channels_last).train()
    eager = copy.deepcopy(blk)
    x = torch.randn(8, 32, 14, 14, device="cuda").to(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(8, 96, 14, 14, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(blk, (x,))  # warm-up (autotuning) before its capture
    eager.load_state_dict(blk.state_dict())
    for _ in range(2):  # replays on new data
        new_x = torch.randn_like(x)
        _check_same(_graphed_step(graphed, blk, new_x, grad), _eager_step(eager, new_x, grad), "graphed block")


def test_dropout_draws_new_masks_on_every_replay():
    torch.manual_seed(0)
    blk = FusedDenseBlock(3, 16, 2, 8, drop_rate=0.5).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 16, 8, 8, device="cuda").to(memory_format=torch.channels_last).requires_grad_()
    graphed = torch.cuda.make_graphed_callables(blk, (x,))
    outs = [graphed(x.detach().clone().requires_grad_()).detach().clone() for _ in range(3)]
    new = outs[0][:, 16:]  # the layers' channels (the input's are copied unchanged)
    assert torch.equal(outs[0][:, :16], outs[1][:, :16])
    assert not torch.equal(new, outs[1][:, 16:]) and not torch.equal(outs[1][:, 16:], outs[2][:, 16:])
    assert 0.3 < (new[:, :8] == 0).float().mean().item() < 0.7  # layer 1's channels: about half dropped


def test_make_graphed_callables_on_a_converted_densenet121():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = convert(tv.models.densenet121(num_classes=10)).cuda().to(memory_format=torch.channels_last).train()
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(4, 10, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(model, (x,))
    eager.load_state_dict(model.state_dict())
    new_x = torch.randn_like(x)
    _check_same(_graphed_step(graphed, model, new_x, grad), _eager_step(eager, new_x, grad), "graphed densenet121")


def test_torch_compile_reduce_overhead_of_a_converted_model():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = convert(tv.models.densenet121(num_classes=10)).cuda().to(memory_format=torch.channels_last).train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead")
    grad = torch.randn(4, 10, device="cuda")
    for _ in range(3):  # the first calls record, later ones replay the graph
        x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
        got = _graphed_step(compiled, model, x, grad)
        want = _eager_step(eager, x, grad)
        _check_same(got, want, "reduce-overhead")
        eager.load_state_dict(model.state_dict())
