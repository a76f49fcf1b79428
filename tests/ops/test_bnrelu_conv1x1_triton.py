"""The Triton kernels of bnrelu_conv1x1, on CPU tensors under TRITON_INTERPRET=1 (CI) or on
CUDA tensors where a GPU is present; float64 oracle."""
import os

import pytest
import torch

import oracle
from densenet_fused.ops import bnrelu_conv1x1 as op
from densenet_fused.ops._triton_common import cuda_gemm_impl
from flags import patched
from opsutil import assert_deterministic, conv1x1_backward_into_zeros

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

# (M, C_total, C, COUT): odd sizes, several row tiles / K blocks / N blocks, strided slices
# (m, c_total, c, cout). Row tiles (32 rows under the interpreter) against backward splits (at
# most 4 there): 130 -> 5 tiles / 4 splits, 200 -> 7 / 4, 290 -> 10 / 4: tile counts that are not
# a multiple of the splits, and last tiles partly filled (the statistics epilogue's edge).
SHAPES = [(1, 5, 5, 3), (37, 20, 13, 9), (100, 41, 29, 20), (130, 64, 50, 48), (200, 33, 31, 24),
          (290, 24, 17, 12)]


def _args(m, c_total, c, cout, dtype, gen_offset=0.3):
    x = oracle.strided_slice(m, c_total, 0, c, dtype, offset=gen_offset, device=DEVICE)
    scale = (torch.rand(c) + 0.5).to(DEVICE)
    shift = (torch.randn(c) * 0.5).to(DEVICE)
    weight = (torch.randn(cout, c, dtype=torch.float64) / c ** 0.5).to(dtype).to(DEVICE)
    mean = (torch.randn(c) * 0.1).to(DEVICE)
    rstd = (torch.rand(c) + 0.5).to(DEVICE)
    return x, scale, shift, weight, mean, rstd


def _err(got, want):
    return (got.double().cpu() - want.cpu()).abs().max().item() / max(want.abs().max().item(), 1e-30)


