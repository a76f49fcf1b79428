"""bnrelu_conv3x3: the ATen implementation (CPU kernel, cuDNN on CUDA) and the Triton kernels
(TRITON_INTERPRET=1 on CPU tensors in CI, CUDA tensors on a GPU) against a float64 oracle."""
import os

import pytest
import torch
import torch.nn.functional as F

from densenet_fused.ops import bnrelu_conv3x3 as op
from densenet_fused.ops.options import Dropout, FoldBN, GradFinish, StatsOut
from opsutil import INTERPRET, TRITON_DEVICE, needs_triton

SHAPES = [(1, 1, 1, 16, 5), (2, 5, 7, 20, 7), (3, 4, 9, 33, 12)]  # N, H, W, Cb, k


def _args(n, h, w, cb, k, dtype, device):
    m = n * h * w
    b = (torch.randn(m, cb, dtype=torch.float64) + 0.2).to(dtype).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(cb, dtype=acc) + 0.5).to(device)
    shift = (torch.randn(cb, dtype=acc) * 0.5).to(device)
    weight = (torch.randn(k, cb, 3, 3, dtype=torch.float64) / (3 * cb ** 0.5)).to(dtype).to(device)
    mean = (torch.randn(cb, dtype=acc) * 0.1).to(device)
    rstd = (torch.rand(cb, dtype=acc) + 0.5).to(device)
    return b, scale, shift, weight, mean, rstd


def _oracle(b, scale, shift, weight, nhw, dy):
    """float64 forward output and (g2, dweight, dgamma, dbeta) by autograd."""
    n, h, w = nhw
    y2 = b.double() * scale.double() + shift.double()
    a = torch.relu(y2)
    if b.dtype != torch.float64:
        a = a.to(b.dtype).double()
    a4 = a.view(n, h, w, -1).permute(0, 3, 1, 2).detach().requires_grad_()
    wd = weight.double().detach().requires_grad_()
    out = F.conv2d(a4, wd, padding=1)
    out.backward(dy.double().view(n, h, w, -1).permute(0, 3, 1, 2))
    g2 = torch.where(y2 > 0, a4.grad.permute(0, 2, 3, 1).reshape(b.shape), 0)
    return out.permute(0, 2, 3, 1).reshape(b.shape[0], -1), g2, wd.grad, g2, y2


def _err(got, want):
    return (got.double().cpu() - want.cpu()).abs().max().item() / max(want.abs().max().item(), 1e-30)


