"""convert(): torchvision and timm dense blocks become FusedDenseBlocks sharing their modules."""
import copy

import pytest
import torch
import torchvision
from torchvision.models.densenet import _DenseBlock

from blockutil import assert_close, randomize_bn
from densenet_fused import FusedDenseBlock, convert


def _step(model, x):
    xi = x.clone().requires_grad_()
    y = model(xi)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return y.detach(), xi.grad


def test_convert_torchvision_densenet121():
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.densenet121(num_classes=7)).double().train()
    original = copy.deepcopy(tv)
    params_before = {id(p) for p in tv.parameters()}
    model = convert(tv)
    assert model is tv
    blocks = [m for m in model.modules() if isinstance(m, FusedDenseBlock)]
    assert len(blocks) == 4 and not any(isinstance(m, _DenseBlock) for m in model.modules())
    assert {id(p) for p in model.parameters()} == params_before  # the same Parameters: optimizers keep working
    assert list(model.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    y_o, dx_o = _step(original, x)
    y_c, dx_c = _step(model, x)
    assert_close(y_c, y_o, 1e-9, "logits")
    assert_close(dx_c, dx_o, 1e-9, "input grad")
    for (name, p_o), p_c in zip(original.named_parameters(), model.parameters()):
        assert_close(p_c.grad, p_o.grad, 1e-9, name)
    for (name, b_o), b_c in zip(original.named_buffers(), model.buffers()):
        assert_close(b_c.double(), b_o.double(), 1e-9, name)


def test_convert_keeps_eval_mode_and_block_alone():
    block = _DenseBlock(3, 8, 2, 4, 0.0).eval()
    fused = convert(block)
    assert isinstance(fused, FusedDenseBlock) and not fused.training
    assert not fused.denselayer2.norm1.training
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert_close(fused(x), block(x), 1e-5, "eval output")


@pytest.mark.parametrize("attr,value,msg", [("affine", False, "affine=True"),
                                            ("track_running_stats", False, "track_running_stats=True")])
def test_convert_refuses_unsupported_batchnorm(attr, value, msg):
    model = torch.nn.Sequential(_DenseBlock(2, 8, 2, 4, 0.0))
    setattr(model[0].denselayer2.norm1, attr, value)
    with pytest.raises(ValueError, match=msg):
        convert(model)
    assert isinstance(model[0], _DenseBlock)  # nothing replaced


def test_convert_timm_densenet121():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("densenet121", pretrained=False, num_classes=5)).double().train()
    original = copy.deepcopy(model)
    convert(model)
    blocks = [m for m in model.modules() if isinstance(m, FusedDenseBlock)]
    assert len(blocks) == 4
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    y_o, dx_o = _step(original, x)
    y_c, dx_c = _step(model, x)
    assert_close(y_c, y_o, 1e-9, "timm logits")
    assert_close(dx_c, dx_o, 1e-9, "timm input grad")


def test_convert_keeps_each_layers_mode():
    """Each converted layer keeps its own train/eval flag (it switches that layer's dropout):
    a block in training mode with one layer in eval mode, and a whole block in eval mode."""
    torch.manual_seed(0)
    block = randomize_bn(_DenseBlock(3, 6, 2, 3, 1.0)).double().train()
    block.denselayer2.training = False  # its BatchNorms stay in training mode
    source = copy.deepcopy(block)
    fused = convert(block)
    assert [layer.training for layer in fused.values()] == [True, False, True]
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    assert_close(fused(x), source(x), 1e-10, "mixed-mode output (drop_rate=1: training layers give zeros)")
    block = randomize_bn(_DenseBlock(3, 6, 2, 3, 0.5)).double().eval()
    fused = convert(copy.deepcopy(block))
    assert not fused.training and not any(m.training for m in fused.modules())
    assert_close(fused(x), block(x), 1e-10, "eval block with drop_rate > 0")


