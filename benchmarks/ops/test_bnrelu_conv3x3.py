"""Kernel benchmark of bnrelu_conv3x3 at DenseNet-121 block-3 shapes (CUDA) or small CPU
shapes: the Triton implicit-GEMM kernels against cuDNN on a materialized relu(bn2(B)) plus
a copy into the buffer slice (the "aten" implementation), forward and backward.

    pytest benchmarks/ops --benchmark-json=kernels.json
"""
import pytest
import torch

from densenet_fused.tools.bench import environment
from densenet_fused.ops import bnrelu_conv3x3 as op
from densenet_fused.ops.options import StatsOut

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (N, H, W, Cb, k): DenseNet-121 blocks 3 and 1, DenseNet-BC k=12
SHAPES = ([(128, 14, 14, 128, 32), (128, 56, 56, 128, 32), (64, 32, 32, 48, 12)] if CUDA
          else [(2, 14, 14, 128, 32)])
DTYPE = torch.bfloat16 if CUDA else torch.float32
IMPLS = ["aten", "triton"] if CUDA else ["aten"]


def _time_ms(fn):
    if CUDA:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    import time
    fn()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[2]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv3x3(benchmark, shape):
    n, h, w, cb, k = shape
    m = n * h * w
    b = torch.randn(m, cb, device=DEVICE).to(DTYPE)
    scale = torch.rand(cb, device=DEVICE) + 0.5
    shift = torch.randn(cb, device=DEVICE) * 0.1
    weight = (torch.randn(k, cb, 3, 3, device=DEVICE) / (3 * cb ** 0.5)).to(DTYPE)
    buf = torch.empty(m, 1024, device=DEVICE, dtype=DTYPE)
    out = buf[:, 512:512 + k]
    dy = torch.randn(m, k, device=DEVICE).to(DTYPE)
    mean, rstd = torch.zeros(cb, device=DEVICE), torch.ones(cb, device=DEVICE)
    stats = StatsOut(torch.empty(512 + k, device=DEVICE), torch.empty(512 + k, device=DEVICE))
    info = {"kernel": "bnrelu_conv3x3", "N": n, "H": h, "W": w, "Cb": cb, "k": k, "dtype": str(DTYPE)}
    for impl in IMPLS:
        info[f"{impl}_fwd_ms"] = _time_ms(lambda: op.bnrelu_conv3x3_fwd(b, scale, shift, weight, [n, h, w], out,
                                                                        impl=impl, stats=stats))
        info[f"{impl}_bwd_ms"] = _time_ms(lambda: op.bnrelu_conv3x3_bwd(dy, b, scale, shift, weight, [n, h, w], mean,
                                                                        rstd, impl=impl))
    if "triton" in IMPLS:
        info["triton_over_aten_fwd"] = info["triton_fwd_ms"] / info["aten_fwd_ms"]
        info["triton_over_aten_bwd"] = info["triton_bwd_ms"] / info["aten_bwd_ms"]
    benchmark.extra_info.update(environment(DEVICE))
    benchmark.extra_info.update(info)
    benchmark.pedantic(op.bnrelu_conv3x3_fwd, args=(b, scale, shift, weight, [n, h, w], out),
                       kwargs=dict(stats=stats), rounds=3, iterations=1)
