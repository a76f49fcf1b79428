"""NaN and Inf through every BatchNorm-ReLU op: the positions of NaN, +Inf and -Inf in each op's
outputs and gradients are those of torch's own chain (batch_norm -> relu -> conv / pool, float64
autograd through torch's functional forms: ``bnrelu_reference``), for the CPU kernels, the Triton
kernels (interpreted on CPU tensors without a GPU) and the ATen paths.

torch's ReLU keeps a NaN (relu(NaN) = NaN) and its backward passes the gradient where the result is
not <= 0, so also where it is NaN.  Non-finite values go into x (NaN, +Inf, -Inf, and +Inf on a
channel with negative gamma, i.e. -Inf after the BatchNorm) or NaN into the upstream gradient at
interior pixels (Inf in a gradient is left out: Inf * 0 from a convolution's zero padding is NaN in
some of torch's own convolution backends and skipped in others).  With batch statistics a
non-finite value makes its whole channel NaN, in torch as in the fused ops."""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import oracle
from blockutil import assert_same_nonfinite, nonfinite_mismatch
from bnrelu_reference import bnrelu_reference
from densenet_fused.ops import bnrelu_avgpool_conv1x1 as avgpool_op
from densenet_fused.ops import bnrelu_conv1x1 as conv1x1_op
from densenet_fused.ops import bnrelu_conv3x3 as conv3x3_op
from densenet_fused.ops import bnrelu_global_avgpool as head_op
from densenet_fused.ops import bnrelu_maxpool as maxpool_op
from densenet_fused.ops.options import Accumulate
from flags import patched
from opsutil import INTERPRET, TRITON_DEVICE

NAN, INF = float("nan"), float("inf")
N, H, W, C, COUT = 2, 6, 6, 5, 4
NEG = 3  # the channel with negative gamma


def _inputs(scenario, gen_shape):
    """x (N*H*W, C) rows, gamma, beta, running statistics, and the upstream gradient (NCHW of
    ``gen_shape``), with the scenario's non-finite entries."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N * H * W, C, dtype=torch.float64, generator=g) * 1.2 + 0.2
    gamma = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
    gamma[NEG] = -gamma[NEG]
    beta = torch.randn(C, dtype=torch.float64, generator=g) * 0.5
    run_mean = torch.randn(C, dtype=torch.float64, generator=g) * 0.3
    run_var = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
    grad = torch.randn(gen_shape, dtype=torch.float64, generator=g)
    if scenario == "x":
        pix = lambda n, h, w: (n * H + h) * W + w  # noqa: E731
        x[pix(0, 2, 3), 0] = NAN
        x[pix(1, 4, 1), 1] = INF
        x[pix(0, 0, 5), 2] = -INF
        x[pix(1, 3, 3), NEG] = INF  # -Inf after the BatchNorm: ReLU gives 0, the gradient is cut
        x[pix(0, 5, 0), 4] = -INF
    else:  # NaN in the gradient at interior positions
        for pos in ((0, 1, 1, 1), (1, -1, 2, 1)):
            grad[pos[:grad.dim()]] = NAN
    return x, gamma, beta, run_mean, run_var, grad


def _rows(t):
    """NCHW -> (N*H*W, C) rows."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _nchw(rows, n, h, w):
    return rows.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def _vectors(vecs, device):
    return [t.float().to(device) for t in vecs]  # mean, rstd, scale, shift in float32


# ----------------------------------------------------------------------------- one runner per op
# Each runner takes (impl, x, vectors, weight, grad rows, batch_stats, device) and returns the op's
# results in torch's terms: out, dx, dgamma, dbeta (and dweight).

def _conv1x1(impl, x, vec, weight, dout, batch_stats):
    fwd, bwd = {"cpu": (conv1x1_op.bnrelu_conv1x1_fwd, conv1x1_op.bnrelu_conv1x1_bwd),
                "triton": (conv1x1_op.triton_fwd, conv1x1_op.triton_bwd),
                "aten": (conv1x1_op.fwd_chunked, conv1x1_op.bwd_chunked)}[impl]
    mean, rstd, scale, shift = vec
    out, omean, ovar = fwd(x, scale, shift, weight, True)
    m, c = x.shape
    G = torch.zeros(m, c, device=x.device)
    if batch_stats:
        P, Q = torch.zeros(c, device=x.device), torch.zeros(c, device=x.device)
        if impl == "cpu":  # the registered op: its named option
            dweight, dgamma, dbeta = bwd(dout, x, scale, shift, weight, mean, rstd, G, accumulate=Accumulate(P, Q, m))
        else:
            dweight, dgamma, dbeta = bwd(dout, x, scale, shift, weight, mean, rstd, G, P, Q, m)
        dx = oracle.bn_grad_finish(G, x, mean, P, Q)
    else:
        dweight, dgamma, dbeta = bwd(dout, x, scale, shift, weight, mean, rstd, G)
        dx = G
    return dict(out=out, out_mean=omean, out_var=ovar, dx=dx, dgamma=dgamma, dbeta=dbeta, dweight=dweight)


