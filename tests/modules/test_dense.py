"""FusedDenseBlock as a module (modules/dense.py): hooks on its layers, device checks, double backward,
and second, independent checks of the per-BN eps, the dropout scale and eval-mode dropout."""
import copy

import pytest
import torch
from torchvision.models.densenet import _DenseBlock

from blockutil import assert_close, dropout_blocks, make_pair, new_features_in_training, randomize_bn
from densenet_fused import FusedDenseBlock

C0, K = 5, 3


def _pair(drop_rate=0.0, num_layers=3):
    return make_pair(torch.float64, drop_rate=drop_rate, num_layers=num_layers, num_input_features=C0,
                     growth_rate=K, bn_size=2)


def _x(n=2, h=4, w=3, requires_grad=False):
    return torch.randn(n, C0, h, w, dtype=torch.float64, requires_grad=requires_grad)


def _state(block):
    return {k: v.clone() for k, v in block.state_dict().items()}


def _assert_state(block, before):
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


# ----------------------------------------------------------------------------- forward hooks on layers
def test_forward_hooks_on_dense_layers_fire_with_the_layers_new_channels():
    """As a Grad-CAM tool does: a forward hook saves each layer's output and registers a tensor hook
    on it for its gradient.  Same activations, inputs and gradients as on torchvision's block."""
    ref, fused = _pair()
    records = {}
    for tag, block in (("ref", ref), ("fused", fused)):
        rec = records[tag] = {"out": [], "inputs": [], "grad": [], "kw": []}
        for layer in block.values():
            def hook(module, args, output, rec=rec):
                rec["out"].append(output.detach().clone())
                rec["inputs"].append([t.detach().clone() for t in args[0]])
                output.register_hook(lambda g: rec["grad"].append(g.clone()))

            def hook_kw(module, args, kwargs, output, rec=rec):
                rec["kw"].append(output.shape)
            layer.register_forward_hook(hook)
            layer.register_forward_hook(hook_kw, with_kwargs=True)
        block.train()
    x = _x()
    grad = torch.randn(2, C0 + 3 * K, 4, 3, dtype=torch.float64)
    for block in (ref, fused):
        block(x.clone().requires_grad_()).backward(grad)
    r, f = records["ref"], records["fused"]
    assert len(f["out"]) == 3 and f["kw"] == r["kw"] == [(2, K, 4, 3)] * 3
    for l in range(3):
        assert_close(f["out"][l], r["out"][l], 1e-10, f"layer {l + 1} output seen by the hook")
        assert len(f["inputs"][l]) == len(r["inputs"][l]) == l + 1
        for a, b in zip(f["inputs"][l], r["inputs"][l]):
            assert_close(a, b, 1e-10, f"layer {l + 1} input features seen by the hook")
    # tensor hooks fire in backward (reverse layer order on both sides), with the same gradients
    assert len(f["grad"]) == len(r["grad"]) == 3
    for a, b in zip(f["grad"], r["grad"]):
        assert_close(a, b, 1e-10, "gradient of a layer's output")


