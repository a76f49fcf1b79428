"""Helpers for the block tests: torchvision/fused pairs with identical, non-trivial weights."""
import torch
from torch import nn
from torchvision.models.densenet import _DenseBlock

from densenet_fused import FusedDenseBlock
from densenet_fused.tools.bench import SavedBytes  # noqa: F401  (re-exported for the tests)

ODD = dict(num_layers=5, num_input_features=13, growth_rate=7, bn_size=3)  # docs/design.md section 6 sizes


def randomize_bn(module, generator=None):
    """Non-trivial affine parameters and running statistics (so eval mode tests something)."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.5, 0.5, generator=generator)
                m.running_mean.uniform_(-0.3, 0.3, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
    return module


def make_pair(dtype=torch.float64, drop_rate=0.0, num_layers=5, num_input_features=13, growth_rate=7, bn_size=3,
              device="cpu"):
    ref = _DenseBlock(num_layers, num_input_features, bn_size, growth_rate, drop_rate)
    randomize_bn(ref)
    ref = ref.to(device, dtype)
    fused = FusedDenseBlock(num_layers, num_input_features, bn_size, growth_rate, drop_rate).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def run_step(block, x, grad):
    xi = x.detach().clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    y = block(xi)
    y.backward(grad)
    return y.detach(), xi.grad, {n: p.grad for n, p in block.named_parameters()}


def assert_close(a, b, tol, what=""):
    """Relative to the reference's largest magnitude (a gradient's scale), elementwise."""
    scale = max(b.abs().max().item(), 1e-30)
    err = (a.double() - b.double()).abs().max().item() / scale
    assert err <= tol, f"{what}: max error {err:.3e} (relative to max |ref| {scale:.3e}) > {tol:.1e}"


def replay_step_from_cuda_graph(module, static_x, grad, new_x, state=None):
    """Warm up (3 eager steps on a side stream: Triton autotuning, cuDNN heuristics), capture one
    forward+backward of ``module`` on ``static_x`` in a CUDA graph, copy ``new_x`` into static_x and
    replay.  ``state``: a state_dict loaded (in place) after the warm-up and after the capture, which
    moved or only recorded running-statistics updates.  Returns the graph's output; static_x.grad and
    the parameters' .grad hold its gradients."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            module(static_x).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    if state is not None:
        module.load_state_dict(state)
    module.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = module(static_x)
        static_y.backward(grad)
    if state is not None:
        module.load_state_dict(state)
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    return static_y
