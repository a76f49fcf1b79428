import pytest
import torch

import oracle
from densenet_fused.ops import bn_grad_finish


def _args(m, c_total, c_begin, c, dtype, device):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = oracle.strided_slice(m, c_total, c_begin, c, dtype, device=device)
    G = oracle.strided_slice(m, c_total + 3, c_begin + 1, c, acc, device=device)
    mean, P, Q = (torch.randn(c, dtype=acc, device=device) for _ in range(3))
    return G, x, mean, P, Q


@pytest.mark.parametrize("dtype,out_dtype,tol", [
    (torch.float64, torch.float64, 1e-13), (torch.float32, torch.float32, 1e-6),
    (torch.float32, torch.bfloat16, 8e-3), (torch.bfloat16, torch.float32, 1e-6)])
@pytest.mark.parametrize("m,c_total,c_begin,c", [(1, 1, 0, 1), (63, 20, 7, 13), (301, 41, 0, 41)])
def test_matches_oracle(device, dtype, out_dtype, tol, m, c_total, c_begin, c):
    G, x, mean, P, Q = _args(m, c_total, c_begin, c, dtype, device)
    out = bn_grad_finish(G, x, mean, P, Q, out_dtype)
    assert out.shape == (m, c) and out.dtype == out_dtype and out.is_contiguous()
    torch.testing.assert_close(out.cpu().double(), oracle.bn_grad_finish(G, x, mean, P, Q).cpu(), rtol=tol, atol=tol)


def test_g_scale_is_one_batchnorm_backward(device):
    # with G = g (after the ReLU mask) and G_scale = gamma*rstd it is BatchNorm's input gradient
    m, c = 77, 9
    x = torch.randn(m, c, dtype=torch.float64, device=device) * 2 + 1
    gamma = torch.rand(c, dtype=torch.float64, device=device) + 0.5
    xr = x.clone().requires_grad_()
    g = torch.randn(m, c, dtype=torch.float64, device=device)
    y = torch.nn.functional.batch_norm(xr.t()[None], None, None, gamma, None, training=True, eps=1e-5)
    y.backward(g.t()[None])
    mean, var = x.mean(0), x.var(0, unbiased=False)
    rstd = (var + 1e-5).rsqrt()
    xhat = (x - mean) * rstd
    scale = gamma * rstd
    P, Q = scale * g.sum(0) / m, scale * rstd * (g * xhat).sum(0) / m
    dx = bn_grad_finish(g, x, mean, P, Q, torch.float64, 0, scale)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-10, atol=1e-12)
    G, xs, mean2, P2, Q2 = _args(40, 15, 2, 11, torch.float32, device)
    S = torch.rand(11, device=device)
    torch.testing.assert_close(bn_grad_finish(G, xs, mean2, P2, Q2, torch.float32, 0, S).double().cpu(),
                               oracle.bn_grad_finish(G, xs, mean2, P2, Q2, S).cpu(), rtol=1e-6, atol=1e-6)
    torch.library.opcheck(torch.ops.densenet_fused.bn_grad_finish.default, (G, xs, mean2, P2, Q2, torch.float32, 0, S))
    with pytest.raises(RuntimeError, match="expected G_scale to be a 1-D tensor of 11 channels"):
        bn_grad_finish(G, xs, mean2, P2, Q2, torch.float32, 0, S[:3])


def test_nchw_output(device):
    n, h, w, c = 3, 5, 7, 11
    G, x, mean, P, Q = _args(n * h * w, 19, 4, c, torch.float32, device)
    out = bn_grad_finish(G, x, mean, P, Q, torch.float32, h * w)
    assert out.shape == (n, c, h * w)
    ref = oracle.bn_grad_finish(G, x, mean, P, Q).reshape(n, h * w, c).permute(0, 2, 1)
    torch.testing.assert_close(out.cpu().double(), ref.cpu(), rtol=1e-6, atol=1e-6)


def test_opcheck(device):
    args = _args(35, 20, 2, 9, torch.float32, device)
    torch.library.opcheck(torch.ops.densenet_fused.bn_grad_finish.default, (*args, torch.float32, 0))
    torch.library.opcheck(torch.ops.densenet_fused.bn_grad_finish.default, (*args, torch.float64, 7))


def test_bad_input():
    G, x, mean, P, Q = _args(12, 10, 0, 10, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="expected G of shape"):
        bn_grad_finish(G[:, :5], x, mean, P, Q, torch.float32)
    with pytest.raises(RuntimeError, match="expected P to be a 1-D tensor of 10 channels"):
        bn_grad_finish(G, x, mean, P[:4], Q, torch.float32)
    with pytest.raises(RuntimeError, match="expected G of dtype Float"):
        bn_grad_finish(G.double(), x, mean, P, Q, torch.float32)
    with pytest.raises(RuntimeError, match="divisor of the 12 rows"):
        bn_grad_finish(G, x, mean, P, Q, torch.float32, 5)
