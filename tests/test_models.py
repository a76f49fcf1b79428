"""DenseNet models: torchvision checkpoint compatibility and densenet_bc."""
import pytest
import torch
import torchvision

import densenet_fused
from blockutil import assert_close, randomize_bn
from densenet_fused import FusedDenseBlock


def _step(model, x):
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = model(xi)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return y.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}


def test_densenet121_loads_torchvision_state_dict_and_matches():
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.densenet121(num_classes=10)).double().train()
    ours = densenet_fused.densenet121(num_classes=10).double().train()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    y_t, dx_t, g_t = _step(tv, x)
    y_o, dx_o, g_o = _step(ours, x)
    assert_close(y_o, y_t, 1e-9, "logits")
    assert_close(dx_o, dx_t, 1e-9, "input grad")
    for name, g in g_t.items():
        assert_close(g_o[name], g, 1e-9, name)
    for (n_t, b_t), (n_o, b_o) in zip(tv.named_buffers(), ours.named_buffers()):
        assert n_t == n_o
        assert_close(b_o.double(), b_t.double(), 1e-9, n_t)


@pytest.mark.parametrize("ctor,blocks", [("densenet161", (6, 12, 36, 24)), ("densenet169", (6, 12, 32, 32)),
                                         ("densenet201", (6, 12, 48, 32))])
def test_torchvision_variants_state_dict_compatible(ctor, blocks):
    with torch.device("meta"):
        tv = getattr(torchvision.models, ctor)()
        ours = getattr(densenet_fused, ctor)()
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert tuple(len(getattr(ours.features, "denseblock%d" % i)) for i in range(1, 5)) == blocks


def test_densenet264_shape():
    with torch.device("meta"):
        model = densenet_fused.densenet264()
    assert tuple(len(getattr(model.features, "denseblock%d" % i)) for i in range(1, 5)) == (6, 12, 64, 48)
    assert model.classifier.in_features == 2688


def test_densenet_bc():
    model = densenet_fused.densenet_bc(depth=40, growth_rate=12, num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, FusedDenseBlock)]
    assert [len(b) for b in blocks] == [6, 6, 6]
    assert blocks[0].num_input_features == 24
    y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        densenet_fused.densenet_bc(depth=101)
