"""FusedDenseBlock against torchvision's _DenseBlock with identical weights."""
import pytest
import torch

from blockutil import ODD, SavedBytes, assert_close, dropout_blocks, make_pair, new_features_in_training, run_step
from densenet_fused import FusedDenseBlock, FusedDenseLayer

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
N, H, W = 3, 9, 7


def _compare_steps(ref, fused, dtype, device, channels_last, steps=3):
    tol = TOL[dtype]
    for step in range(steps):
        x = (torch.randn(N, ref.denselayer1.norm1.num_features, H, W, dtype=dtype, device=device) * 1.5 + 0.2)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        c_out = x.shape[1] + len(ref) * ref.denselayer1.conv2.out_channels
        grad = torch.randn(N, c_out, H, W, dtype=dtype, device=device)
        y_r, dx_r, g_r = run_step(ref, x, grad)
        y_f, dx_f, g_f = run_step(fused, x, grad)
        assert y_f.shape == y_r.shape and y_f.dtype == y_r.dtype
        assert dx_f.shape == x.shape and dx_f.dtype == x.dtype
        assert_close(y_f, y_r, tol, f"step {step} output")
        assert_close(dx_f, dx_r, tol, f"step {step} input grad")
        for name, g in g_r.items():
            assert_close(g_f[name], g, tol, f"step {step} grad of {name}")
    for (name, b_r), (name_f, b_f) in zip(ref.named_buffers(), fused.named_buffers()):
        assert name == name_f
        if b_r.dtype == torch.long:
            assert torch.equal(b_r, b_f), name
        else:
            assert_close(b_f, b_r, tol, f"buffer {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_train_matches_torchvision(device, dtype, channels_last, no_tf32):
    # TF32 off: float32 means float32 on both sides (cuDNN's TF32 default differs by ~1e-3)
    ref, fused = make_pair(dtype, device=device)
    _compare_steps(ref.train(), fused.train(), dtype, device, channels_last)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eval_matches_torchvision(device, dtype):
    ref, fused = make_pair(dtype, device=device)
    _compare_steps(ref.eval(), fused.eval(), dtype, device, channels_last=False, steps=1)


def test_per_layer_eps_and_momentum_none(device):
    ref, fused = make_pair(torch.float64, device=device)
    for i, (lr, lf) in enumerate(zip(ref.values(), fused.values())):
        for bn in (lr.norm1, lf.norm1):
            bn.eps, bn.momentum = 1e-3 * (i + 1), None
        for bn in (lr.norm2, lf.norm2):
            bn.eps, bn.momentum = 1e-2, 0.3
    _compare_steps(ref.train(), fused.train(), torch.float64, device, channels_last=True)


def test_channels_last_and_nchw_give_identical_values(device):
    _, fused = make_pair(torch.float32, device=device)
    x = torch.randn(N, 13, H, W, device=device)
    fused.eval()
    a = fused(x)
    b = fused(x.to(memory_format=torch.channels_last))
    assert torch.equal(a, b)


def test_no_grad_saves_nothing_and_matches(device):
    ref, fused = make_pair(torch.float64, device=device)
    x = torch.randn(N, 13, H, W, dtype=torch.float64, device=device)
    with torch.no_grad(), SavedBytes() as saved:
        y_f = fused.train()(x)
        y_r = ref.train()(x)
    assert saved.total == 0
    assert_close(y_f, y_r, 1e-10, "no_grad output")


def test_gradcheck_train_and_eval():
    torch.manual_seed(0)
    _, fused = make_pair(torch.float64, num_layers=2, num_input_features=3, growth_rate=2, bn_size=2)
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    params = list(fused.parameters())

    def f(inp, *ps):
        return fused(inp)

    for mode in (True, False):
        fused.train(mode)
        assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_dropout_distribution_and_scaling():
    torch.manual_seed(0)
    p = 0.3
    _, plain, dropped = dropout_blocks(p, num_input_features=6, growth_rate=64)
    x = torch.randn(8, 6, 16, 16, dtype=torch.float64)
    ref, out = new_features_in_training(plain, dropped, x)
    kept = out != 0
    # every element is either dropped or scaled by 1/(1-p), as F.dropout does
    torch.testing.assert_close(out[kept], ref[kept] / (1 - p), rtol=1e-12, atol=1e-12)
    n = out.numel()
    frac = 1 - kept.double().mean().item()
    assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5, f"dropped fraction {frac:.4f}, expected {p}"
    with torch.no_grad():  # eval: no dropout
        torch.testing.assert_close(dropped.eval()(x), plain.eval()(x), rtol=0, atol=0)


def test_dropout_gradient_uses_the_forward_mask():
    torch.manual_seed(0)
    _, fused = make_pair(torch.float64, drop_rate=0.4, num_layers=3, num_input_features=4, growth_rate=3,
                         bn_size=2)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(inp):
        torch.manual_seed(1234)  # the same mask at every evaluation
        return fused(inp)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_state_dict_round_trip():
    ref, fused = make_pair(torch.float32)
    assert list(fused.state_dict()) == list(ref.state_dict())
    names = [n for n, _ in fused.named_children()]
    assert names == ["denselayer%d" % i for i in range(1, 6)]
    assert [n for n, _ in fused.denselayer1.named_children()] == ["norm1", "relu1", "conv1", "norm2", "relu2",
                                                                  "conv2"]
    ref.load_state_dict(fused.state_dict(), strict=True)


def test_layer_alone_matches_torchvision_layer():
    ref, fused = make_pair(torch.float64)
    feats = [torch.randn(2, 13, 5, 4, dtype=torch.float64), torch.randn(2, 7, 5, 4, dtype=torch.float64)]
    a = ref.denselayer2(feats)
    b = fused.denselayer2(feats)
    assert_close(b, a, 1e-10, "layer output")
    assert isinstance(fused.denselayer2, FusedDenseLayer)


def _saved_bytes(block, x):
    with SavedBytes() as saved:
        block(x.requires_grad_())
    return saved.total


def test_saved_bytes_linear_in_depth(record_property):
    from torchvision.models.densenet import _DenseBlock
    x = torch.randn(4, 16, 8, 8)
    fused_bytes, tv_bytes, activation_bytes = [], [], []
    for depth in (8, 16, 32):
        torch.manual_seed(0)
        fused = FusedDenseBlock(depth, 16, 4, 8)
        tv = _DenseBlock(depth, 16, 4, 8, 0.0)
        out_bytes = 4 * x.shape[0] * (16 + 8 * depth) * 64
        param_bytes = sum(p.numel() * p.element_size() for p in fused.parameters())
        fb = _saved_bytes(fused, x.clone())
        assert fb <= 1.25 * (out_bytes + param_bytes), (depth, fb, out_bytes, param_bytes)
        fused_bytes.append(fb)
        activation_bytes.append(fb - param_bytes)  # parameters themselves are O(L^2) in DenseNet
        tv_bytes.append(_saved_bytes(tv, x.clone()) - param_bytes)
    record_property("saved_bytes_fused", fused_bytes)
    record_property("saved_bytes_torchvision", tv_bytes)
    print("saved bytes at depth 8/16/32: fused", fused_bytes, "fused less parameters", activation_bytes,
          "torchvision less parameters", tv_bytes)
    # linear: doubling depth about doubles the activation bytes; quadratic: about quadruples them
    for a, b in zip(activation_bytes, activation_bytes[1:]):
        assert b / a < 2.3
    assert tv_bytes[2] / tv_bytes[1] > 3.0
    assert tv_bytes[2] > 8 * activation_bytes[2]


def test_bad_input_changes_no_state():
    _, fused = make_pair(torch.float32)
    fused.train()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    cases = [
        (torch.randn(2, 12, 5, 5), ValueError, "expected input with 13 channels"),
        (torch.randn(13, 5, 5), ValueError, "expected a 4-D input"),
        (torch.randn(1, 13, 1, 1), ValueError, "Expected more than 1 value per channel when training"),
        (torch.randn(2, 13, 5, 5, dtype=torch.float64), TypeError, "expected input of dtype torch.float32"),
        (torch.randint(0, 3, (2, 13, 5, 5)), TypeError, "floating-point"),
    ]
    for x, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fused(x)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batch_of_one_error_is_batchnorms():
    bn = torch.nn.BatchNorm2d(13).train()
    with pytest.raises(ValueError) as bn_err:
        bn(torch.randn(1, 13, 1, 1))
    _, fused = make_pair(torch.float32)
    with pytest.raises(ValueError) as fused_err:
        fused.train()(torch.randn(1, 13, 1, 1))
    assert str(fused_err.value) == str(bn_err.value)


def test_unsupported_batchnorm_and_mixed_modes_are_refused():
    _, fused = make_pair(torch.float32)
    fused.train()
    fused.denselayer3.norm2.eval()  # e.g. a frozen BatchNorm
    with pytest.raises(ValueError, match="same mode"):
        fused(torch.randn(2, 13, 4, 4))
    fused.train()
    fused.denselayer2.norm1.track_running_stats = False
    with pytest.raises(ValueError, match="track_running_stats=True"):
        fused(torch.randn(2, 13, 4, 4))


def test_constructor_validation():
    with pytest.raises(ValueError, match="growth_rate"):
        FusedDenseBlock(3, 8, 4, 0)
    with pytest.raises(ValueError, match="drop_rate"):
        FusedDenseBlock(3, 8, 4, 2, drop_rate=1.5)
    block = FusedDenseBlock(2, 8, 4, 2, memory_efficient=True)
    assert block.denselayer1.memory_efficient is True and len(block) == 2
    assert ODD["num_layers"] == 5


def test_keep_bottleneck_mode_same_gradients_more_memory():
    ref, fused = make_pair(torch.float64)
    kept = FusedDenseBlock(5, 13, 3, 7, keep_bottleneck=True).double()
    kept.load_state_dict(fused.state_dict())
    assert "keep_bottleneck=True" in repr(kept)
    x = torch.randn(N, 13, H, W, dtype=torch.float64)
    grad = torch.randn(N, 13 + 5 * 7, H, W, dtype=torch.float64)
    y_a, dx_a, g_a = run_step(fused.train(), x, grad)
    y_b, dx_b, g_b = run_step(kept.train(), x, grad)
    assert torch.equal(y_a, y_b)
    assert_close(dx_b, dx_a, 1e-12, "input grad")
    for name, g in g_a.items():
        assert_close(g_b[name], g, 1e-12, name)
    with SavedBytes() as s_default:
        fused(x.clone().requires_grad_())
    with SavedBytes() as s_kept:
        kept(x.clone().requires_grad_())
    bottleneck_bytes = 5 * N * H * W * 3 * 7 * 8
    assert s_kept.total - s_default.total == bottleneck_bytes
