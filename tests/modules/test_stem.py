"""fused_stem against torchvision's stem (conv0 7x7/2, norm0, relu0, pool0 3x3/2) with the same weights."""
import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from blockutil import SavedBytes, assert_close, randomize_bn
from densenet_fused.modules.stem import fused_stem


def tv_stem(features=13, in_channels=3, momentum=0.1, dtype=torch.float64):
    """torchvision's DenseNet stem as torchvision builds it (features[:4] of DenseNet)."""
    stem = nn.Sequential(OrderedDict([
        ("conv0", nn.Conv2d(in_channels, features, kernel_size=7, stride=2, padding=3, bias=False)),
        ("norm0", nn.BatchNorm2d(features, momentum=momentum)),
        ("relu0", nn.ReLU(inplace=True)),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]))
    return randomize_bn(stem).to(dtype)


def run_fused(stem, x):
    return fused_stem(x, stem.conv0, stem.norm0, stem.pool0)


def _grad(y, seed=0, round_to=None):
    """A fixed random output gradient of y's shape (its values rounded to ``round_to`` first)."""
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return g.to(round_to or y.dtype).to(y.device, y.dtype)


def _step(fn, stem, x, seed=0, input_grad=True, round_to=None):
    stem.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(input_grad)
    y = fn(stem, xi)
    y.backward(_grad(y, seed, round_to))
    return y.detach(), xi.grad, {n: p.grad for n, p in stem.named_parameters()}


def _buffers(stem):
    return {n: b.clone() for n, b in stem.named_buffers()}


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("shape", [(3, 3, 29, 23), (2, 3, 20, 18), (1, 3, 9, 5)])
def test_train_matches_torchvision(device, shape, momentum):
    ref = tv_stem(momentum=momentum).to(device)
    ours = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = (torch.randn(shape, dtype=torch.float64, generator=gen) + 0.2).to(device)
        y_r, dx_r, g_r = _step(lambda s, t: s(t), ref, x, step)
        y_o, dx_o, g_o = _step(run_fused, ours, x, step)
        assert y_o.shape == y_r.shape
        assert_close(y_o, y_r, 1e-12, f"step {step} output")
        assert_close(dx_o, dx_r, 1e-10, f"step {step} input grad")
        for name, g in g_r.items():
            assert_close(g_o[name], g, 1e-10, f"step {step} {name}")
    for name, b in ref.named_buffers():
        got = dict(ours.named_buffers())[name]
        if name.endswith("num_batches_tracked"):
            assert got.item() == b.item() == 3
        else:
            assert_close(got, b, 1e-12, name)


def test_eval_matches_torchvision(device):
    ref = tv_stem().to(device).eval()
    ours = copy.deepcopy(ref)
    x = torch.randn(3, 3, 27, 31, dtype=torch.float64, device=device)
    before = _buffers(ours)
    y_r, dx_r, g_r = _step(lambda s, t: s(t), ref, x)
    y_o, dx_o, g_o = _step(run_fused, ours, x)
    assert_close(y_o, y_r, 1e-12, "output")
    assert_close(dx_o, dx_r, 1e-10, "input grad")
    for name, g in g_r.items():
        assert_close(g_o[name], g, 1e-10, name)
    for name, b in _buffers(ours).items():
        assert torch.equal(b, before[name]), name  # running statistics untouched in eval
    with torch.no_grad():
        assert_close(run_fused(ours, x), y_r, 1e-12, "no_grad output")


def test_float32_and_no_input_grad(device, no_tf32):
    ref = tv_stem(features=16, dtype=torch.float32).to(device)
    ours = copy.deepcopy(ref)
    x = torch.randn(2, 3, 33, 35, device=device)
    y_r, _, g_r = _step(lambda s, t: s(t), ref, x, input_grad=False)
    y_o, dx_o, g_o = _step(run_fused, ours, x, input_grad=False)
    assert dx_o is None
    assert_close(y_o, y_r, 1e-5, "output")
    for name, g in g_r.items():
        assert_close(g_o[name], g, 1e-4, name)
    for name, b in ref.named_buffers():
        assert_close(dict(ours.named_buffers())[name].double(), b.double(), 1e-5, name)


def test_no_grad_training_updates_running_stats_once():
    ref = tv_stem()
    ours = copy.deepcopy(ref)
    x = torch.randn(2, 3, 21, 19, dtype=torch.float64)
    with torch.no_grad():
        y_r = ref(x.clone())
        y_o = run_fused(ours, x)
    assert_close(y_o, y_r, 1e-12, "output")
    for name, b in ref.named_buffers():
        assert_close(dict(ours.named_buffers())[name].double(), b.double(), 1e-12, name)