def test_hooked_block_matches_unhooked_and_keeps_running_statistics():
    _, fused = _pair()
    plain = copy.deepcopy(fused)
    fused.denselayer2.register_forward_hook(lambda m, a, o: None)
    x = _x()
    grad = torch.randn(2, C0 + 3 * K, 4, 3, dtype=torch.float64)
    results = []
    for block in (plain, fused):
        xi = x.clone().requires_grad_()
        y = block.train()(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, [p.grad for p in block.parameters()]))
    assert_close(results[1][0], results[0][0], 1e-12, "output")
    assert_close(results[1][1], results[0][1], 1e-12, "input grad")
    for a, b in zip(results[1][2], results[0][2]):
        assert_close(a, b, 1e-12, "param grad")
    for (name, b_p), b_f in zip(plain.named_buffers(), fused.buffers()):
        assert_close(b_f.double(), b_p.double(), 1e-12, name)  # updated once per step, as without hooks


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torchvision's layer takes a list, too
def test_layer_pre_hooks_backward_hooks_and_output_replacement_as_torchvision():
    ref, fused = _pair()
    seen = {"ref": [], "fused": []}
    for tag, block in (("ref", ref), ("fused", fused)):
        block.denselayer2.register_forward_pre_hook(lambda m, a, tag=tag: seen[tag].append(len(a[0])))
        block.denselayer1.register_forward_hook(lambda m, a, o: o * 2)  # replaces the output: later layers see it
        block.denselayer3.register_full_backward_hook(
            lambda m, gi, go, tag=tag: seen[tag].append(go[0].detach().clone()))
        block.train()
    x = _x()
    grad = torch.randn(2, C0 + 3 * K, 4, 3, dtype=torch.float64)
    ys = []
    for block in (ref, fused):
        xi = x.clone().requires_grad_()
        y = block(xi)
        y.backward(grad)
        ys.append((y.detach(), xi.grad))
    assert_close(ys[1][0], ys[0][0], 1e-10, "output")
    assert_close(ys[1][1], ys[0][1], 1e-10, "input grad")
    assert seen["fused"][0] == seen["ref"][0] == 2
    assert_close(seen["fused"][1], seen["ref"][1], 1e-10, "grad_output seen by the backward hook")


@pytest.mark.parametrize("register,msg", [
    (lambda b: b.denselayer3.conv1.register_forward_hook(lambda m, a, o: None), "denselayer3.conv1"),
    (lambda b: b.denselayer1.norm2.register_forward_pre_hook(lambda m, a: None), "denselayer1.norm2"),
    (lambda b: b.denselayer2.relu1.register_full_backward_hook(lambda m, gi, go: None), "denselayer2.relu1"),
])
def test_hooks_inside_a_layer_raise_before_any_state_change(register, msg):
    _, fused = _pair()
    fused.train()
    register(fused)
    before = _state(fused)
    with pytest.raises(RuntimeError, match=f"FusedDenseBlock: hooks on {msg} are not supported"):
        fused(_x())
    _assert_state(fused, before)
    with pytest.raises(RuntimeError, match="are not supported"):  # a layer called alone, too
        getattr(fused, msg.split(".")[0])([_x()] + [torch.randn(2, K, 4, 3, dtype=torch.float64)] * 2)


# ----------------------------------------------------------------------------- double backward
def test_double_backward_raises_an_error_naming_the_block():
    ref, fused = _pair()
    grads = []
    x0 = _x()
    for block in (ref, fused):
        x = x0.clone().requires_grad_()
        gx, = torch.autograd.grad(block.train()(x).pow(2).sum(), x, create_graph=True)
        grads.append(gx)
    assert_close(grads[1].detach(), grads[0].detach(), 1e-10, "first-order gradient under create_graph=True")
    grads[0].pow(2).sum().backward()  # torchvision: works
    with pytest.raises(RuntimeError, match="FusedDenseBlock supports first-order gradients only"):
        grads[1].pow(2).sum().backward()


# ----------------------------------------------------------------------------- devices
def test_input_on_another_device_raises_before_any_state_change():
    _, fused = _pair()
    fused.train()
    before = _state(fused)
    with pytest.raises(ValueError, match="expected the input on the device of the parameters and buffers, got the "
                                         "input on meta and layer 1 norm1.weight on cpu"):
        fused(torch.empty(2, C0, 4, 3, dtype=torch.float64, device="meta"))
    _assert_state(fused, before)
    fused.denselayer2.norm2.running_var = torch.empty(fused.denselayer2.norm2.num_features, dtype=torch.float64,
                                                      device="meta")
    with pytest.raises(ValueError, match="layer 2 norm2.running_var on meta"):
        fused(_x())
    for k, v in fused.state_dict().items():
        if k != "denselayer2.norm2.running_var":
            assert torch.equal(v, before[k]), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_input_with_cpu_parameters_raises():
    _, fused = _pair()
    with pytest.raises(ValueError, match="input on cuda"):
        fused.train()(_x().cuda())


