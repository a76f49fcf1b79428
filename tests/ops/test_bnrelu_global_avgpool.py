"""bnrelu_global_avgpool (the fused head: norm5, ReLU, global average pool) against plain PyTorch
in float64 autograd: the C++ CPU kernel (float64, float32) and the Triton kernels (CPU tensors
under TRITON_INTERPRET=1, or a GPU)."""
import pytest
import torch
import torch.nn.functional as F

from bnrelu_reference import assert_all_close, bnrelu_reference
from densenet_fused.ops import bnrelu_global_avgpool as op
from densenet_fused.ops import bnrelu_global_avgpool_bwd, bnrelu_global_avgpool_fwd
from opsutil import TRITON_DEVICE, cpu_kernel_cases, triton_kernel_cases

# (N, H, W, C_total, C): odd sizes, 1x1 images, strided slices, several pixel / channel blocks
SHAPES = [(2, 5, 7, 19, 13), (3, 1, 1, 11, 11), (1, 9, 6, 40, 33), (4, 3, 2, 21, 17)]


def _case(n, h, w, c_total, c, dtype, device="cpu", gen=0):
    g = torch.Generator().manual_seed(gen)
    x = (torch.randn(n * h * w, c_total, dtype=torch.float64, generator=g) * 1.3 + 0.2).to(dtype).to(device)[:, :c]
    gamma = torch.rand(c, dtype=torch.float64, generator=g) + 0.5
    beta = torch.randn(c, dtype=torch.float64, generator=g) * 0.5
    dp = torch.randn(n, c, dtype=torch.float64, generator=g).to(dtype).to(device)
    run_mean = torch.randn(c, dtype=torch.float64, generator=g) * 0.3
    run_var = torch.rand(c, dtype=torch.float64, generator=g) + 0.5
    return x, gamma, beta, dp, run_mean, run_var


def _reference(x, nhw, gamma, beta, dp, batch_stats, run_mean, run_var):
    pooled, grads, vecs = bnrelu_reference(x, nhw, gamma, beta, batch_stats, run_mean, run_var,
                                           lambda a: torch.flatten(F.adaptive_avg_pool2d(a, (1, 1)), 1),
                                           dp.detach().double().cpu())
    return dict(pooled=pooled, **grads), vecs


def _run(fwd, bwd, shape, dtype, device, batch_stats, tol):
    n, h, w, c_total, c = shape
    x, gamma, beta, dp, rm, rv = _case(*shape, dtype, device)
    if batch_stats and n * h * w == 1:
        pytest.skip("one value per channel: no batch statistics")
    ref, vecs = _reference(x, (n, h, w), gamma, beta, dp, batch_stats, rm, rv)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, rstd, scale, shift = [t.to(acc).to(device) for t in vecs]
    pooled = fwd(x, scale, shift, [n, h, w])
    assert pooled.shape == (n, c) and pooled.dtype == dtype
    assert_all_close(ref, tol, pooled=pooled)
    dx, dgamma, dbeta = bwd(dp, x, scale, shift, [n, h, w], mean, rstd, batch_stats)
    assert dx.shape == x.shape and dx.dtype == dtype and dx.is_contiguous() and dgamma.dtype == acc
    assert_all_close(ref, tol, dx=dx, dgamma=dgamma, dbeta=dbeta)


@cpu_kernel_cases(SHAPES, float32_tol=5e-5)
def test_cpu_kernel_matches_reference(shape, dtype, tol, batch_stats):
    _run(bnrelu_global_avgpool_fwd, bnrelu_global_avgpool_bwd, shape, dtype, "cpu", batch_stats, tol)


@triton_kernel_cases(SHAPES)
def test_triton_kernels_match_reference(shape, batch_stats):
    _run(op.triton_fwd, op.triton_bwd, shape, torch.float32, TRITON_DEVICE, batch_stats, 5e-5)


@pytest.mark.parametrize("batch_stats", [True, False])
def test_aten_path_matches_reference(batch_stats):
    """The float64 CUDA path (ATen), run on the CPU."""
    _run(op.aten_fwd, op.aten_bwd, SHAPES[0], torch.float64, "cpu", batch_stats, 1e-12)


@pytest.mark.parametrize("fwd", [bnrelu_global_avgpool_fwd, op.triton_fwd])
def test_bad_input_errors_name_the_expectation(fwd):
    x, gamma, beta, dp, rm, rv = _case(2, 3, 3, 5, 5, torch.float32)
    s = torch.ones(5)
    with pytest.raises(RuntimeError, match=r"N\*H\*W = 18"):
        fwd(x, s, s, [2, 3, 2])
    with pytest.raises(RuntimeError, match="shift to be a 1-D tensor of 5 channels"):
        fwd(x, s, torch.ones(4), [2, 3, 3])
    with pytest.raises(RuntimeError, match=r"dpooled of shape \(2, 5\)"):
        bnrelu_global_avgpool_bwd(dp[:1], x, s, s, [2, 3, 3], s, s, True)


def test_opcheck():
    x, gamma, beta, dp, rm, rv = _case(2, 3, 5, 9, 7, torch.float32)
    s = torch.rand(7) + 0.5
    h = torch.randn(7)
    torch.library.opcheck(torch.ops.densenet_fused.bnrelu_global_avgpool_fwd.default, (x, s, h, [2, 3, 5]))
    for batch in (True, False):
        torch.library.opcheck(torch.ops.densenet_fused.bnrelu_global_avgpool_bwd.default,
                              (dp, x, s, h, [2, 3, 5], torch.zeros(7), s, batch))
