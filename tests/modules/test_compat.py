"""A converted model keeps working with the tools people use on DenseNets: FX feature
extraction, torch.export, pickling, deepcopy, torch.func.functional_call, frozen parameters and
timm features_only backbones."""
import copy
import io
import pickle

import pytest
import torch
import torchvision
from torchvision.models.densenet import _DenseBlock

from blockutil import assert_close, randomize_bn
from densenet_fused import FusedDenseBlock, convert


def tiny_densenet(drop_rate=0.0, dtype=torch.float64):
    """A torchvision DenseNet small enough for CI: 2 blocks (2 and 3 layers), k=4, 16x16 inputs."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2,
                                        drop_rate=drop_rate, num_classes=5)
    return randomize_bn(model).to(dtype)


def pair(dtype=torch.float64):
    source = tiny_densenet(dtype=dtype)
    return source, convert(copy.deepcopy(source))


def _x(dtype=torch.float64, n=2):
    return torch.randn(n, 3, 16, 16, dtype=dtype)


# ----------------------------------------------------------------------------- FX feature extraction
RETURN_NODES = {"features.denseblock1": "block1", "features.transition1.pool": "trans1",
                "features.denseblock2": "block2", "classifier": "logits"}


@pytest.mark.parametrize("train", [False, True])
def test_fx_feature_extractor_matches_unconverted(train):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    source, model = pair()
    source.train(train)
    model.train(train)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert "features.denseblock1" in eval_nodes and "features.denseblock2" in train_nodes
    fx_source = create_feature_extractor(source, return_nodes=RETURN_NODES)
    fx_model = create_feature_extractor(model, return_nodes=RETURN_NODES)
    assert [n.target for n in fx_model.graph.nodes if n.op == "call_module"].count("features.denseblock1") == 1
    x = _x()
    feats_s, feats_m = fx_source(x), fx_model(x)
    assert list(feats_m) == list(RETURN_NODES.values())
    for name in RETURN_NODES.values():
        assert_close(feats_m[name], feats_s[name], 1e-10, name)
    if train:  # the extractor shares the model's modules: running statistics updated as the source's
        for (name, b_s), b_m in zip(source.named_buffers(), model.buffers()):
            assert_close(b_m.double(), b_s.double(), 1e-10, name)


def test_fx_symbolic_trace_keeps_block_and_layer_as_leaves():
    _, model = pair()
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "features.denseblock1" in targets and not any(t.startswith("features.denseblock1.") for t in targets)
    x = _x()
    assert_close(gm(x), model(x), 1e-12, "traced model")
    layer = model.features.denseblock2.denselayer2
    gm_layer = torch.fx.symbolic_trace(torch.nn.Sequential(layer))
    assert [n.op for n in gm_layer.graph.nodes] == ["placeholder", "call_module", "output"]
    with pytest.raises(TypeError, match="trace a model that contains it"):
        torch.fx.symbolic_trace(model.features.denseblock1)


# ----------------------------------------------------------------------------- torch.export
def test_export_eval_matches_eager():
    _, model = pair(torch.float32)
    model.eval()
    x = _x(torch.float32)
    with torch.no_grad():
        expected = model(x)
    ep = torch.export.export(model, (x,))
    y = ep.module()(x)  # grad mode on, parameters requiring grad (was: mm(): functions with out=...)
    assert_close(y.detach(), expected, 1e-5, "exported program")
    with torch.no_grad():
        assert_close(ep.module()(x), expected, 1e-5, "exported program under no_grad")
        assert_close(ep.run_decompositions().module()(x), expected, 1e-5, "decomposed exported program")
    # the exported graph calls the ops directly: a backward through it is refused, never a wrong gradient
    with pytest.raises(RuntimeError, match="has no derivative of its own"):
        y.sum().backward()


# ----------------------------------------------------------------------------- pickle, deepcopy
def test_pickle_torch_save_and_deepcopy_whole_model():
    _, model = pair()
    model.eval()
    x = _x()
    expected = model(x)
    clones = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    clones.append(torch.load(buf, weights_only=False))
    for clone in clones:
        assert isinstance(clone.features.denseblock1, FusedDenseBlock)
        assert not {id(p) for p in clone.parameters()} & {id(p) for p in model.parameters()}
        assert torch.equal(clone(x), expected)
    clone = copy.deepcopy(model).train()  # trains on its own copy
    clone(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert int(model.features.denseblock1.denselayer1.norm1.num_batches_tracked) == 0


# ----------------------------------------------------------------------------- functional_call
def test_functional_call_uses_the_given_parameters_and_buffers():
    source, model = pair()
    source.train()
    model.train()
    state = {k: (v * 1.1 if v.is_floating_point() else v.clone()) for k, v in source.state_dict().items()}
    x = _x()

    def run(m):
        tensors = {k: v.clone().requires_grad_(k in dict(m.named_parameters())) for k, v in state.items()}
        y = torch.func.functional_call(m, tensors, (x,))
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
        return y, tensors

    y_s, t_s = run(source)
    y_m, t_m = run(model)
    assert_close(y_m, y_s, 1e-10, "output")
    for name, p in source.named_parameters():
        assert p.grad is None and dict(model.named_parameters())[name].grad is None  # the module's own: untouched
        assert_close(t_m[name].grad, t_s[name].grad, 1e-10, f"grad of {name}")
    for name, _ in source.named_buffers():  # running statistics updated in the given tensors, as the source's
        assert_close(t_m[name].double(), t_s[name].double(), 1e-10, name)


# ----------------------------------------------------------------------------- frozen parameters
def _grads(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return y.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("train", [True, False])
def test_parameters_get_gradients_when_input_does_not_require_grad(train):
    """The usual first-block case: x.requires_grad=False, every parameter gets its gradient."""
    torch.manual_seed(0)
    source = randomize_bn(_DenseBlock(3, 5, 2, 3, 0.0)).double().train(train)
    block = convert(copy.deepcopy(source))
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    assert not x.requires_grad
    y_s, g_s = _grads(source, x)
    y_b, g_b = _grads(block, x)
    assert_close(y_b, y_s, 1e-10, "output")
    for name, g in g_s.items():
        assert g_b[name] is not None, f"{name} got no gradient"
        assert_close(g_b[name], g, 1e-10, f"grad of {name}")


def test_frozen_parameters_match_source():
    source, model = pair()
    for m in (source, model):
        m.train()
        for p in m.features.denseblock1.parameters():  # a frozen first block
            p.requires_grad_(False)
        m.features.denseblock2.denselayer2.conv1.weight.requires_grad_(False)  # and one frozen weight
    x = _x()
    y_s, g_s = _grads(source, x)
    y_m, g_m = _grads(model, x)
    assert_close(y_m, y_s, 1e-10, "output")
    for name, g in g_s.items():
        if g is None:
            assert g_m[name] is None, name
        else:
            assert_close(g_m[name], g, 1e-10, f"grad of {name}")
    # everything frozen, input requiring grad: the input gradient still flows
    for m in (source, model):
        m.requires_grad_(False)
    xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    source(xs).sum().backward()
    model(xm).sum().backward()
    assert_close(xm.grad, xs.grad, 1e-10, "input grad, all parameters frozen")


# ----------------------------------------------------------------------------- timm
def test_timm_features_only_backbone():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = randomize_bn(timm.create_model("densenet121", pretrained=False, features_only=True,
                                            out_indices=(1, 2))).double()
    model = convert(copy.deepcopy(source))
    assert sum(isinstance(m, FusedDenseBlock) for m in model.modules()) == 2
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for train in (False, True):
        source.train(train)
        model.train(train)
        feats_s, feats_m = source(x), model(x)
        assert len(feats_m) == len(feats_s) == 2
        for i, (f_m, f_s) in enumerate(zip(feats_m, feats_s)):
            assert_close(f_m, f_s, 1e-10, f"feature {i} (train={train})")
    assert model.feature_info.channels() == source.feature_info.channels()