def _conv3x3(impl, x, vec, weight, dout, batch_stats):
    fwd, bwd = {"cpu": (conv3x3_op._fwd_aten, conv3x3_op._bwd_aten),
                "triton": (conv3x3_op._fwd_triton, conv3x3_op._bwd_triton)}[impl]
    mean, rstd, scale, shift = vec
    m = x.shape[0]
    out = torch.empty(m, weight.shape[0], device=x.device)
    omean, ovar = fwd(x, scale, shift, weight, [N, H, W], out, True)
    g2, dweight, dgamma, dbeta, p, q = bwd(dout, x, scale, shift, weight, [N, H, W], mean, rstd,
                                           m if batch_stats else 0)
    dx = scale.double() * g2.double()
    if batch_stats:
        dx = dx - p.double() - (x.double() - mean.double()) * q.double()
    return dict(out=out, out_mean=omean, out_var=ovar, dx=dx, dgamma=dgamma, dbeta=dbeta, dweight=dweight)


def _avgpool_conv1x1(impl, x, vec, weight, dout, batch_stats, nhw=(N, H, W)):
    fwd, bwd = {"cpu": (avgpool_op.bnrelu_avgpool_conv1x1_fwd, avgpool_op.bnrelu_avgpool_conv1x1_bwd),
                "triton": (avgpool_op.triton_fwd, avgpool_op.triton_bwd),
                "aten": (avgpool_op.aten_fwd, avgpool_op.aten_bwd)}[impl]
    mean, rstd, scale, shift = vec
    out = torch.empty(dout.shape, device=x.device)
    fwd(x, scale, shift, weight, list(nhw), out)
    dx, dweight, dgamma, dbeta = bwd(dout, x, scale, shift, weight, list(nhw), mean, rstd, batch_stats)
    return dict(out=out, dx=dx, dgamma=dgamma, dbeta=dbeta, dweight=dweight)


def _global_avgpool(impl, x, vec, weight, dout, batch_stats):
    fwd, bwd = {"cpu": (head_op.bnrelu_global_avgpool_fwd, head_op.bnrelu_global_avgpool_bwd),
                "triton": (head_op.triton_fwd, head_op.triton_bwd),
                "aten": (head_op.aten_fwd, head_op.aten_bwd)}[impl]
    mean, rstd, scale, shift = vec
    out = fwd(x, scale, shift, [N, H, W])
    dx, dgamma, dbeta = bwd(dout, x, scale, shift, [N, H, W], mean, rstd, batch_stats)
    return dict(out=out, dx=dx, dgamma=dgamma, dbeta=dbeta)


def _maxpool(impl, x, vec, weight, dout, batch_stats):
    fwd, bwd = {"cpu": (maxpool_op.bnrelu_maxpool_fwd, maxpool_op.bnrelu_maxpool_bwd),
                "triton": (maxpool_op.triton_fwd, maxpool_op.triton_bwd)}[impl]
    mean, rstd, scale, shift = vec
    out, index = fwd(x, scale, shift, [N, H, W])
    dx, dgamma, dbeta = bwd(dout, index, x, scale, shift, mean, rstd, [N, H, W], x.shape[0] if batch_stats else 0)
    return dict(out=out, dx=dx, dgamma=dgamma, dbeta=dbeta)


