"""bnrelu_maxpool (the stem's BatchNorm-ReLU-3x3/2 max pool): the CPU kernels (and the CUDA op where a GPU
is present) and the Triton kernels (under TRITON_INTERPRET=1 on CPU tensors, or on a GPU) against a
plain-PyTorch oracle: F.batch_norm -> relu -> F.max_pool2d(3, 2, 1) with autograd, in float64."""
import pytest
import torch
import torch.nn.functional as F

from densenet_fused.ops import bnrelu_maxpool as op
from opsutil import INTERPRET, TRITON_DEVICE, needs_triton

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
# (N, C, H, W): odd and even sizes (an even H puts the last row in one window only), C not a multiple
# of 8, a 1x1 and a 2x3 plane, enough pixels for several row chunks / splits.
SHAPES = [(1, 5, 13, 11), (2, 13, 7, 9), (3, 8, 2, 3), (1, 3, 1, 1), (2, 17, 6, 4), (4, 6, 23, 17)]


# ----------------------------------------------------------------------------- oracle
def _nchw(y2, n, h, w):
    return y2.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def oracle_fwd(y2, scale, shift, nhw):
    """(out (P, C), flat input index per output as torch's max_pool2d returns it): relu(y*scale+shift)
    computed in float64 and rounded to y's dtype, then torch's max pool."""
    n, h, w = nhw
    a = torch.relu(y2.double() * scale.double() + shift.double()).to(y2.dtype)
    out, idx = F.max_pool2d(_nchw(a, n, h, w), 3, 2, 1, return_indices=True)
    c = y2.shape[1]
    return out.permute(0, 2, 3, 1).reshape(-1, c), idx.permute(0, 2, 3, 1).reshape(-1, c)