def _run(impl, dtype, device, n, h, w, cb, k):
    torch.manual_seed(0)
    b, scale, shift, weight, mean, rstd = _args(n, h, w, cb, k, dtype, device)
    nhw = [n, h, w]
    m = n * h * w
    buf = torch.zeros(m, k + 9, dtype=dtype, device=device)
    out = buf[:, 4:4 + k]
    fwd = op._fwd_triton if impl == "triton" else op._fwd_aten
    bwd = op._bwd_triton if impl == "triton" else op._bwd_aten
    tol = {torch.float64: 1e-12, torch.float32: 3e-5, torch.float16: 4e-3, torch.bfloat16: 1e-2}[dtype]
    mean_o, var_o = fwd(b, scale, shift, weight, nhw, out, True)
    acc = scale.dtype
    stats_buf = torch.full((2, k + 3), 7.0, dtype=acc, device=device)  # statistics written in place
    out2 = torch.empty_like(out)
    assert fwd(b, scale, shift, weight, nhw, out2, True, stats_buf[0, 1:1 + k], stats_buf[1, 2:2 + k])[0].numel() == 0
    assert torch.equal(out2, out)
    assert torch.equal(stats_buf[0, 1:1 + k], mean_o) and torch.equal(stats_buf[1, 2:2 + k], var_o)
    assert (stats_buf[0, 0] == 7) and (stats_buf[0, 1 + k:] == 7).all() and (stats_buf[1, :2] == 7).all()
    # after C = 3 earlier channels, with the next BatchNorm's folded map over all C + k channels
    full = torch.rand(2, 3 + k, dtype=acc, device=device) + 0.5
    before = full[:, :3].clone()
    gamma, beta = torch.rand(3 + k, device=device) + 0.5, torch.randn(3 + k, device=device)
    bn_out = torch.empty(3, 3 + k, dtype=acc, device=device)
    fwd(b, scale, shift, weight, nhw, out2, True, full[0], full[1], bn_out, gamma, beta, 1e-3)
    assert torch.equal(full[:, :3], before) and torch.equal(full[0, 3:], mean_o) and torch.equal(full[1, 3:], var_o)
    want = torch.stack(op.bn_scale_shift(gamma, beta, full[0], full[1], 1e-3))
    torch.testing.assert_close(bn_out, want, rtol=2e-7 if acc == torch.float32 else 1e-15, atol=0)
    dy = torch.randn(m, k, dtype=torch.float64).to(dtype).to(device)
    g2, dweight, dgamma, dbeta, p, q = bwd(dy, b, scale, shift, weight, nhw, mean, rstd, m)
    assert torch.equal(bwd(dy, b, scale, shift, weight, nhw, mean, rstd)[4], torch.zeros_like(p))  # count 0
    # dy finished on the fly from the block's gradient sum: G - P - (x - mean) * Q
    Gs = torch.randn(m, k + 3, dtype=acc, device=device)[:, 1:1 + k]
    xs = torch.randn(m, k + 2, dtype=torch.float64).to(dtype).to(device)[:, 2:]
    xm, xp, xq = (torch.randn(k, dtype=acc, device=device) for _ in range(3))
    dyf = (Gs.double() - xp.double() - (xs.double() - xm.double()) * xq.double()).to(dtype)
    got = bwd(Gs, b, scale, shift, weight, nhw, mean, rstd, m, xs, xm, xp, xq)
    for g, want in zip(got, bwd(dyf, b, scale, shift, weight, nhw, mean, rstd, m)):
        assert _err(g, want.double()) <= tol
    ref_out, ref_g2, ref_dw, _, _ = _oracle(b.cpu(), scale.cpu(), shift.cpu(), weight.cpu(), nhw, dy.cpu())
    xhat = (b.double().cpu() - mean.double().cpu()) * rstd.double().cpu()
    assert _err(out, ref_out) <= tol
    assert torch.equal(buf[:, :4], torch.zeros_like(buf[:, :4])) and torch.equal(buf[:, 4 + k:], buf[:, 4 + k:] * 0)
    stored = out.double().cpu()
    assert _err(mean_o, stored.mean(0)) <= 1e-5 and _err(var_o, stored.var(0, unbiased=False)) <= 1e-5
    assert _err(g2, ref_g2) <= tol
    assert _err(dweight, ref_dw) <= tol
    assert _err(dbeta, ref_g2.sum(0)) <= tol
    assert _err(dgamma, (ref_g2 * xhat).sum(0)) <= tol
    sc, rs = scale.double().cpu(), rstd.double().cpu()
    assert _err(p, sc * ref_g2.sum(0) / m) <= tol
    assert _err(q, sc * rs * (ref_g2 * xhat).sum(0) / m) <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_aten_implementation(device, dtype, shape, no_tf32):
    # float32 tolerance 3e-5: cuDNN's default TF32 convolutions (error ~3e-4) are turned off
    _run("aten", dtype, device, *shape)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16]))
# bfloat16 on GPUs only: the interpreter's bf16 tl.dot multiplies bit patterns (triton-lang/triton#11584)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_kernels(dtype, shape, no_tf32):
    _run("triton", dtype, TRITON_DEVICE, *shape)