# ----------------------------------------------------------------------------- per-BN eps (second check)
@pytest.mark.parametrize("train", [False, True])
def test_each_batchnorm_uses_its_own_eps(train):
    """Large, all-different eps (norm1 and norm2 of every layer): a block using one BatchNorm's
    eps for another (the first layer's, or norm1's for norm2) is off by far more than 1e-10."""
    ref, fused = _pair()
    for i, (lr, lf) in enumerate(zip(ref.values(), fused.values())):
        for j, name in enumerate(("norm1", "norm2")):
            getattr(lr, name).eps = getattr(lf, name).eps = 0.05 + 0.3 * i + 0.15 * j
    x = _x()
    grad = torch.randn(2, C0 + 3 * K, 4, 3, dtype=torch.float64)
    outs = []
    for block in (ref, fused):
        xi = x.clone().requires_grad_()
        y = block.train(train)(xi)
        y.backward(grad)
        outs.append((y.detach(), xi.grad))
    assert_close(outs[1][0], outs[0][0], 1e-10, "output")
    assert_close(outs[1][1], outs[0][1], 1e-10, "input grad")
    for (name, p_r), p_f in zip(ref.named_parameters(), fused.parameters()):
        assert_close(p_f.grad, p_r.grad, 1e-10, f"grad of {name}")


# ----------------------------------------------------------------------------- dropout (second checks)
def test_dropout_keeps_the_expected_square():
    """Inverted dropout: E[out^2] = y^2 / (1-p) for the layer's output y without dropout.  A scale
    s instead of 1/(1-p) gives s^2 (1-p)^2 times that (0.49 for s=1, 5.4 for s=1/p, p=0.3); the
    statistic's relative spread here is about 0.002."""
    torch.manual_seed(0)
    p = 0.3
    _, plain, dropped = dropout_blocks(p, num_input_features=4, growth_rate=32)
    x = torch.randn(16, 4, 16, 16, dtype=torch.float64)
    ref, out = new_features_in_training(plain, dropped, x)
    ratio = out.pow(2).sum().item() * (1 - p) / ref.pow(2).sum().item()
    assert abs(ratio - 1) < 0.02, f"E[out^2] (1-p) / y^2 = {ratio:.4f}, expected 1"


def test_dropout_backward_scales_kept_gradients():
    """The gradient through dropout is grad * mask / (1-p), the mask recovered from the forward
    output: compared with torchvision's layer (no dropout) fed that masked, scaled gradient."""
    torch.manual_seed(0)
    p = 0.4
    ref, _, dropped = dropout_blocks(p, num_input_features=4, growth_rate=6)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    g_new = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    y = dropped.train()(x)
    kept = (y[:, 4:] != 0).double()
    assert 0 < kept.mean().item() < 1
    y.backward(torch.cat([torch.zeros_like(x), g_new], 1))
    y_ref = ref.train()(x)
    y_ref.backward(torch.cat([torch.zeros_like(x), g_new * kept / (1 - p)], 1))
    for (name, p_r), p_d in zip(ref.named_parameters(), dropped.parameters()):
        assert_close(p_d.grad, p_r.grad, 1e-10, f"grad of {name}")


def test_eval_mode_dropout_is_off_in_forward_and_backward():
    """An eval-mode block with drop_rate > 0 is deterministic and matches torchvision's eval block
    (output, input and parameter gradients): no dropout mask anywhere."""
    ref, fused = _pair(drop_rate=0.5)
    ref.eval()
    fused.eval()
    x = _x()
    grad = torch.randn(2, C0 + 3 * K, 4, 3, dtype=torch.float64)
    results = []
    for block in (ref, fused, fused):
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = block(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, [q.grad for q in block.parameters()]))
    assert torch.equal(results[1][0], results[2][0])
    assert_close(results[1][0], results[0][0], 1e-10, "output")
    assert_close(results[1][1], results[0][1], 1e-10, "input grad")
    for a, b in zip(results[1][2], results[0][2]):
        assert_close(a, b, 1e-10, "param grad")


