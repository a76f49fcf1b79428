"""The block's CUDA code path on the host: no host synchronization anywhere in a training step (so the
step can be captured as one CUDA graph and never stalls the CPU on the GPU), and the eager hot path
(the CUDA implementations called directly) agreeing with the registered ops."""
import dataclasses

import pytest
import torch

from blockutil import make_pair, run_step
from densenet_fused import FusedDenseBlock
from densenet_fused.ops import launch as seam
from densenet_fused.ops.table import REGISTERED, substituted


def _sync_raises(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a host synchronization on the CUDA path")
    for owner, name in ((torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"),
                        (torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "query"),
                        (torch.cuda.Event, "query"), (torch.Tensor, "item"), (torch.Tensor, "tolist"),
                        (torch.Tensor, "cpu"), (torch.Tensor, "numpy"), (torch.Tensor, "__bool__")):
        monkeypatch.setattr(owner, name, refuse)


@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_a_training_step_on_the_cuda_path_never_synchronizes(monkeypatch, drop_rate):
    """Fake CUDA tensors (FakeTensorMode raises on any value read back to the host) and every synchronizing
    call made to raise: the block's forward (dropout seeds included) and backward run their CUDA code path
    to the end, the Triton launches recorded at the launch seam instead of run.  (Called as the autograd
    node calls them: autograd's engine itself needs a CUDA driver, even for fake tensors.)  The launchers
    read the device's properties from Triton's driver: `densenet-fused cost`'s stand-in for an H100."""
    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode

    from densenet_fused.autograd.block import block_backward, block_forward
    from densenet_fused.modules.dense import fused_block_setup
    from densenet_fused.tools.host_cost import stand_in
    launches = []
    with stand_in(triton.runtime.driver, 90), FakeTensorMode(allow_non_fake_inputs=False):
        with torch.device("cuda"):
            blk = FusedDenseBlock(3, 16, 2, 8, drop_rate=drop_rate).train()
        for layer in blk.values():  # channels-last 3x3 weights (Module.to cannot swap fake parameters)
            w = layer.conv2._parameters["weight"]
            layer.conv2._parameters["weight"] = torch.nn.Parameter(w.detach().contiguous(
                memory_format=torch.channels_last))
        x = torch.empty((2, 16, 5, 6), device="cuda").to(memory_format=torch.channels_last)
        grad = torch.empty((2, 40, 5, 6), device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        _sync_raises(monkeypatch)
        with seam.recording(lambda kernel, args, constexprs: launches.append(kernel)), torch.no_grad():
            spec, params = fused_block_setup(blk, x)
            spec = dataclasses.replace(spec, dtype=torch.bfloat16)  # as under bf16 autocast: the Triton kernels
            x = x.to(torch.bfloat16)
            out, (stats, seeds, kept, weights, _) = block_forward(spec, x, params, save=True)
            dx, grads = block_backward(spec, out, grad, params, stats, seeds, kept, weights, (x.dtype, True), True)
        monkeypatch.undo()
        assert dx.shape == x.shape and all(g is not None and g.shape == p.shape for g, p in zip(grads, params))
        dw2 = grads[5]  # layer 1's conv2: its gradient in the parameter's layout (no relayout copy)
        assert dw2.is_contiguous(memory_format=torch.channels_last) and not dw2.is_contiguous()
    assert len(launches) >= 10 * 3


def test_the_block_output_is_not_a_view_and_takes_inplace_ops():
    """The output is the buffer itself (channels-last NCHW), so in-place ops work on it as on torch.cat's
    result; under autograd a backward after one raises autograd's own error (the block recomputes from
    its output), never a silent wrong gradient."""
    ref, fused = make_pair(torch.float64)
    x = torch.randn(2, 13, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        y = fused.eval()(x)
        assert y._base is None and y.is_contiguous(memory_format=torch.channels_last)
        torch.nn.functional.relu(y, inplace=True)
        torch.testing.assert_close(y, torch.relu(ref.eval()(x)), rtol=1e-12, atol=1e-12)
    y = fused.train()(x.requires_grad_())
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_direct_and_registered_ops_agree_on_the_cpu():
    """On the CPU the block runs the registered ops (C++ kernels); forcing them explicitly gives the same
    step bit for bit (the table the block takes is the only difference)."""
    _, fused = make_pair(torch.float64)
    init = {k: v.clone() for k, v in fused.state_dict().items()}
    x = torch.randn(3, 13, 6, 5, dtype=torch.float64)
    grad = torch.randn(3, 13 + 5 * 7, 6, 5, dtype=torch.float64)
    y1, dx1, g1 = run_step(fused.train(), x, grad)
    fused.load_state_dict(init)
    with substituted(REGISTERED):
        y2, dx2, g2 = run_step(fused.train(), x, grad)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the eager CUDA hot path runs on a GPU")
def test_cuda_hot_path_equals_the_registered_ops_bit_for_bit():
    """On CUDA the block calls the CUDA implementations directly (no dispatcher) through the launch seam's
    cache of compiled launches; through the registered ops it runs the same kernels: identical results."""
    torch.manual_seed(0)
    blk = FusedDenseBlock(4, 32, 4, 16).cuda().to(memory_format=torch.channels_last).train()
    init = {k: v.clone() for k, v in blk.state_dict().items()}
    x = torch.randn(4, 32, 9, 7, device="cuda").to(memory_format=torch.channels_last)
    grad = torch.randn(4, 96, 9, 7, device="cuda").to(memory_format=torch.channels_last)

    def step():
        blk.load_state_dict(init)
        xs = x.clone().requires_grad_()
        for p in blk.parameters():
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = blk(xs)
        out.backward(grad.to(out.dtype))
        return [out.float(), xs.grad] + [p.grad for p in blk.parameters()] + list(blk.buffers())

    direct = step()
    again = step()  # the seam's cache of compiled launches
    with substituted(REGISTERED):
        registered = step()
    for a, b, c in zip(direct, again, registered):
        assert torch.equal(a, b) and torch.equal(a, c)