def test_opcheck(device):
    b, scale, shift, weight, mean, rstd = _args(2, 3, 4, 16, 5, torch.float32, device)
    out = torch.empty(24, 7, device=device)[:, 1:6]
    ops = torch.ops.densenet_fused
    torch.library.opcheck(ops.bnrelu_conv3x3_fwd.default, (b, [scale, shift], weight, [2, 3, 4], [out], ""))
    dy = torch.randn(24, 5, device=device)
    bn = [scale, shift, mean, rstd]
    torch.library.opcheck(ops.bnrelu_conv3x3_bwd.default, (dy, b, bn, weight, [2, 3, 4], "", 24))
    x, vec = torch.randn(24, 5, device=device), torch.randn(3, 5, device=device)
    torch.library.opcheck(ops.bnrelu_conv3x3_bwd.default, (dy, b, bn, weight, [2, 3, 4], "", 24, [x, *vec]))
    st = torch.empty(2, 7, device=device)  # statistics of C + k = 2 + 5 channels, and the folded map
    folded, gb = torch.empty(3, 7, device=device), torch.rand(2, 7, device=device) + 0.5
    torch.library.opcheck(ops.bnrelu_conv3x3_fwd.default, (b, [scale, shift], weight, [2, 3, 4], [out, st[0], st[1]]))
    torch.library.opcheck(ops.bnrelu_conv3x3_fwd.default, (b, [scale, shift], weight, [2, 3, 4],
                                                           [out, st[0], st[1], folded], "", [gb[0], gb[1]], 1e-5))


def test_default_cuda_impl_is_triton():
    # measured faster on an H100 (module docstring); DENSENET_FUSED_CONV3X3 overrides it
    assert op.conv3x3_impl() == os.environ.get("DENSENET_FUSED_CONV3X3", "triton")