HP = maxpool_op.pooled_size(H)
# op name: (runner, weight shape or None, after(a, weight) in NCHW, upstream gradient shape NCHW,
#           output NCHW -> the op's output layout, implementations)
OPS = {
    "bnrelu_conv1x1": (_conv1x1, (COUT, C), lambda a, w: F.conv2d(a, w[:, :, None, None]), (N, COUT, H, W),
                       _rows, ("cpu", "triton", "aten")),
    "bnrelu_conv3x3": (_conv3x3, (COUT, C, 3, 3), lambda a, w: F.conv2d(a, w, padding=1), (N, COUT, H, W),
                       _rows, ("cpu", "triton")),
    "bnrelu_avgpool_conv1x1": (_avgpool_conv1x1, (COUT, C),
                               lambda a, w: F.avg_pool2d(F.conv2d(a, w[:, :, None, None]), 2),
                               (N, COUT, H // 2, W // 2), _rows, ("cpu", "triton", "aten")),
    "bnrelu_global_avgpool": (_global_avgpool, None, lambda a, w: F.adaptive_avg_pool2d(a, 1).flatten(1), (N, C),
                              lambda t: t, ("cpu", "triton", "aten")),
    "bnrelu_maxpool": (_maxpool, None, lambda a, w: F.max_pool2d(a, 3, 2, 1), (N, C, HP, HP), _rows,
                       ("cpu", "triton")),
}
CASES = [(name, impl) for name, spec in OPS.items() for impl in spec[5]]


def _reference_and_op(name, impl, scenario, batch_stats, run=None):
    """(torch's results, the op's results) on the scenario's inputs."""
    runner, wshape, after, gshape, layout, _ = OPS[name]
    if impl == "triton" and TRITON_DEVICE is None:
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA device")
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    x, gamma, beta, rm, rv, grad = _inputs(scenario, gshape)
    wd = None
    if wshape is not None:
        wd = (torch.randn(wshape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
              / C ** 0.5).requires_grad_()
    out, grads, vecs = bnrelu_reference(x, (N, H, W), gamma, beta, batch_stats, rm, rv, lambda a: after(a, wd), grad)
    want = dict(out=layout(out), **grads)
    if wd is not None:
        want["dweight"] = wd.grad
    if name in ("bnrelu_conv1x1", "bnrelu_conv3x3"):
        want["out_mean"] = want["out"].mean(0)
        want["out_var"] = want["out"].var(0, unbiased=False)
    weight = None if wd is None else wd.detach().float().to(device)
    got = (run or runner)(impl, x.float().to(device), _vectors(vecs, device), weight,
                          layout(grad).float().to(device).contiguous(), batch_stats)
    return want, got


@pytest.mark.parametrize("batch_stats", [False, True], ids=["running_stats", "batch_stats"])
@pytest.mark.parametrize("scenario", ["x", "grad"], ids=["nonfinite_x", "nan_grad"])
@pytest.mark.parametrize("name,impl", CASES)
def test_nonfinite_positions_match_torch(name, impl, scenario, batch_stats):
    want, got = _reference_and_op(name, impl, scenario, batch_stats)
    assert any(not torch.isfinite(t).all() for t in want.values())  # the case has non-finite values
    assert_same_nonfinite(got, want)


def test_running_stats_case_is_local():
    """With running statistics a NaN stays local (a block of torch's outputs, not everything), so the
    position comparison above is a strong one: it pins single rows and columns."""
    want, _ = _reference_and_op("bnrelu_conv1x1", "cpu", "x", False, run=lambda *a: {})
    nan_rows = torch.isnan(want["out"]).any(1)
    assert 0 < int(nan_rows.sum()) < want["out"].shape[0] // 4
    assert torch.isnan(want["dweight"][:, 0]).all() and torch.isfinite(want["dweight"][:, 2]).all()


# ----------------------------------------------------------------------------- mutations caught
def _old_relu_reference(after):
    """torch's chain with the ReLU written the old way: relu(y) = y > 0 ? y : 0 (NaN -> 0), and the
    backward mask y > 0 (a NaN's gradient cut)."""
    class OldRelu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            ctx.save_for_backward(y)
            return torch.where(y > 0, y, 0)

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return torch.where(y > 0, g, 0)

    return lambda a: after(OldRelu.apply(a))


@pytest.mark.parametrize("name", list(OPS))
def test_old_relu_formula_is_caught(name):
    """The comparison fails for a ReLU written the old way: the reference chain with the old ReLU in
    place of F.relu (via ``after``, which receives relu(y) = F.relu: the old ReLU applied after it
    maps the NaN to 0 again) gives another non-finite pattern on the same input."""
    runner, wshape, after, gshape, layout, _ = OPS[name]
    x, gamma, beta, rm, rv, grad = _inputs("x", gshape)
    wd = None if wshape is None else torch.randn(wshape, dtype=torch.float64)
    good = bnrelu_reference(x, (N, H, W), gamma, beta, False, rm, rv, lambda a: after(a, wd), grad)[0]
    old = bnrelu_reference(x, (N, H, W), gamma, beta, False, rm, rv, _old_relu_reference(lambda a: after(a, wd)),
                           grad)[0]
    assert nonfinite_mismatch(layout(old), layout(good)) is not None


@triton.jit
def _old_bnrelu_tile(PTR, rows64, ld, cols, mask, SCALE, SHIFT, cols_ok):
    """bnrelu_tile as it was: ``tl.maximum(y, 0.0)`` drops a NaN."""
    x = tl.load(PTR + rows64[:, None] * ld + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SCALE + cols, mask=cols_ok, other=0.0)
    h = tl.load(SHIFT + cols, mask=cols_ok, other=0.0)
    return tl.where(mask, tl.maximum(x * s[None, :] + h[None, :], 0.0), 0.0)


def _triton_version():
    return tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2])


@pytest.mark.skipif(not INTERPRET, reason="swaps an interpreted Triton function (TRITON_INTERPRET=1)")
@pytest.mark.skipif(_triton_version() < (3, 7), reason="under triton <= 3.6's interpreter the patched prologue "
                    "does not take effect (the kernel still runs the package's tile); checked with triton >= 3.7")
def test_triton_old_relu_tile_is_caught():
    """The Triton 1x1 kernels with the old prologue in place of ``bnrelu_tile``: the position test
    fails; with the package's tile it passes."""
    want, got = _reference_and_op("bnrelu_conv1x1", "triton", "x", False)
    assert_same_nonfinite(got, want)
    with patched(conv1x1_op, bnrelu_tile=_old_bnrelu_tile):
        want, got = _reference_and_op("bnrelu_conv1x1", "triton", "x", False)
    assert nonfinite_mismatch(got["out"], want["out"]) is not None


ODD_NHW = (2, 5, 7)  # the pool drops the last row and the last column


def _odd_inputs(scenario):
    """Like ``_inputs`` on the odd ``ODD_NHW`` grid: non-finite x on pixels the pool drops (last row, last
    column, the corner; +Inf on the negative-gamma channel: -Inf after the BatchNorm, ReLU off) and one
    interior NaN, or NaN in the upstream gradient."""
    n, h, w = ODD_NHW
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n * h * w, C, dtype=torch.float64, generator=g)
    gamma = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
    gamma[NEG] = -gamma[NEG]
    beta = torch.randn(C, dtype=torch.float64, generator=g) * 0.5
    rm = torch.randn(C, dtype=torch.float64, generator=g) * 0.3
    rv = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
    grad = torch.randn(n, COUT, h // 2, w // 2, dtype=torch.float64, generator=g)
    if scenario == "x":
        pix = lambda i, r, c: (i * h + r) * w + c  # noqa: E731
        x[pix(0, 4, 2), 0] = NAN     # last row
        x[pix(1, 1, 6), 1] = INF     # last column
        x[pix(1, 4, 6), 2] = -INF    # the corner: -Inf after the BatchNorm
        x[pix(0, 2, 6), NEG] = INF   # last column, -Inf after the BatchNorm
        x[pix(1, 2, 3), 4] = NAN     # interior
    else:
        grad[0, 1, 1, 2] = NAN
        grad[1, 3, 0, 0] = NAN
    return x, gamma, beta, rm, rv, grad


@pytest.mark.parametrize("batch_stats", [False, True], ids=["running_stats", "batch_stats"])
@pytest.mark.parametrize("scenario", ["x", "grad"], ids=["nonfinite_x", "nan_grad"])
@pytest.mark.parametrize("impl", ["cpu", "triton", "aten"])
def test_transition_nonfinite_with_odd_sizes(impl, scenario, batch_stats):
    """Odd H and W: torch's transition convolves before it pools and its BatchNorm backward sums over
    every pixel, so a NaN or Inf on the last row / column (which the pool drops: output finite,
    gradient 0 there) still makes that channel's dgamma (0*xhat) and, where relu(bn(x)) is NaN or +Inf,
    its dweight column (0*relu) NaN; a NaN gradient reaches the window's four pixels only."""
    if impl == "triton" and TRITON_DEVICE is None:
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA device")
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    n, h, w = ODD_NHW
    x, gamma, beta, rm, rv, grad = _odd_inputs(scenario)
    wd = (torch.randn(COUT, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
          / C ** 0.5).requires_grad_()
    out, grads, vecs = bnrelu_reference(x, ODD_NHW, gamma, beta, batch_stats, rm, rv,
                                        lambda a: F.avg_pool2d(F.conv2d(a, wd[:, :, None, None]), 2), grad)
    want = dict(out=_rows(out), dweight=wd.grad, **grads)
    if scenario == "x":  # the case is the one described: finite output, NaN from the dropped pixels
        assert batch_stats or int(torch.isnan(want["out"]).any(1).sum()) == 1  # the interior NaN's window only
        assert torch.isnan(want["dgamma"][:4]).all() and torch.isnan(want["dweight"][:, :2]).all()
        assert batch_stats or torch.isfinite(want["dweight"][:, 2:4]).all()
    got = _avgpool_conv1x1(impl, x.float().to(device), _vectors(vecs, device), wd.detach().float().to(device),
                           _rows(grad).float().to(device).contiguous(), batch_stats, nhw=ODD_NHW)
    assert_same_nonfinite(got, want)
