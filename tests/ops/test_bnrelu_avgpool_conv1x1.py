"""bnrelu_avgpool_conv1x1 (the fused transition) against plain PyTorch (BatchNorm, ReLU, 1x1
convolution, AvgPool2d(2, 2)) in float64 autograd: the C++ CPU kernel (float64, float32) and the
Triton kernels (CPU tensors under TRITON_INTERPRET=1, or a GPU)."""
import pytest
import torch
import torch.nn.functional as F

from bnrelu_reference import assert_all_close, bnrelu_reference, rel_err
from densenet_fused.ops import bnrelu_avgpool_conv1x1 as op
from densenet_fused.ops import bnrelu_avgpool_conv1x1_bwd, bnrelu_avgpool_conv1x1_fwd
from opsutil import TRITON_DEVICE, cpu_kernel_cases, triton_kernel_cases

# (N, H, W, C_total, C, Cout): odd H/W (the floor drops the last row/column), C not a multiple of 8,
# strided slices of a wider buffer
SHAPES = [(2, 5, 7, 19, 13, 6), (3, 4, 4, 11, 11, 5), (1, 9, 6, 40, 33, 17), (2, 2, 3, 3, 3, 2)]


def _case(n, h, w, c_total, c, cout, dtype, device="cpu", gen=0):
    g = torch.Generator().manual_seed(gen)
    buf = torch.randn(n * h * w, c_total, dtype=torch.float64, generator=g) * 1.3 + 0.2
    x = buf.to(dtype).to(device)[:, :c]
    gamma = torch.rand(c, dtype=torch.float64, generator=g) + 0.5
    beta = torch.randn(c, dtype=torch.float64, generator=g) * 0.5
    weight = (torch.randn(cout, c, dtype=torch.float64, generator=g) / c ** 0.5).to(dtype)
    dout = torch.randn(n * (h // 2) * (w // 2), cout, dtype=torch.float64, generator=g).to(dtype)
    run_mean = torch.randn(c, dtype=torch.float64, generator=g) * 0.3
    run_var = torch.rand(c, dtype=torch.float64, generator=g) + 0.5
    return x, gamma, beta, weight.to(device), dout.to(device), run_mean, run_var


def _reference(x, nhw, gamma, beta, weight, dout, batch_stats, run_mean, run_var):
    """float64 autograd through torch's modules' functional forms; returns everything the op
    computes and the (mean, rstd, scale, shift) it is given."""
    n, h, w = nhw
    wd = weight.detach().double().cpu().requires_grad_()
    out, grads, vecs = bnrelu_reference(x, nhw, gamma, beta, batch_stats, run_mean, run_var,
                                        lambda a: F.avg_pool2d(F.conv2d(a, wd[:, :, None, None]), 2),
                                        dout.detach().double().cpu().view(n, h // 2, w // 2, -1).permute(0, 3, 1, 2))
    rows = out.permute(0, 2, 3, 1).reshape(-1, weight.shape[0])
    return dict(out=rows, dweight=wd.grad, **grads), vecs


def _run(fwd, bwd, shape, dtype, device, batch_stats, tol):
    n, h, w, c_total, c, cout = shape
    x, gamma, beta, weight, dout, rm, rv = _case(*shape, dtype, device)
    ref, (mean, rstd, scale, shift) = _reference(x, (n, h, w), gamma, beta, weight, dout, batch_stats, rm, rv)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    vec = [t.to(acc).to(device) for t in (mean, rstd, scale, shift)]
    assert x.stride(0) == c_total
    # out: columns 2..2+cout of a wider NaN-filled matrix (as the first channels of the next block's buffer)
    mo = n * (h // 2) * (w // 2)
    wide = torch.full((mo, cout + 5), float("nan"), dtype=dtype, device=device)
    out = wide[:, 2:2 + cout]
    fwd(x, vec[2], vec[3], weight, [n, h, w], out)
    assert_all_close(ref, tol, out=out)
    assert wide[:, :2].isnan().all() and wide[:, 2 + cout:].isnan().all(), "wrote outside out"
    dx, dweight, dgamma, dbeta = bwd(dout, x, vec[2], vec[3], weight, [n, h, w], vec[0], vec[1], batch_stats)
    assert dx.shape == x.shape and dx.dtype == dtype and dx.is_contiguous()
    assert dweight.dtype == acc and dgamma.dtype == acc
    assert_all_close(ref, tol, dx=dx, dweight=dweight, dgamma=dgamma, dbeta=dbeta)


@cpu_kernel_cases(SHAPES, float32_tol=1e-5)
def test_cpu_kernel_matches_reference(shape, dtype, tol, batch_stats):
    _run(bnrelu_avgpool_conv1x1_fwd, bnrelu_avgpool_conv1x1_bwd, shape, dtype, "cpu", batch_stats, tol)


@triton_kernel_cases(SHAPES + [(2, 11, 9, 24, 21, 35)])  # several row / column / Cout tiles
def test_triton_kernels_match_reference(shape, batch_stats, no_tf32):
    _run(op.triton_fwd, op.triton_bwd, shape, torch.float32, TRITON_DEVICE, batch_stats, 2e-5)


@pytest.mark.parametrize("batch_stats", [True, False])
def test_aten_path_matches_reference(batch_stats):
    """The float64 CUDA path (ATen), run on the CPU."""
    _run(op.aten_fwd, op.aten_bwd, SHAPES[0], torch.float64, "cpu", batch_stats, 1e-12)


def test_dropped_pixels_get_only_the_mean_terms():
    """With batch statistics the floored last row/column still gets -P - (x - mean)*Q (it moved the
    mean and variance); in eval its gradient is exactly 0."""
    n, h, w, c = 2, 3, 3, 4
    x, gamma, beta, weight, dout, rm, rv = _case(n, h, w, c, c, 3, torch.float64)
    ref, (mean, rstd, scale, shift) = _reference(x, (n, h, w), gamma, beta, weight, dout, True, rm, rv)
    dx = bnrelu_avgpool_conv1x1_bwd(dout, x, scale, shift, weight, [n, h, w], mean, rstd, True)[0]
    dropped = dx.view(n, h, w, c)[:, 2]
    assert dropped.abs().min() > 0
    assert rel_err(dx, ref["dx"]) < 1e-12
    dx = bnrelu_avgpool_conv1x1_bwd(dout, x, scale, shift, weight, [n, h, w], rm, rstd, False)[0].view(n, h, w, c)
    assert (dx[:, 2] == 0).all() and (dx[:, :, 2] == 0).all()


def test_public_entry_allocates_out_when_not_given():
    x, gamma, beta, weight, dout, rm, rv = _case(2, 5, 4, 9, 7, 3, torch.float32)
    s, h = torch.rand(7) + 0.5, torch.randn(7)
    out = bnrelu_avgpool_conv1x1_fwd(x, s, h, weight, [2, 5, 4])
    assert out.shape == (2 * 2 * 2, 3) and out.dtype == torch.float32 and out.is_contiguous()
    wide = torch.zeros(8, 10)
    assert bnrelu_avgpool_conv1x1_fwd(x, s, h, weight, [2, 5, 4], wide[:, 4:7]) is not None
    assert torch.equal(wide[:, 4:7], out) and (wide[:, :4] == 0).all() and (wide[:, 7:] == 0).all()


@pytest.mark.parametrize("fwd", [bnrelu_avgpool_conv1x1_fwd, op.triton_fwd])
def test_bad_input_errors_name_the_expectation(fwd):
    x, gamma, beta, weight, dout, rm, rv = _case(2, 4, 4, 6, 6, 3, torch.float32)
    s = torch.ones(6)
    out = torch.empty(8, 3)
    with pytest.raises(RuntimeError, match=r"N\*H\*W = 32"):
        fwd(x, s, s, weight, [2, 4, 3], out)
    with pytest.raises(RuntimeError, match="H >= 2 and W >= 2"):
        fwd(x[:8], s, s, weight, [8, 1, 1], out)
    with pytest.raises(RuntimeError, match="scale to be a 1-D tensor of 6 channels"):
        fwd(x, torch.ones(5), s, weight, [2, 4, 4], out)
    with pytest.raises(RuntimeError, match=r"weight of shape \(out_channels, 6\)"):
        fwd(x, s, s, weight[:, :5], [2, 4, 4], out)
    with pytest.raises(RuntimeError, match=r"out of shape \(8, 3\)"):
        fwd(x, s, s, weight, [2, 4, 4], torch.empty(8, 4))
    with pytest.raises(RuntimeError, match=r"out of dtype Float|out of shape \(8, 3\) and dtype torch.float32"):
        fwd(x, s, s, weight, [2, 4, 4], torch.empty(8, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="overlap"):
        fwd(x, s, s, weight, [2, 4, 4], torch.empty(20).as_strided((8, 3), (2, 1)))
    with pytest.raises(RuntimeError, match="dout of shape"):
        bnrelu_avgpool_conv1x1_bwd(dout[:3], x, s, s, weight, [2, 4, 4], s, s, True)


def test_opcheck():
    x, gamma, beta, weight, dout, rm, rv = _case(2, 5, 4, 9, 7, 3, torch.float32)
    s = torch.rand(7) + 0.5
    h = torch.randn(7)
    for out in (torch.empty(8, 3), torch.empty(8, 5)[:, 1:4]):
        torch.library.opcheck(torch.ops.densenet_fused.bnrelu_avgpool_conv1x1_fwd.default,
                              (x, s, h, weight, [2, 5, 4], out))
    for batch in (True, False):
        torch.library.opcheck(torch.ops.densenet_fused.bnrelu_avgpool_conv1x1_bwd.default,
                              (dout, x, s, h, weight, [2, 5, 4], torch.zeros(7), s, batch))