def test_cuda_routing():
    """Triton on CUDA for 16-bit dtypes and float32 with TF32 when chosen; cuDNN for float64 and for
    float32 without TF32 whatever the choice (fake CUDA tensors: no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flags import patched
    with FakeTensorMode():
        b = {d: torch.empty(4, 4, dtype=d, device="cuda") for d in (torch.float64, torch.float32, torch.bfloat16)}
    for tf32, want32 in ((False, False), (True, True)):
        with patched(torch.backends.cuda.matmul, allow_tf32=tf32):
            assert op._use_triton(b[torch.float32], "triton") is want32
            assert op._use_triton(b[torch.float64], "triton") is False
            assert op._use_triton(b[torch.bfloat16], "triton") is True
            assert op._use_triton(b[torch.bfloat16], "aten") is False
    assert op._use_triton(torch.empty(4, 4, dtype=torch.bfloat16), "triton") is False  # CPU: the ATen kernel


def test_impl_switch_and_bad_input():
    with pytest.raises(ValueError, match="expected one of"):
        with op.using_conv3x3("cudnn"):
            pass
    with op.using_conv3x3("aten"):
        assert op.conv3x3_impl() == "aten"
    assert op.conv3x3_impl() == os.environ.get("DENSENET_FUSED_CONV3X3", "triton")  # restored
    b, scale, shift, weight, _, _ = _args(2, 3, 4, 16, 5, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"nhw = \[N, H, W\] with N\*H\*W = 24"):
        op.bnrelu_conv3x3_fwd(b, scale, shift, weight, [2, 3, 5], torch.empty(24, 5))
    with pytest.raises(RuntimeError, match=r"expected out of shape \(24, 5\)"):
        op.bnrelu_conv3x3_fwd(b, scale, shift, weight, [2, 3, 4], torch.empty(24, 4))
    with pytest.raises(RuntimeError, match=r"expected mean_out to be a contiguous 1-D tensor of C \+ 5 channels"):
        op.bnrelu_conv3x3_fwd(b, scale, shift, weight, [2, 3, 4], torch.empty(24, 5),
                              stats=StatsOut(torch.empty(4), torch.empty(5)))
    with pytest.raises(RuntimeError, match=r"expected bn_out of shape \(3, 7\)"):
        op.bnrelu_conv3x3_fwd(b, scale, shift, weight, [2, 3, 4], torch.empty(24, 5),
                              stats=StatsOut(torch.empty(7), torch.empty(7)),
                              fold=FoldBN(torch.empty(3, 5), torch.ones(7), torch.ones(7), 1e-5))
    with pytest.raises(RuntimeError, match=r"expected stats=StatsOut\(mean, var\) with fold"):
        op.bnrelu_conv3x3_fwd(b, scale, shift, weight, [2, 3, 4], torch.empty(24, 5),
                              fold=FoldBN(torch.empty(3, 7), torch.ones(7), torch.ones(7), 1e-5))
    fwd = torch.ops.densenet_fused.bnrelu_conv3x3_fwd  # the schema's lists: lengths checked, one line
    with pytest.raises(RuntimeError, match=r"expected out = \[out\], \[out, mean, var\] or"):
        fwd(b, [scale, shift], weight, [2, 3, 4], [torch.empty(24, 5), torch.empty(5)])
    with pytest.raises(RuntimeError, match=r"expected bn = \[scale, shift\], got 1 tensors"):
        fwd(b, [scale], weight, [2, 3, 4], [torch.empty(24, 5)])
    with pytest.raises(RuntimeError, match=r"expected fold = \[gamma, beta\] exactly with"):
        fwd(b, [scale, shift], weight, [2, 3, 4], [torch.empty(24, 5), torch.empty(5), torch.empty(5)], "",
            [torch.ones(5), torch.ones(5)])
    bwd = torch.ops.densenet_fused.bnrelu_conv3x3_bwd
    with pytest.raises(RuntimeError, match=r"expected finish = \[\] or \[x, mean, p, q\], got 1 tensors"):
        bwd(torch.empty(24, 5), b, [scale, shift, scale, scale], weight, [2, 3, 4], "", 24, [torch.empty(24, 5)])
    with pytest.raises(RuntimeError, match=r"expected finish=GradFinish\(x, mean, p, q\) without a scale"):
        op.bnrelu_conv3x3_bwd(torch.empty(24, 5), b, scale, shift, weight, [2, 3, 4], scale, scale, count=24,
                              finish=GradFinish(torch.empty(24, 5), *torch.empty(4, 5)))
    with pytest.raises(RuntimeError, match=r"expected dy of shape \(24, 5\), dtype torch.float32"):
        op.bnrelu_conv3x3_bwd(torch.empty(24, 5, dtype=torch.float64), b, scale, shift, weight, [2, 3, 4], scale,
                              scale, count=24, finish=GradFinish(torch.empty(24, 5), *torch.empty(3, 5)))
    with pytest.raises(RuntimeError, match=r"expected count >= 0"):
        op.bnrelu_conv3x3_bwd(torch.empty(24, 5), b, scale, shift, weight, [2, 3, 4], scale, scale, count=-1)


# ----------------------------------------------------------------------------- dropout
@pytest.mark.skipif(not INTERPRET, reason="the Triton mask kernel on CPU tensors (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("seed", [0, 12345, 2 ** 40 + 7, 2 ** 62 - 1])  # the key's high word too
def test_dropout_mask_in_torch_is_tritons_philox(seed):
    """philox_randint (the CPU mask) is tl.randint bit for bit: the Triton kernels and the CPU draw the
    same mask from the same seed."""
    s = torch.tensor([seed], dtype=torch.int64)
    for p in (0.0, 0.1, 0.5, 1.0):
        want = op.triton_dropout_mask(s, p, 37, 11, torch.float32)
        assert torch.equal(op.dropout_mask(s, p, 37, 11, torch.float32), want)
    mask = op.dropout_mask(s, 0.3, 1000, 40, torch.float64)
    assert set(mask.unique().tolist()) <= {0.0, 1 / 0.7}
    frac = (mask == 0).double().mean().item()
    assert abs(frac - 0.3) < 5 * (0.3 * 0.7 / mask.numel()) ** 0.5


def _impls():
    out = [("aten", "cpu")]
    if TRITON_DEVICE is not None:
        out.append(("triton", TRITON_DEVICE))
    return out


@pytest.mark.parametrize("impl,device", _impls())
def test_dropout_forward_and_backward_use_the_seed_mask(impl, device, no_tf32):
    """The forward stores out * mask (its statistics over the stored values); the backward takes dy
    through the same mask, regenerated from the seed (dy finished on the fly from G, P, Q too)."""
    torch.manual_seed(0)
    n, h, w, cb, k = 2, 5, 7, 20, 7
    m, p = n * h * w, 0.4
    dtype = torch.float32
    b, scale, shift, weight, mean, rstd = _args(n, h, w, cb, k, dtype, device)
    fwd = op._fwd_triton if impl == "triton" else op._fwd_aten
    bwd = op._bwd_triton if impl == "triton" else op._bwd_aten
    seed = torch.tensor([987654321], dtype=torch.int64, device=device)
    mask = op.dropout_mask(seed.cpu(), p, m, k, dtype).to(device)
    plain, dropped = torch.empty(m, k, device=device), torch.empty(m, k, device=device)
    fwd(b, scale, shift, weight, [n, h, w], plain, False)
    mu, var = fwd(b, scale, shift, weight, [n, h, w], dropped, True, drop_p=p, drop_seed=seed)
    assert torch.equal((dropped == 0) | (plain == 0), (mask == 0) | (plain == 0))
    assert _err(dropped, (plain * mask).double()) <= 1e-6
    assert _err(mu, dropped.double().mean(0)) <= 1e-5 and _err(var, dropped.double().var(0, unbiased=False)) <= 1e-5
    dy = torch.randn(m, k, device=device)
    got = bwd(dy, b, scale, shift, weight, [n, h, w], mean, rstd, m, drop_p=p, drop_seed=seed)
    want = bwd(dy * mask, b, scale, shift, weight, [n, h, w], mean, rstd, m)
    for g, wnt in zip(got, want):
        assert _err(g, wnt.double()) <= 1e-6
    Gs = torch.randn(m, k, device=device)
    xs, xm, xp, xq = torch.randn(m, k, device=device), *(torch.randn(k, device=device) for _ in range(3))
    got = bwd(Gs, b, scale, shift, weight, [n, h, w], mean, rstd, m, xs, xm, xp, xq, p, seed)
    dyf = Gs - xp - (xs - xm) * xq
    want = bwd(dyf * mask, b, scale, shift, weight, [n, h, w], mean, rstd, m)
    for g, wnt in zip(got, want):
        assert _err(g, wnt.double()) <= 1e-5


def test_dropout_bad_input():
    b, scale, shift, weight, _, _ = _args(2, 3, 4, 16, 5, torch.float32, "cpu")
    out = torch.empty(24, 5)
    with pytest.raises(RuntimeError, match="expected drop_seed, a 1-element int64 tensor"):
        torch.ops.densenet_fused.bnrelu_conv3x3_fwd(b, [scale, shift], weight, [2, 3, 4], [out], "", [], 0.0, 0.5)
    with pytest.raises(RuntimeError, match="expected drop_seed, a 1-element int64 tensor"):
        op.bnrelu_conv3x3_bwd(out, b, scale, shift, weight, [2, 3, 4], scale, scale,
                              dropout=Dropout(0.5, torch.zeros(1, dtype=torch.int32)))
    with pytest.raises(RuntimeError, match="expected 0 <= drop_p <= 1"):
        op.bnrelu_conv3x3_fwd(b, scale, shift, weight, [2, 3, 4], out,
                              dropout=Dropout(1.5, torch.zeros(1, dtype=torch.int64)))


def test_a_bad_conv3x3_environment_value_is_refused_at_import():
    import subprocess
    import sys
    env = dict(os.environ, DENSENET_FUSED_CONV3X3="bogus")
    res = subprocess.run([sys.executable, "-c", "import densenet_fused"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode != 0
    assert "DENSENET_FUSED_CONV3X3='bogus': expected one of aten, triton" in res.stderr.strip().splitlines()[-1]
