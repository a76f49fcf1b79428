"""The tools' unfused baseline: torchvision's DenseNet of each of the package's configurations."""
import pytest
import torch

import densenet_fused
from densenet_fused.modules.models import CONFIGS, densenet_bc_config
from densenet_fused.tools.baseline import torchvision_densenet


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_baseline_has_the_package_models_state_dict(name):
    with torch.device("meta"):
        fused = getattr(densenet_fused, name)(num_classes=7)
        base = torchvision_densenet(CONFIGS[name], num_classes=7, memory_efficient=True)
    assert _shapes(base) == _shapes(fused)
    assert all(b.memory_efficient for b in base.modules() if hasattr(b, "memory_efficient"))


def test_small_inputs_baseline_computes_what_densenet_bc_computes():
    torch.manual_seed(0)
    base = torchvision_densenet(densenet_bc_config(16, 4), num_classes=3, small_inputs=True).double()
    fused = densenet_fused.densenet_bc(depth=16, growth_rate=4, num_classes=3).double()
    fused.load_state_dict(base.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fused(x), base(x), rtol=1e-9, atol=1e-9)