def test_output_is_channels_last_nchw():
    stem = tv_stem()
    y = run_fused(stem, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert y.shape == (2, 13, 8, 8) and y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_autocast_error_within_twice_torchvision(device, half):
    # autocast: conv0 in bfloat16 / float16, statistics in float32.  Errors against a float64 run of the
    # same stem: the fused stem's at most twice torchvision's under the same autocast, plus a small floor.
    ref = tv_stem(features=16, dtype=torch.float32).to(device)
    ours = copy.deepcopy(ref)
    exact = copy.deepcopy(ref).double()
    x = torch.randn(4, 3, 40, 36, device=device)
    # the same output gradient (rounded to the half dtype) in all three runs
    y_e, dx_e, g_e = _step(lambda s, t: s(t), exact, x.double(), round_to=half)
    with torch.autocast(device.type, dtype=half):
        y_r, dx_r, g_r = _step(lambda s, t: s(t), ref, x, round_to=half)
        y_o, dx_o, g_o = _step(run_fused, ours, x, round_to=half)
    assert y_o.dtype == y_r.dtype == half and dx_o.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in g_o.values())

    def err(a, b):  # relative L2: a max-pool routing flipped by rounding moves one value, not the norm
        return ((a.double() - b).norm() / b.norm()).item()
    pairs = [("output", y_o, y_r, y_e), ("input grad", dx_o, dx_r, dx_e)]
    pairs += [(n, g_o[n], g_r[n], g_e[n]) for n in g_e]
    for name, o, r, e in pairs:
        print(f"{name}: fused {err(o, e):.2e} torchvision {err(r, e):.2e}")
        assert err(o, e) <= 2 * err(r, e) + 1e-3, f"{name}: fused {err(o, e):.2e} vs torchvision {err(r, e):.2e}"
    for name, b in exact.named_buffers():  # statistics in float32 of the bf16 conv output
        if not name.endswith("num_batches_tracked"):
            assert_close(dict(ours.named_buffers())[name].double(), b, 2e-2, name)


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    def stem(**replace):
        s = tv_stem()
        for name, module in replace.items():
            setattr(s, name, module.double())
        return s
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    return [
        ("conv bias", stem(conv0=nn.Conv2d(3, 13, 7, 2, 3, bias=True)), x, ValueError, "bias=False"),
        ("conv groups", stem(conv0=nn.Conv2d(3, 12, 7, 2, 3, bias=False, groups=3),
                             norm0=nn.BatchNorm2d(12)), x, ValueError, "groups=1"),
        ("pool kernel", stem(pool0=nn.MaxPool2d(2, 2)), x, ValueError, r"MaxPool2d\(kernel_size=3, stride=2"),
        ("pool padding", stem(pool0=nn.MaxPool2d(3, 2, 0)), x, ValueError, "padding=1"),
        ("pool ceil_mode", stem(pool0=nn.MaxPool2d(3, 2, 1, ceil_mode=True)), x, ValueError, "ceil_mode=False"),
        ("not affine", stem(norm0=nn.BatchNorm2d(13, affine=False)), x, ValueError, "affine=True"),
        ("no running stats", stem(norm0=nn.BatchNorm2d(13, track_running_stats=False)), x, ValueError,
         "track_running_stats=True"),
        ("channel count", stem(), x[:, :2], ValueError, r"expected input with 3 channels"),
        ("3-D input", stem(), x[0], ValueError, "4-D input"),
        ("dtype", stem(), x.float(), TypeError, "expected input of dtype torch.float64"),
        ("integer input", stem(), x.long(), TypeError, "floating-point input"),
        ("one value per channel", stem(), x[:1, :, :1, :1], ValueError, "more than 1 value per channel"),
        ("not a pool", stem(pool0=nn.AvgPool2d(3, 2, 1)), x, TypeError, "pool0 to be an nn.MaxPool2d"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_bad_input_raises_and_changes_nothing(case):
    _, stem, x, exc, msg = case
    before = _buffers(stem)
    with pytest.raises(exc, match=msg):
        run_fused(stem, x.requires_grad_() if x.is_floating_point() else x)
    for name, b in _buffers(stem).items():
        assert torch.equal(b, before[name]), name


def test_hooks_refused():
    stem = tv_stem()
    stem.norm0.register_forward_hook(lambda *a: None)
    before = _buffers(stem)
    with pytest.raises(RuntimeError, match="hooks on norm0 are not supported"):
        run_fused(stem, torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert all(torch.equal(b, before[n]) for n, b in _buffers(stem).items())


def test_sync_batchnorm_without_a_process_group_runs_as_batchnorm():
    """A world of one process (or none) has nothing to synchronize (tests/autograd/test_distributed.py checks
    two processes): the stem runs as nn.BatchNorm2d, as nn.SyncBatchNorm itself does."""
    stem = tv_stem()
    sync = nn.SyncBatchNorm(13).double()
    sync.load_state_dict(stem.norm0.state_dict())
    stem.norm0 = sync
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ref = tv_stem()
    ref.load_state_dict(stem.state_dict())
    assert_close(run_fused(stem, x), ref(x.clone()), 1e-12, "SyncBatchNorm without a process group")


# ----------------------------------------------------------------------------- saved bytes
def _saved_activation_bytes(fn, stem, x):
    """Bytes of the distinct storages saved for backward by one training forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in stem.parameters()}
    with SavedBytes() as saved:
        y = fn(stem, x)
    del y
    return sum(n for ptr, n in saved.storages.items() if ptr not in params)


# fused / torchvision saved activation bytes of the stem at N=4, 224x224, float32, parameters excluded:
# measured 15.31 MiB (x 2.30, y 12.25, int8 index 0.77) against 32.92 MiB (x 2.30, y 12.25, the BN/ReLU
# output 12.25, int64 indices 6.13), ratio 0.465.  A regression that saves the BN/ReLU output or wide
# indices again fails.
SAVED_RATIO_MAX = 0.47


def test_saved_bytes_vs_torchvision():
    ref = tv_stem(features=64, dtype=torch.float32)
    x = torch.randn(4, 3, 224, 224)
    tv_bytes = _saved_activation_bytes(lambda s, t: s(t), ref, x)
    fused_bytes = _saved_activation_bytes(run_fused, copy.deepcopy(ref), x)
    y_elems = 4 * 64 * 112 * 112
    # fused: x (the input, for conv0's weight gradient), y in fp32, the int8 window index, 4 channel vectors
    assert fused_bytes == x.numel() * 4 + y_elems * 4 + y_elems // 4 + 4 * 64 * 4
    # torchvision: x, y, the BN output (the ReLU and pool work on it in place/read it), int64 indices, and
    # BN's saved mean/invstd
    assert tv_bytes >= x.numel() * 4 + 2 * y_elems * 4 + y_elems // 4 * 8
    ratio = fused_bytes / tv_bytes
    print(f"stem saved bytes, N=4 224x224 fp32: fused {fused_bytes / 2**20:.2f} MiB, torchvision "
          f"{tv_bytes / 2**20:.2f} MiB, ratio {ratio:.3f}")
    assert ratio <= SAVED_RATIO_MAX
    # bf16 autocast: y in bfloat16 (x is saved as given, float32: the caller's tensor, no new memory), against
    # torchvision's bf16 copy of x, y, BN/ReLU output and int64 indices: measured 9.19 MiB vs 19.54 MiB
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tv_half = _saved_activation_bytes(lambda s, t: s(t), ref, x)
        fused_half = _saved_activation_bytes(run_fused, copy.deepcopy(ref), x)
    assert fused_half == x.numel() * 4 + y_elems * 2 + y_elems // 4 + 4 * 64 * 4
    assert fused_half / tv_half <= 0.48


# ----------------------------------------------------------------------------- torch.export
class _FusedStem(nn.Module):
    def __init__(self, stem):
        super().__init__()
        self.stem = stem

    def forward(self, x):
        return run_fused(self.stem, x)


def test_export_eval_matches_eager():
    model = _FusedStem(tv_stem(dtype=torch.float32)).eval()
    x = torch.randn(2, 3, 33, 31)
    with torch.no_grad():
        expected = model(x)
    ep = torch.export.export(model, (x,))
    y = ep.module()(x)  # grad mode on, parameters requiring grad: the ops run below autograd
    assert_close(y.detach(), expected, 1e-6, "exported program")
    with torch.no_grad():
        assert_close(ep.module()(x), expected, 1e-6, "exported program under no_grad")
    # the exported graph calls the ops directly: a backward through it is refused, never a wrong gradient
    with pytest.raises(RuntimeError, match="has no derivative of its own"):
        y.sum().backward()


def test_empty_batch_as_torchvision():
    from collections import OrderedDict
    from blockutil import assert_empty_batch_as_torchvision, randomize_bn
    ref = randomize_bn(torch.nn.Sequential(OrderedDict(
        conv0=torch.nn.Conv2d(3, 4, 7, 2, 3, bias=False), norm0=torch.nn.BatchNorm2d(4),
        relu0=torch.nn.ReLU(inplace=True), pool0=torch.nn.MaxPool2d(3, 2, 1)))).double()
    fused = copy.deepcopy(ref)
    assert_empty_batch_as_torchvision(ref, fused, (0, 3, 16, 16),
                                      call=lambda m, x: m(x) if m is ref else fused_stem(x, m.conv0, m.norm0, m.pool0))
