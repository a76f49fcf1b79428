import pytest
import torch

import oracle
from densenet_fused.ops import bnrelu_conv1x1 as op
from densenet_fused.ops.bn_grad_finish import bn_grad_finish
from densenet_fused.ops.options import Accumulate, FoldBN, GradFinish
from opsutil import assert_deterministic, conv1x1_backward_into_zeros

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
SHAPES = [(1, 5, 0, 5, 3), (37, 20, 0, 13, 9), (300, 41, 0, 29, 12), (517, 64, 0, 50, 17)]


def _args(m, c_total, c_begin, c, cout, dtype, device):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = oracle.strided_slice(m, c_total, c_begin, c, dtype, offset=0.3, device=device)
    scale = (torch.rand(c, dtype=acc) + 0.5).to(device)
    shift = torch.randn(c, dtype=acc).to(device) * 0.5
    weight = (torch.randn(cout, c, dtype=torch.float64) / c ** 0.5).to(dtype).to(device)
    mean = torch.randn(c, dtype=acc).to(device) * 0.1
    rstd = (torch.rand(c, dtype=acc) + 0.5).to(device)
    return x, scale, shift, weight, mean, rstd


def _close(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.cpu().double(), want.cpu(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def _op_fwd(x, scale, shift, weight, stats=False, bn_out=None, gamma=None, beta=None, eps=0.0):
    """The registered op through its named options, in the launchers' positional form."""
    fold = None if bn_out is None else FoldBN(bn_out, gamma, beta, eps)
    return op.bnrelu_conv1x1_fwd(x, scale, shift, weight, stats, fold=fold)


def _op_bwd(dout, x, scale, shift, weight, mean, rstd, G, P=None, Q=None, count=0, *finish):
    accumulate = None if P is None and Q is None else Accumulate(P, Q, count)
    return op.bnrelu_conv1x1_bwd(dout, x, scale, shift, weight, mean, rstd, G, accumulate=accumulate,
                                 finish=GradFinish(*finish) if finish else None)


IMPLS = {"op": (_op_fwd, _op_bwd), "chunked_aten": (op.fwd_chunked, op.bwd_chunked)}


def every_case(test):
    """``test`` for each implementation, float64 and float32, and each of SHAPES."""
    test = pytest.mark.parametrize("m,c_total,c_begin,c,cout", SHAPES)(test)
    test = pytest.mark.parametrize("dtype", [torch.float64, torch.float32])(test)
    return pytest.mark.parametrize("impl", IMPLS)(test)


@pytest.fixture
def several_chunks(monkeypatch):
    """Chunks of 128 rows: several of them for the chunked kernel on SHAPES."""
    monkeypatch.setattr(op, "_CHUNK_ROWS", 128)


@every_case
def test_forward(device, impl, dtype, m, c_total, c_begin, c, cout, several_chunks):
    fwd, _ = IMPLS[impl]
    x, scale, shift, weight, _, _ = _args(m, c_total, c_begin, c, cout, dtype, device)
    out, mean, var = fwd(x, scale, shift, weight, True)
    ref = oracle.bnrelu_conv1x1_fwd(x, scale, shift, weight)
    assert out.shape == (m, cout) and out.dtype == dtype
    _close(out, ref, dtype)
    _close(mean, ref.mean(0), dtype)
    _close(var, ref.var(0, unbiased=False), dtype)
    out2, mean2, _ = fwd(x, scale, shift, weight, False)
    assert torch.equal(out, out2) and mean2.numel() == 0
    # BN2's folded map from the statistics, written by the same op: bn_scale_shift's values
    acc = scale.dtype
    gamma, beta = torch.rand(cout, device=device) + 0.5, torch.randn(cout, device=device)
    bn_out = torch.full((3, cout + 2), 9.0, dtype=acc, device=device)[:, 1:1 + cout]
    out3, mean3, var3 = fwd(x, scale, shift, weight, True, bn_out, gamma, beta, 1e-3)
    assert torch.equal(out3, out) and torch.equal(mean3, mean) and torch.equal(var3, var)
    want = torch.stack(op.bn_scale_shift(gamma, beta, mean, var, 1e-3))
    torch.testing.assert_close(bn_out, want, rtol=1e-6 if acc == torch.float32 else 1e-14, atol=0)


def test_bn_out_bad_input():
    x, scale, shift, weight, _, _ = _args(37, 20, 0, 13, 9, torch.float32, "cpu")
    g = torch.ones(9)
    with pytest.raises(RuntimeError, match="expected bn_out, bn_gamma and bn_beta together"):
        op.bnrelu_conv1x1_fwd(x, scale, shift, weight, True, fold=FoldBN(torch.empty(3, 9), g, None, 1e-5))
    with pytest.raises(RuntimeError, match="expected stats=True with bn_out"):
        op.bnrelu_conv1x1_fwd(x, scale, shift, weight, False, fold=FoldBN(torch.empty(3, 9), g, g, 1e-5))
    with pytest.raises(RuntimeError, match=r"expected bn_out of shape \(3, 9\)"):
        op.bnrelu_conv1x1_fwd(x, scale, shift, weight, True, fold=FoldBN(torch.empty(3, 8), g, g, 1e-5))


@every_case
def test_backward(device, impl, dtype, m, c_total, c_begin, c, cout, several_chunks):
    _, bwd = IMPLS[impl]
    x, scale, shift, weight, mean, rstd = _args(m, c_total, c_begin, c, cout, dtype, device)
    dout = torch.randn(m, cout, dtype=dtype, device=device)
    acc = scale.dtype
    gbuf = torch.randn(m, c_total + 2, dtype=acc, device=device)
    G = gbuf[:, 1:1 + c]
    G0 = G.clone()
    dweight, dgamma, dbeta = bwd(dout, x, scale, shift, weight, mean, rstd, G)
    dG, dw_ref, dgamma_ref, dbeta_ref = oracle.bnrelu_conv1x1_bwd(dout, x, scale, shift, weight, mean, rstd)
    _close(G - G0, dG, dtype)
    _close(dweight, dw_ref, dtype)
    _close(dgamma, dgamma_ref, dtype)
    _close(dbeta, dbeta_ref, dtype)
    assert torch.equal(gbuf[:, 0], gbuf[:, 0]) and dweight.dtype == acc


def test_backward_matches_autograd_of_unfused_chain():
    # The op's outputs are the gradients of BN(train)->ReLU->conv1x1 pieces: check against autograd.
    x, scale, shift, weight, mean, rstd = _args(40, 7, 0, 7, 5, torch.float64, "cpu")
    xr = x.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = torch.relu(xr * scale + shift) @ w.t()
    dout = torch.randn_like(out)
    out.backward(dout)
    G = torch.zeros_like(x)
    dweight, _, _ = op.bnrelu_conv1x1_bwd(dout, x, scale, shift, weight, mean, rstd, G)
    torch.testing.assert_close(G, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dweight, w.grad, rtol=1e-12, atol=1e-12)


def test_deterministic(device):
    x, scale, shift, weight, mean, rstd = _args(3000, 40, 0, 40, 16, torch.float32, device)
    dout = torch.randn(3000, 16, device=device)
    assert_deterministic(lambda: conv1x1_backward_into_zeros(op.bnrelu_conv1x1_bwd, dout, x, scale, shift, weight,
                                                             mean, rstd))


def test_opcheck(device):
    x, scale, shift, weight, mean, rstd = _args(45, 20, 0, 11, 6, torch.float32, device)
    torch.library.opcheck(torch.ops.densenet_fused.bnrelu_conv1x1_fwd.default, (x, scale, shift, weight, True))
    cout = weight.shape[0]
    g = torch.ones(cout, device=x.device)
    torch.library.opcheck(torch.ops.densenet_fused.bnrelu_conv1x1_fwd.default,
                          (x, scale, shift, weight, True, torch.empty(3, cout, dtype=scale.dtype, device=x.device), g,
                           g, 1e-5))
    dout = torch.randn(45, 6, device=device)
    G = torch.zeros(45, 11, device=device)
    bn = [scale, shift, mean, rstd]
    torch.library.opcheck(torch.ops.densenet_fused.bnrelu_conv1x1_bwd.default, (dout, x, weight, bn, G))
    P, Q = torch.zeros(11, device=device), torch.zeros(11, device=device)
    torch.library.opcheck(torch.ops.densenet_fused.bnrelu_conv1x1_bwd.default, (dout, x, weight, bn, G, [P, Q], 45))


def test_bad_input():
    x, scale, shift, weight, mean, rstd = _args(10, 8, 0, 8, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"weight of shape \(out_channels, 8\)"):
        op.bnrelu_conv1x1_fwd(x, scale, shift, weight[:, :5], False)
    with pytest.raises(RuntimeError, match="expected weight of dtype Float"):
        op.bnrelu_conv1x1_fwd(x, scale, shift, weight.double(), False)
    with pytest.raises(RuntimeError, match="scale to be a 1-D tensor of 8 channels"):
        op.bnrelu_conv1x1_fwd(x, scale[:3], shift, weight, False)
    with pytest.raises(RuntimeError, match="2-D"):
        op.bnrelu_conv1x1_fwd(x[None], scale, shift, weight, False)
    G = torch.zeros(10, 8)
    with pytest.raises(RuntimeError, match=r"dout of shape \(10, 4\)"):
        op.bnrelu_conv1x1_bwd(torch.zeros(10, 3), x, scale, shift, weight, mean, rstd, G)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_accumulates_p_and_q(device, impl, dtype):
    _, bwd = IMPLS[impl]
    x, scale, shift, weight, mean, rstd = _args(300, 41, 0, 29, 12, dtype, device)
    dout = torch.randn(300, 12, dtype=dtype, device=device)
    acc = scale.dtype
    P0, Q0 = torch.randn(29, dtype=acc, device=device), torch.randn(29, dtype=acc, device=device)
    P, Q = P0.clone(), Q0.clone()
    _, dgamma, dbeta = bwd(dout, x, scale, shift, weight, mean, rstd, torch.zeros(300, 29, dtype=acc, device=device),
                           P, Q, 300)
    _, _, dgamma_ref, dbeta_ref = oracle.bnrelu_conv1x1_bwd(dout, x, scale, shift, weight, mean, rstd)
    _close(P - P0, scale.double().cpu() * dbeta_ref.cpu() / 300, dtype)
    _close(Q - Q0, scale.double().cpu() * rstd.double().cpu() * dgamma_ref.cpu() / 300, dtype)
    with pytest.raises(RuntimeError, match="P and Q together"):
        bwd(dout, x, scale, shift, weight, mean, rstd, torch.zeros(300, 29, dtype=acc, device=device), P, None, 300)


def _db_finish_args(m, cout, dtype, device):
    """g2 (fp32/fp64, M x Cout), the bottleneck b (a strided slice in dtype) and BN2's per-channel
    terms (mean, p, q, scale) for the op's on-the-fly dB = scale*g2 - p - (b - mean)*q."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g2 = torch.randn(m, cout, dtype=acc).to(device)
    b = oracle.strided_slice(m, cout + 5, 2, cout, dtype, offset=0.2, device=device)
    vec = [(torch.randn(cout, dtype=acc) * s).to(device) for s in (0.3, 0.1, 0.2)]
    db_scale = (torch.rand(cout, dtype=acc) + 0.5).to(device)
    return g2, b, vec[0], vec[1], vec[2], db_scale


@every_case
def test_backward_finishes_db(device, impl, dtype, m, c_total, c_begin, c, cout, several_chunks):
    # dout = g2 and BN2's terms: the op forms dB itself; the oracle gets dB from plain PyTorch in
    # float64, rounded to the feature dtype
    _, bwd = IMPLS[impl]
    x, scale, shift, weight, mean, rstd = _args(m, c_total, c_begin, c, cout, dtype, device)
    g2, b, mu2, p2, q2, s2 = _db_finish_args(m, cout, dtype, device)
    acc = scale.dtype
    P0, Q0 = torch.randn(c, dtype=acc, device=device), torch.randn(c, dtype=acc, device=device)
    P, Q = P0.clone(), Q0.clone()
    G = torch.zeros(m, c, dtype=acc, device=device)
    dweight, dgamma, dbeta = bwd(g2, x, scale, shift, weight, mean, rstd, G, P, Q, m, b, mu2, p2, q2, s2)
    d = [t.double().cpu() for t in (g2, b, mu2, p2, q2, s2)]
    db = (d[0] * d[5] - d[3] - (d[1] - d[2]) * d[4]).to(dtype)
    dG, dw_ref, dgamma_ref, dbeta_ref = oracle.bnrelu_conv1x1_bwd(db, x.cpu(), scale.cpu(), shift.cpu(),
                                                                   weight.cpu(), mean.cpu(), rstd.cpu())
    _close(G, dG, dtype)
    _close(dweight, dw_ref, dtype)
    _close(dgamma, dgamma_ref, dtype)
    _close(dbeta, dbeta_ref, dtype)
    _close(P - P0, scale.double().cpu() * dbeta_ref / m, dtype)
    _close(Q - Q0, scale.double().cpu() * rstd.double().cpu() * dgamma_ref / m, dtype)
    # the same dB as bn_grad_finish writes (the block's previous two launches): identical results
    db_op = bn_grad_finish(g2, b, mu2, p2, q2, dtype, 0, s2)
    G2 = torch.zeros(m, c, dtype=acc, device=device)
    P2, Q2 = P0.clone(), Q0.clone()
    want = bwd(db_op, x, scale, shift, weight, mean, rstd, G2, P2, Q2, m)
    for got, ref in zip((G, P, Q, dweight, dgamma, dbeta), (G2, P2, Q2) + tuple(want)):
        assert torch.equal(got, ref)


def test_backward_finishes_db_bad_input():
    x, scale, shift, weight, mean, rstd = _args(37, 20, 0, 13, 9, torch.float32, "cpu")
    g2, b, mu2, p2, q2, s2 = _db_finish_args(37, 9, torch.float32, "cpu")
    G = torch.zeros(37, 13)
    with pytest.raises(RuntimeError, match=r"expected finish=GradFinish\(x, mean, p, q, scale\): all five"):
        _op_bwd(g2, x, scale, shift, weight, mean, rstd, G, None, None, 0, b, mu2, p2, q2)
    with pytest.raises(RuntimeError, match=r"expected finish = \[\] or \[b, mean, p, q, scale\], got 4 tensors"):
        torch.ops.densenet_fused.bnrelu_conv1x1_bwd(g2, x, weight, [scale, shift, mean, rstd], G, [], 0,
                                                    [b, mu2, p2, q2])
    with pytest.raises(RuntimeError, match=r"expected bn = \[scale, shift, mean, rstd\], got 2 tensors"):
        torch.ops.densenet_fused.bnrelu_conv1x1_bwd(g2, x, weight, [scale, shift], G)
    with pytest.raises(RuntimeError, match="db_b, db_mean, db_p, db_q and db_scale together"):
        op.bwd_chunked(g2, x, scale, shift, weight, mean, rstd, G, None, None, 0, b, mu2, p2, q2)
    for impl in (_op_bwd, op.bwd_chunked):
        with pytest.raises(RuntimeError, match=r"dout of .*dtype (Float|torch\.float32) \(the fp32 gradient g2"):
            impl(g2.double(), x, scale, shift, weight, mean, rstd, G, None, None, 0, b, mu2, p2, q2, s2)
        with pytest.raises(RuntimeError, match=r"expected db_b of shape \(37, 9\)"):
            impl(g2, x, scale, shift, weight, mean, rstd, G, None, None, 0, b[:, :8], mu2, p2, q2, s2)
        with pytest.raises(RuntimeError, match=r"expected db_b of .*dtype (Float|torch\.float32)"):
            impl(g2, x, scale, shift, weight, mean, rstd, G, None, None, 0, b.double(), mu2, p2, q2, s2)
        with pytest.raises(RuntimeError, match="db_q .*9 channels"):
            impl(g2, x, scale, shift, weight, mean, rstd, G, None, None, 0, b, mu2, p2, q2[:8], s2)
    assert torch.equal(G, torch.zeros(37, 13))  # nothing written before the errors


def test_opcheck_finishes_db(device):
    x, scale, shift, weight, mean, rstd = _args(45, 20, 0, 11, 6, torch.float32, device)
    g2, b, mu2, p2, q2, s2 = _db_finish_args(45, 6, torch.float32, device)
    G = torch.zeros(45, 11, device=device)
    P, Q = torch.zeros(11, device=device), torch.zeros(11, device=device)
    torch.library.opcheck(torch.ops.densenet_fused.bnrelu_conv1x1_bwd.default,
                          (g2, x, weight, [scale, shift, mean, rstd], G, [P, Q], 45, [b, mu2, p2, q2, s2]))