def test_layer_mode_controls_dropout():
    """A layer's own train/eval flag switches its dropout, as in torchvision's layer: with
    drop_rate=1 a training layer's channels are all zero, an eval one's are not."""
    torch.manual_seed(0)
    ref = randomize_bn(_DenseBlock(3, C0, 2, K, 1.0)).double().train()
    fused = FusedDenseBlock(3, C0, 2, K, drop_rate=1.0).double().train()
    fused.load_state_dict(ref.state_dict())
    for block in (ref, fused):
        block.denselayer2.training = False  # its BatchNorms stay in training mode
    x = _x()
    y_r, y_f = ref(x), fused(x)
    assert_close(y_f, y_r, 1e-10, "output")
    assert torch.count_nonzero(y_f[:, C0:C0 + K]) == 0 and torch.count_nonzero(y_f[:, C0 + K:C0 + 2 * K]) > 0


@pytest.mark.parametrize("grad", [True, False])
def test_forward_with_stats_returns_the_outputs_batch_statistics(grad):
    torch.manual_seed(0)
    block = FusedDenseBlock(3, 5, 2, 3).double().train()
    ref = copy.deepcopy(block)
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64, requires_grad=grad)
    out, mean, var = block.forward_with_stats(x)
    flat = out.detach().transpose(0, 1).reshape(out.shape[1], -1)
    assert torch.allclose(mean, flat.mean(1), rtol=0, atol=1e-12)
    assert torch.allclose(var, flat.var(1, unbiased=False), rtol=0, atol=1e-12)
    assert not mean.requires_grad and not var.requires_grad
    out_ref = ref(x)
    assert torch.equal(out, out_ref)
    for a, b in zip(block.buffers(), ref.buffers()):  # running statistics updated once, as by forward
        assert torch.equal(a, b)
    if grad:
        out.square().sum().backward()
        gx = x.grad.clone()
        x.grad = None
        out_ref.square().sum().backward()
        assert torch.equal(gx, x.grad)
    block.eval()
    out, mean, var = block.forward_with_stats(x)
    assert mean is None and var is None and torch.equal(out, block(x))


# ----------------------------------------------------------------------------- TorchScript
def test_torch_jit_script_of_a_block_and_a_layer_matches_eager():
    from blockutil import assert_script_matches_eager
    _, fused = _pair()
    assert_script_matches_eager(fused, _x(), 1e-12)
    layer = fused.denselayer2
    x = torch.randn(2, C0 + K, 4, 3, dtype=torch.float64)
    assert_script_matches_eager(layer, x, 1e-12)
    scripted = torch.jit.script(layer)
    with torch.no_grad():  # torchvision's list-of-tensors call too
        assert_close(scripted([x[:, :C0], x[:, C0:]]), layer([x[:, :C0], x[:, C0:]]), 1e-12, "list input")


# ----------------------------------------------------------------------------- an empty batch
def test_empty_batch_as_torchvision():
    from blockutil import assert_empty_batch_as_torchvision
    ref, fused = _pair()
    assert_empty_batch_as_torchvision(ref, fused, (0, C0, 4, 3))
    out = fused.eval()(torch.zeros(0, C0, 4, 3, dtype=torch.float64))
    assert out.shape == (0, C0 + 3 * K, 4, 3)
    y, mean, var = fused.train().forward_with_stats(torch.zeros(0, C0, 4, 3, dtype=torch.float64))
    assert y.shape == (0, C0 + 3 * K, 4, 3) and mean is None and var is None