def _tol(dtype):
    # float32: full fp32 products (ieee); 16-bit: inputs rounded, fp32 accumulation
    return {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


# The interpreter stores bfloat16 as uint16 and its tl.dot multiplies the bit patterns
# (triton-lang/triton#11584): bfloat16 is checked on the GPU only.
DTYPES = [torch.float32, torch.float16] if INTERPRET else [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _no_tf32(no_tf32):
    pass


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,c_total,c,cout", SHAPES)
def test_forward_and_stats(dtype, m, c_total, c, cout):
    x, scale, shift, weight, _, _ = _args(m, c_total, c, cout, dtype)
    assert x.stride(0) == c_total
    out, mean, var = op.triton_fwd(x, scale, shift, weight, True)
    ref = oracle.bnrelu_conv1x1_fwd(x, scale, shift, weight)
    assert out.dtype == dtype and out.shape == (m, cout)
    assert _err(out, ref) <= _tol(dtype)
    stored = out.double().cpu()  # statistics are of the values as stored
    assert _err(mean, stored.mean(0)) <= 1e-5
    assert _err(var, stored.var(0, unbiased=False)) <= 1e-5
    out2, m2, _ = op.triton_fwd(x, scale, shift, weight, False)
    assert torch.equal(out, out2) and m2.numel() == 0
    gamma, beta = torch.rand(cout, device=x.device) + 0.5, torch.randn(cout, device=x.device)
    bn_out = torch.empty(3, cout, device=x.device)
    out3, mean3, var3 = op.triton_fwd(x, scale, shift, weight, True, bn_out, gamma, beta, 1e-3)
    assert torch.equal(out3, out) and torch.equal(mean3, mean) and torch.equal(var3, var)
    want = torch.stack(op.bn_scale_shift(gamma.cpu(), beta.cpu(), mean.cpu(), var.cpu(), 1e-3))
    torch.testing.assert_close(bn_out.cpu(), want, rtol=2e-7, atol=0)  # IEEE sqrt and division


def test_stats_large_mean_small_spread():
    # output channels with |mean| >> std: the per-tile (mean, M2) merge keeps the variance
    m, c, cout = 257, 6, 5
    x = (torch.rand(m, c, dtype=torch.float64) * 1e-2 + 1.0).float().to(DEVICE)
    scale, shift = torch.ones(c, device=DEVICE), torch.zeros(c, device=DEVICE)
    weight = torch.full((cout, c), 100.0, device=DEVICE)
    out, mean, var = op.triton_fwd(x, scale, shift, weight, True)
    stored = out.double().cpu()
    torch.testing.assert_close(var.double().cpu(), stored.var(0, unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,c_total,c,cout", SHAPES)
def test_backward(dtype, m, c_total, c, cout):
    x, scale, shift, weight, mean, rstd = _args(m, c_total, c, cout, dtype)
    dout = torch.randn(m, cout, dtype=torch.float64).to(dtype).to(DEVICE)
    gbuf = torch.randn(m, c_total, device=DEVICE)
    G = gbuf[:, :c]
    G0 = G.clone()
    untouched = gbuf[:, c:].clone()
    dweight, dgamma, dbeta = op.triton_bwd(dout, x, scale, shift, weight, mean, rstd, G)
    dG, dw_ref, dgamma_ref, dbeta_ref = oracle.bnrelu_conv1x1_bwd(dout, x, scale, shift, weight, mean, rstd)
    tol = _tol(dtype)
    assert _err(G - G0, dG) <= tol
    assert _err(dweight, dw_ref) <= tol
    assert _err(dgamma, dgamma_ref) <= tol
    assert _err(dbeta, dbeta_ref) <= tol
    assert torch.equal(gbuf[:, c:], untouched)  # only the slice is written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,c_total,c,cout", SHAPES)
def test_backward_finishes_db(dtype, m, c_total, c, cout):
    # dout = g2 (fp32) and BN2's terms: dB = scale2*g2 - p2 - (b - mean2)*q2 formed in the kernel
    x, scale, shift, weight, mean, rstd = _args(m, c_total, c, cout, dtype)
    g2 = torch.randn(m, cout, device=DEVICE)
    b = oracle.strided_slice(m, cout + 3, 1, cout, dtype, offset=0.2, device=DEVICE)
    mu2, p2, q2 = [(torch.randn(cout) * s).to(DEVICE) for s in (0.3, 0.1, 0.2)]
    s2 = (torch.rand(cout) + 0.5).to(DEVICE)
    G = torch.zeros(m, c, device=DEVICE)
    P, Q = torch.zeros(c, device=DEVICE), torch.zeros(c, device=DEVICE)
    dweight, dgamma, dbeta = op.triton_bwd(g2, x, scale, shift, weight, mean, rstd, G, P, Q, m, b, mu2, p2, q2, s2)
    d = [t.double().cpu() for t in (g2, b, mu2, p2, q2, s2)]
    db = (d[0] * d[5] - d[3] - (d[1] - d[2]) * d[4]).to(dtype)
    dG, dw_ref, dgamma_ref, dbeta_ref = oracle.bnrelu_conv1x1_bwd(db, x.cpu(), scale.cpu(), shift.cpu(),
                                                                   weight.cpu(), mean.cpu(), rstd.cpu())
    tol = _tol(dtype)
    assert _err(G, dG) <= tol
    assert _err(dweight, dw_ref) <= tol
    assert _err(dgamma, dgamma_ref) <= tol
    assert _err(dbeta, dbeta_ref) <= tol
    assert _err(P, scale.double().cpu() * dbeta_ref / m) <= tol
    assert _err(Q, scale.double().cpu() * rstd.double().cpu() * dgamma_ref / m) <= tol
    # against the unfused pair (bn_grad_finish, then the op on its dB)
    from densenet_fused.ops.bn_grad_finish import bn_grad_finish
    G2 = torch.zeros(m, c, device=DEVICE)
    want = op.triton_bwd(bn_grad_finish(g2, b, mu2, p2, q2, dtype, 0, s2), x, scale, shift, weight, mean, rstd, G2)
    assert _err(G, G2.double().cpu()) <= tol
    for got, ref in zip((dweight, dgamma, dbeta), want):
        assert _err(got, ref.double().cpu()) <= tol


def test_backward_finish_accumulates_p_and_q():
    x, scale, shift, weight, mean, rstd = _args(100, 41, 29, 20, torch.float32)
    dout = torch.randn(100, 20, device=DEVICE)
    P0, Q0 = torch.randn(29, device=DEVICE), torch.randn(29, device=DEVICE)
    P, Q = P0.clone(), Q0.clone()
    _, dgamma, dbeta = op.triton_bwd(dout, x, scale, shift, weight, mean, rstd, torch.zeros(100, 29, device=DEVICE),
                                     P, Q, 100)
    _, _, dgamma_ref, dbeta_ref = oracle.bnrelu_conv1x1_bwd(dout, x, scale, shift, weight, mean, rstd)
    assert _err(P - P0, scale.double().cpu() * dbeta_ref.cpu() / 100) <= 2e-5
    assert _err(Q - Q0, scale.double().cpu() * rstd.double().cpu() * dgamma_ref.cpu() / 100) <= 2e-5


def test_backward_deterministic():
    x, scale, shift, weight, mean, rstd = _args(100, 30, 30, 20, torch.float32)
    dout = torch.randn(100, 20, device=DEVICE)
    assert_deterministic(lambda: conv1x1_backward_into_zeros(op.triton_bwd, dout, x, scale, shift, weight, mean, rstd))


def test_cuda_registration_routes_by_dtype_and_tf32():
    # the functions registered for the CUDA dispatch key: Triton for 16-bit and float32 with TF32;
    # ATen (cuBLAS) for float64 and float32 without TF32 (the autouse fixture turns TF32 off)
    calls = []

    def spy(name, fn):
        return lambda *a, **k: calls.append(name) or fn(*a, **k)

    x, scale, shift, weight, _, _ = _args(37, 20, 13, 9, torch.float32)
    x16, w16 = x.half(), weight.half()
    want16 = op.triton_fwd(x16, scale, shift, w16, False)[0]
    with patched(op, triton_fwd=spy("triton", op.triton_fwd), fwd_chunked=spy("aten", op.fwd_chunked)):
        out, _, _ = op.cuda_fwd(x, scale, shift, weight, False)
        assert calls == ["aten"]
        assert _err(out, oracle.bnrelu_conv1x1_fwd(x, scale, shift, weight)) <= 2e-6
        out16, _, _ = op.cuda_fwd(x16, scale, shift, w16, False)
        assert calls == ["aten", "triton"]
        assert torch.equal(out16, want16)
        with patched(torch.backends.cuda.matmul, allow_tf32=True):
            op.cuda_fwd(x, scale, shift, weight, False)
        assert calls[2] == "triton"
        x64, s64, h64 = x.double(), scale.double(), shift.double()
        out64, _, _ = op.cuda_fwd(x64, s64, h64, weight.double(), False)
        assert calls[3] == "aten"
    assert _err(out64, oracle.bnrelu_conv1x1_fwd(x64, s64, h64, weight.double())) <= 1e-12
    G = torch.zeros(37, 13, device=DEVICE)
    dout = torch.randn(37, 9, device=DEVICE)
    _, _, _, _, mean, rstd = _args(37, 20, 13, 9, torch.float32)
    with patched(op, triton_bwd=spy("triton", op.triton_bwd), bwd_chunked=spy("aten", op.bwd_chunked)):
        op.cuda_bwd(dout, x, scale, shift, weight, mean, rstd, G)
        op.cuda_bwd(dout.half(), x16, scale, shift, w16, mean, rstd, G)
    assert calls[4:] == ["aten", "triton"]
    # with dB finished from g2: the same routes, the same results as the unfused pair
    g2, b = torch.randn(37, 9, device=DEVICE), torch.randn(37, 9, device=DEVICE)
    mu2, p2, q2, s2 = (torch.randn(9, device=DEVICE) for _ in range(4))
    with patched(op, triton_bwd=spy("triton", op.triton_bwd), bwd_chunked=spy("aten", op.bwd_chunked)):
        got = op.cuda_bwd(g2, x, scale, shift, weight, mean, rstd, torch.zeros(37, 13, device=DEVICE), None, None, 0,
                           b, mu2, p2, q2, s2)
        op.cuda_bwd(g2, x16, scale, shift, w16, mean, rstd, torch.zeros(37, 13, device=DEVICE), None, None, 0,
                     b.half(), mu2, p2, q2, s2)
    assert calls[6:] == ["aten", "triton"]
    db = g2 * s2 - p2 - (b - mu2) * q2
    want = op.bwd_chunked(db, x, scale, shift, weight, mean, rstd, torch.zeros(37, 13, device=DEVICE))
    for a, w in zip(got, want):
        assert torch.equal(a, w)


def test_cuda_gemm_impl():
    """The choice is a pure function of the dtype and the TF32 flag (no GPU needed to observe it)."""
    with patched(torch.backends.cuda.matmul, allow_tf32=False):
        assert [cuda_gemm_impl(d) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)] == \
            ["aten", "aten", "triton", "triton"]
    with patched(torch.backends.cuda.matmul, allow_tf32=True):
        assert [cuda_gemm_impl(d) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)] == \
            ["aten", "triton", "triton", "triton"]


def test_bad_input():
    x, scale, shift, weight, mean, rstd = _args(10, 8, 8, 4, torch.float32)
    with pytest.raises(RuntimeError, match=r"weight of shape \(out_channels, 8\)"):
        op.triton_fwd(x, scale, shift, weight[:, :5], False)
    with pytest.raises(RuntimeError, match=r"G of shape \(10, 8\)"):
        op.triton_bwd(torch.zeros(10, 4, device=DEVICE), x, scale, shift, weight, mean, rstd,
                      torch.zeros(10, 7, device=DEVICE))
