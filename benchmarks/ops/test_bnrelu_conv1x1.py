"""Kernel benchmark of bnrelu_conv1x1 at DenseNet-121 block-3 shapes (CUDA) or small CPU shapes.

Forward (BN-ReLU prologue + statistics epilogue) against cuBLAS doing the bare strided GEMM
``X[:, :C_l] @ W1^T`` and against the unfused torch chain (batch_norm(train) -> relu ->
conv1x1); backward (one pass) against autograd of the unfused chain.  Rows carry time,
achieved bandwidth = bytes that must move / time, and the measured copy bandwidth.

    pytest benchmarks/ops --benchmark-json=kernels.json
"""
import pytest
import torch
import torch.nn.functional as F

from densenet_fused.tools.bench import environment
from densenet_fused.ops import bnrelu_conv1x1_bwd, bnrelu_conv1x1_fwd

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    M, C_TOTAL, COUT, DTYPE = 128 * 14 * 14, 1024, 128, torch.bfloat16
    C_LS = [256, 512, 768, 992]
else:
    M, C_TOTAL, COUT, DTYPE = 2 * 14 * 14, 1024, 128, torch.float32
    C_LS = [256, 992]


def _time_ms(fn, reps=50 if CUDA else 5):
    if CUDA:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")
    import time
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def _copy_bandwidth():
    a = torch.empty(256 * 2 ** 20 if CUDA else 16 * 2 ** 20, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    return 2 * a.numel() / (_time_ms(lambda: b.copy_(a)) * 1e-3)


def _setup(c_l):
    buf = torch.randn(M, C_TOTAL, device=DEVICE).to(DTYPE)
    x = buf[:, :c_l]
    scale = torch.rand(c_l, device=DEVICE) + 0.5
    shift = torch.randn(c_l, device=DEVICE) * 0.1
    w = (torch.randn(COUT, c_l, device=DEVICE) / c_l ** 0.5).to(DTYPE)
    return x, scale, shift, w


def _unfused_chain(x, w, c_l):
    """batch_norm(train) -> relu -> conv1x1 as separate torch ops on an NCHW channels-last view."""
    n = M // 196 if M % 196 == 0 else 1
    hw = M // n
    x4 = x.reshape(n, hw, 1, c_l).permute(0, 3, 1, 2)  # channels-last NCHW view of the NHWC rows
    gamma = torch.ones(c_l, device=DEVICE, requires_grad=True)
    beta = torch.zeros(c_l, device=DEVICE, requires_grad=True)
    w4 = w.view(COUT, c_l, 1, 1).detach().requires_grad_()
    xin = x4.detach().requires_grad_()

    def fwd():
        return F.conv2d(F.relu(F.batch_norm(xin, None, None, gamma, beta, training=True)), w4)

    return fwd, (xin, gamma, beta, w4)


@pytest.mark.parametrize("c_l", C_LS)
def test_forward(benchmark, c_l):
    x, scale, shift, w = _setup(c_l)
    elt = x.element_size()
    moved = M * c_l * elt + M * COUT * elt + COUT * c_l * elt
    fused = _time_ms(lambda: bnrelu_conv1x1_fwd(x, scale, shift, w, True))
    gemm = _time_ms(lambda: torch.mm(x, w.t()))
    chain, _ = _unfused_chain(x, w, c_l)
    with torch.no_grad():
        unfused = _time_ms(chain)
    copy_bw = _copy_bandwidth()
    benchmark.extra_info.update(environment(DEVICE))
    benchmark.extra_info.update({
        "kernel": "bnrelu_conv1x1_fwd", "M": M, "C_l": c_l, "C_total": C_TOTAL, "Cout": COUT, "dtype": str(DTYPE),
        "fused_ms": fused, "bare_gemm_ms": gemm, "unfused_torch_ms": unfused,
        "fused_GBps": moved / fused * 1e-6, "copy_GBps": copy_bw * 1e-9,
        "fused_over_gemm": fused / gemm, "unfused_over_fused": unfused / fused})
    benchmark.pedantic(bnrelu_conv1x1_fwd, args=(x, scale, shift, w, True), rounds=5, iterations=1)


@pytest.mark.parametrize("c_l", C_LS)
def test_backward(benchmark, c_l):
    x, scale, shift, w = _setup(c_l)
    mean = torch.zeros(c_l, device=DEVICE)
    rstd = torch.ones(c_l, device=DEVICE)
    dout = torch.randn(M, COUT, device=DEVICE).to(DTYPE)
    G = torch.zeros(M, c_l, device=DEVICE)
    elt = x.element_size()
    moved = M * c_l * elt + M * COUT * elt + 2 * M * c_l * 4  # x, dout, G read+write (fp32)
    fused = _time_ms(lambda: bnrelu_conv1x1_bwd(dout, x, scale, shift, w, mean, rstd, G))
    chain, leaves = _unfused_chain(x, w, c_l)
    y = chain()
    g4 = dout.view(y.shape[0], y.shape[2], y.shape[3], COUT).permute(0, 3, 1, 2)
    unfused = _time_ms(lambda: torch.autograd.grad(y, leaves, g4, retain_graph=True))
    benchmark.extra_info.update(environment(DEVICE))
    benchmark.extra_info.update({
        "kernel": "bnrelu_conv1x1_bwd", "M": M, "C_l": c_l, "C_total": C_TOTAL, "Cout": COUT, "dtype": str(DTYPE),
        "fused_ms": fused, "unfused_torch_backward_ms": unfused, "fused_GBps": moved / fused * 1e-6,
        "unfused_over_fused": unfused / fused})
    benchmark.pedantic(bnrelu_conv1x1_bwd, args=(dout, x, scale, shift, w, mean, rstd, G), rounds=5, iterations=1)
