"""Helpers for the block tests: torchvision/fused pairs with identical, non-trivial weights."""
import torch
from torch import nn
from torchvision.models.densenet import _DenseBlock

from densenet_fused import FusedDenseBlock
from densenet_fused.bench import SavedBytes  # noqa: F401  (re-exported for the tests)

ODD = dict(num_layers=5, num_input_features=13, growth_rate=7, bn_size=3)  # DESIGN section 6 sizes


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