def test_convert_torchvision_densenet_fuses_transitions_and_matches_the_package_model():
    """convert() of a torchvision DenseNet: FusedTransitions holding the very same modules, features a
    FusedFeatures (block statistics threaded into the transitions), equal to torchvision's model and to
    the package's DenseNet in float64 over 3 training steps; the package model's fused head gives the
    same logits as torchvision's relu/pool after the converted features."""
    import densenet_fused
    from torchvision.models.densenet import _Transition
    from densenet_fused.modules.features import FusedFeatures
    from densenet_fused.modules.transition import FusedTransition
    torch.manual_seed(0)
    cfg = dict(growth_rate=6, block_config=(2, 3, 2), num_init_features=10, bn_size=2, num_classes=4)
    tv = randomize_bn(torchvision.models.DenseNet(**cfg)).double().train()
    original = copy.deepcopy(tv)
    package = densenet_fused.DenseNet(**cfg).double().train()
    package.load_state_dict(tv.state_dict(), strict=True)
    norms = [tv.features.transition1.norm, tv.features.transition2.conv]
    convert(tv)
    assert isinstance(tv.features, FusedFeatures)
    assert isinstance(tv.features.transition1, FusedTransition) and isinstance(tv.features.transition2, FusedTransition)
    assert not any(isinstance(m, _Transition) for m in tv.modules())
    assert tv.features.transition1.norm is norms[0] and tv.features.transition2.conv is norms[1]
    assert list(tv.state_dict()) == list(original.state_dict())
    for step in range(3):
        x = torch.randn(2, 3, 35, 33, dtype=torch.float64)
        results = [_step(m, x) for m in (original, tv, package)]
        for name, (y, dx) in zip(("converted", "package"), results[1:]):
            assert_close(y, results[0][0], 1e-10, f"step {step} {name} logits")
            assert_close(dx, results[0][1], 1e-10, f"step {step} {name} input grad")
        for (name, p_o), p_c, p_p in zip(original.named_parameters(), tv.parameters(), package.parameters()):
            assert_close(p_c.grad, p_o.grad, 1e-10, f"step {step} converted {name}")
            assert_close(p_p.grad, p_o.grad, 1e-10, f"step {step} package {name}")
            p_o.grad = p_c.grad = p_p.grad = None
        for (name, b_o), b_c, b_p in zip(original.named_buffers(), tv.buffers(), package.buffers()):
            assert_close(b_c.double(), b_o.double(), 1e-10, f"step {step} converted {name}")
            assert_close(b_p.double(), b_o.double(), 1e-10, f"step {step} package {name}")


def test_convert_refuses_an_unsupported_transition_before_replacing_anything():
    model = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2)
    model.features.transition1.pool = torch.nn.AvgPool2d(3, 2)
    with pytest.raises(ValueError, match=r"AvgPool2d\(kernel_size=2, stride=2\)"):
        convert(model)
    assert isinstance(model.features.denseblock1, _DenseBlock)  # nothing replaced


def test_convert_is_all_or_nothing():
    """An unsupported norm in block 2 (after block 1 and transition 1, which convert would replace):
    one ValueError naming the module, and the model exactly as before (the same module objects
    everywhere, the same state and outputs); the same model converts once the norm is fixed."""
    from torchvision.models.densenet import _Transition
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2, 2), num_init_features=8, bn_size=2,
                                        num_classes=3).eval()
    bad = model.features.denseblock2.denselayer2.norm1
    model.features.denseblock2.denselayer2.norm1 = torch.nn.GroupNorm(2, bad.num_features)
    before = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    with pytest.raises(ValueError, match=r"^convert: layer 2 norm1 must be a BatchNorm2d or SyncBatchNorm, got "
                                         r"GroupNorm \(in features\.denseblock2; nothing was converted\)$"):
        convert(model)
    assert dict(model.named_modules()) == before  # every module object where it was
    assert type(model.features) is torch.nn.Sequential
    assert isinstance(model.features.denseblock1, _DenseBlock) and isinstance(model.features.transition1, _Transition)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), y)
    model.features.denseblock2.denselayer2.norm1 = bad
    convert(model)
    assert not any(isinstance(m, (_DenseBlock, _Transition)) for m in model.modules())


def test_torch_jit_script_of_a_converted_model_matches_eager_and_keeps_it_fused():
    from blockutil import assert_script_matches_eager
    from densenet_fused.modules.features import FusedFeatures
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8,
                                                     bn_size=2, num_classes=3)).double()
    convert(model)
    assert_script_matches_eager(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), 1e-10)
    assert isinstance(model.features, FusedFeatures)
    seq = convert(torch.nn.Sequential(_DenseBlock(2, 8, 2, 4, 0.0).double()))  # a container convert() changed
    assert_script_matches_eager(seq, torch.randn(2, 8, 5, 5, dtype=torch.float64), 1e-12)
    assert isinstance(seq[0], FusedDenseBlock)