def flat_index(index, nhw):
    """The op's window index (kh*3 + kw) as torch's flat input index ih*W + iw."""
    n, h, w = nhw
    hp, wp = op.pooled_size(h), op.pooled_size(w)
    k = index.long().cpu().reshape(n, hp, wp, -1)
    oh = torch.arange(hp).view(1, hp, 1, 1)
    ow = torch.arange(wp).view(1, 1, wp, 1)
    return ((2 * oh - 1 + k // 3) * w + (2 * ow - 1 + k % 3)).reshape(-1, index.shape[1])


def oracle_bwd(dout, y2, gamma, beta, eps, nhw, running=None):
    """(dy, dgamma, dbeta) of BatchNorm (batch statistics, or ``running`` = (mean, var)) -> ReLU -> max pool,
    by autograd in float64."""
    n, h, w = nhw
    y = _nchw(y2.detach().double().cpu(), n, h, w).clone().requires_grad_()
    g = gamma.detach().double().cpu().requires_grad_()
    b = beta.detach().double().cpu().requires_grad_()
    rm, rv = (None, None) if running is None else (running[0].double().cpu(), running[1].double().cpu())
    z = F.batch_norm(y, rm, rv, g, b, training=running is None, eps=eps)
    out = F.max_pool2d(torch.relu(z), 3, 2, 1)
    c = y2.shape[1]
    out.backward(_nchw(dout.double().cpu(), n, op.pooled_size(h), op.pooled_size(w)))
    return y.grad.permute(0, 2, 3, 1).reshape(-1, c), g.grad, b.grad


def _case(shape, dtype, device, row_pad=0, gen=None):
    """y (as a channel slice of a wider matrix when row_pad > 0), gamma, beta, eps and the folded BN."""
    n, c, h, w = shape
    m = n * h * w
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wide = torch.randn(m, c + row_pad, dtype=torch.float64, generator=gen) * 1.5 + 0.3
    y2 = wide.to(dtype).to(device)[:, row_pad // 2: row_pad // 2 + c]
    gamma = (torch.rand(c, dtype=torch.float64, generator=gen) + 0.5).to(acc).to(device)
    beta = (torch.randn(c, dtype=torch.float64, generator=gen) * 0.5).to(acc).to(device)
    eps = 1e-3
    yd = y2.double()
    mean, var = yd.mean(0).to(acc), yd.var(0, unbiased=False).to(acc)
    rstd = (var + eps).rsqrt()
    scale = gamma * rstd
    shift = beta - mean * scale
    return y2, gamma, beta, eps, mean, var, rstd, scale, shift


def _close(got, want, dtype):
    tol = TOL[dtype]
    want = want.double().cpu()
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


IMPLS = {"op": (op.bnrelu_maxpool_fwd, op.bnrelu_maxpool_bwd)}
if TRITON_DEVICE is not None:
    IMPLS["triton"] = (op.triton_fwd, op.triton_bwd)


def _impl(impl, device):
    """(device, forward, backward) of an implementation: the Triton launchers on TRITON_DEVICE."""
    fwd, bwd = IMPLS[impl]
    if impl == "triton":
        if device.type != "cpu":  # one run per Triton device: the parametrized device is the op's
            pytest.skip("the Triton launchers run once, on TRITON_DEVICE")
        return torch.device(TRITON_DEVICE), fwd, bwd
    return device, fwd, bwd


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward(device, impl, dtype, shape):
    device, fwd, _ = _impl(impl, device)
    n, c, h, w = shape
    y2, _, _, _, _, _, _, scale, shift = _case(shape, dtype, device, row_pad=3)
    out, index = fwd(y2, scale, shift, [n, h, w])
    p = n * op.pooled_size(h) * op.pooled_size(w)
    assert out.shape == (p, c) and out.dtype == dtype and index.dtype == torch.int8 and index.shape == (p, c)
    want, want_idx = oracle_fwd(y2.cpu(), scale.cpu(), shift.cpu(), [n, h, w])
    tol = 1e-14 if dtype == torch.float64 else 1e-6  # y*scale + shift may round differently (an FMA)
    torch.testing.assert_close(out.cpu(), want, rtol=tol, atol=tol)
    assert torch.equal(flat_index(index, [n, h, w]), want_idx)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_ties_and_nan(device, impl):
    # small integers: many equal maxima (and all-zero windows after the ReLU); torch's rule takes the first
    # maximum in scan order, a NaN always (the last NaN of the window), and never the padding
    device, fwd, _ = _impl(impl, device)
    n, c, h, w = 3, 7, 9, 8
    y2 = torch.randint(-2, 3, (n * h * w, c)).float()
    y2[torch.rand(y2.shape) < 0.02] = float("nan")
    y2 = y2.to(device)
    scale, shift = torch.ones(c, device=device), torch.zeros(c, device=device)
    out, index = fwd(y2, scale, shift, [n, h, w])
    want, want_idx = oracle_fwd(y2.cpu(), scale.cpu(), shift.cpu(), [n, h, w])
    assert torch.isnan(want).any() and (want == 0).any()
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(flat_index(index, [n, h, w]), want_idx)


# ----------------------------------------------------------------------------- backward
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward(device, impl, training, dtype, shape):
    device, fwd, bwd = _impl(impl, device)
    n, c, h, w = shape
    if training and n * h * w == 1:
        pytest.skip("batch statistics need more than one value per channel")
    y2, gamma, beta, eps, mean, var, rstd, scale, shift = _case(shape, dtype, device, row_pad=2)
    running = None
    if not training:  # running statistics unrelated to the batch
        acc = mean.dtype
        mean = (torch.randn(c, dtype=torch.float64) * 0.3).to(acc).to(device)
        var = (torch.rand(c, dtype=torch.float64) + 0.5).to(acc).to(device)
        rstd = (var + eps).rsqrt()
        scale = gamma * rstd
        shift = beta - mean * scale
        running = (mean, var)
    _, index = fwd(y2, scale, shift, [n, h, w])
    dout = torch.randn(index.shape, dtype=torch.float64).to(dtype).to(device)
    dy, dgamma, dbeta = bwd(dout, index, y2, scale, shift, mean, rstd, [n, h, w], n * h * w if training else 0)
    assert dy.shape == y2.shape and dy.dtype == dtype and dy.is_contiguous()
    assert dgamma.dtype == mean.dtype and dbeta.dtype == mean.dtype
    dy_ref, dgamma_ref, dbeta_ref = oracle_bwd(dout, y2, gamma, beta, eps, [n, h, w], running)
    _close(dy, dy_ref, dtype)
    _close(dgamma, dgamma_ref, dtype)
    _close(dbeta, dbeta_ref, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_routes_ties_like_torch(device, impl):
    # equal maxima: the gradient goes to the position torch's max_pool2d backward routes it to
    device, fwd, bwd = _impl(impl, device)
    n, c, h, w = 2, 5, 9, 7
    y2 = torch.randint(-1, 3, (n * h * w, c)).double()
    one, zero = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    _, index = fwd(y2.to(device), one.to(device), zero.to(device), [n, h, w])
    dout = torch.randn(index.shape, dtype=torch.float64)
    dy, dgamma, dbeta = bwd(dout.to(device), index, y2.to(device), one.to(device), zero.to(device),
                            zero.to(device), one.to(device), [n, h, w], 0)
    ref = _nchw(y2, n, h, w).clone().requires_grad_()
    F.max_pool2d(torch.relu(ref), 3, 2, 1).backward(_nchw(dout, n, op.pooled_size(h), op.pooled_size(w)))
    want = ref.grad.permute(0, 2, 3, 1).reshape(-1, c)
    torch.testing.assert_close(dy.cpu(), want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(dbeta.cpu(), want.sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dgamma.cpu(), (want * y2).sum(0), rtol=1e-12, atol=1e-12)


def test_deterministic(device):
    shape = (4, 19, 31, 29)
    n, c, h, w = shape
    y2, _, _, _, mean, _, rstd, scale, shift = _case(shape, torch.float32, device)
    _, index = op.bnrelu_maxpool_fwd(y2, scale, shift, [n, h, w])
    dout = torch.randn(index.shape, device=device)
    runs = [op.bnrelu_maxpool_bwd(dout, index, y2, scale, shift, mean, rstd, [n, h, w], n * h * w) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_matches_cpu(dtype):
    # 16-bit feature dtypes: the Triton kernels agree with the C++ kernels (same rounding of relu(bn(y)),
    # float32 statistics) up to the order of float32 sums
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter stores bfloat16 as uint16 (triton-lang/triton#11584)")
    shape = (2, 13, 11, 9)
    n, c, h, w = shape
    y2, _, _, _, mean, _, rstd, scale, shift = _case(shape, dtype, "cpu")
    out_c, index_c = op.bnrelu_maxpool_fwd(y2, scale, shift, [n, h, w])
    d = torch.device(TRITON_DEVICE)
    out_t, index_t = op.triton_fwd(y2.to(d), scale.to(d), shift.to(d), [n, h, w])
    assert torch.equal(out_t.cpu(), out_c) and torch.equal(index_t.cpu(), index_c)
    dout = torch.randn(index_c.shape).to(dtype)
    got = op.triton_bwd(dout.to(d), index_t, y2.to(d), scale.to(d), shift.to(d), mean.to(d), rstd.to(d), [n, h, w],
                        n * h * w)
    want = op.bnrelu_maxpool_bwd(dout, index_c, y2, scale, shift, mean, rstd, [n, h, w], n * h * w)
    torch.testing.assert_close(got[0].cpu().float(), want[0].float(), rtol=1e-2, atol=1e-2)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- op contract
def test_opcheck(device):
    n, c, h, w = 2, 11, 9, 7
    y2, _, _, _, mean, _, rstd, scale, shift = _case((n, c, h, w), torch.float32, device)
    torch.library.opcheck(torch.ops.densenet_fused.bnrelu_maxpool_fwd.default, (y2, scale, shift, [n, h, w]))
    _, index = op.bnrelu_maxpool_fwd(y2, scale, shift, [n, h, w])
    dout = torch.randn(index.shape, device=device)
    for count in (n * h * w, 0):
        torch.library.opcheck(torch.ops.densenet_fused.bnrelu_maxpool_bwd.default,
                              (dout, index, y2, scale, shift, mean, rstd, [n, h, w], count))


BAD_IMPLS = {"op": IMPLS["op"], "triton": (op.triton_fwd, op.triton_bwd)}


@pytest.mark.parametrize("impl", BAD_IMPLS)
def test_bad_input(impl):
    fwd, bwd = BAD_IMPLS[impl]
    n, c, h, w = 2, 6, 5, 5
    y2, _, _, _, mean, _, rstd, scale, shift = _case((n, c, h, w), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"expected nhw = \[N, H, W\]"):
        fwd(y2, scale, shift, [n, h, w + 1])
    with pytest.raises(RuntimeError, match="scale to be a 1-D tensor of 6 channels"):
        fwd(y2, scale[:4], shift, [n, h, w])
    with pytest.raises(RuntimeError, match=r"expected shift (of dtype Float|to be a 1-D tensor of 6 channels, dtype torch.float32)"):
        fwd(y2, scale, shift.double(), [n, h, w])
    with pytest.raises(RuntimeError, match="2-D"):
        fwd(y2[None], scale, shift, [n, h, w])
    _, index = IMPLS["op"][0](y2, scale, shift, [n, h, w])
    dout = torch.randn(index.shape)
    with pytest.raises(RuntimeError, match=r"dout to be a contiguous \(18, 6\)"):
        bwd(dout[:5], index, y2, scale, shift, mean, rstd, [n, h, w], 50)
    with pytest.raises(RuntimeError, match="index to be a contiguous int8"):
        bwd(dout, index.long(), y2, scale, shift, mean, rstd, [n, h, w], 50)
    with pytest.raises(RuntimeError, match="rstd to be a 1-D tensor of 6 channels"):
        bwd(dout, index, y2, scale, shift, mean, rstd[:2], [n, h, w], 50)
    with pytest.raises(RuntimeError, match="expected count = 0"):
        bwd(dout, index, y2, scale, shift, mean, rstd, [n, h, w], 1)


def test_bad_index_refused():
    n, c, h, w = 2, 6, 5, 5
    y2, _, _, _, mean, _, rstd, scale, shift = _case((n, c, h, w), torch.float32, "cpu")
    _, index = op.bnrelu_maxpool_fwd(y2, scale, shift, [n, h, w])
    dout = torch.randn(index.shape)
    bad = index.clone()
    bad[0, 0] = 0  # output (0, 0)'s window starts in the padding: position 0 lies outside y
    with pytest.raises(RuntimeError, match=r"expected index values in \[0, 9\) pointing inside y"):
        op.bnrelu_maxpool_bwd(dout, bad, y2, scale, shift, mean, rstd, [n, h, w], 50)
