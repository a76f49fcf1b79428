"""The float64 autograd reference of the ops that read a BatchNorm-ReLU of a block's NHWC rows
(bnrelu_avgpool_conv1x1, bnrelu_global_avgpool: test-only), and the relative-error comparison of
their tests."""
import torch.nn.functional as F


def bnrelu_reference(x, nhw, gamma, beta, batch_stats, run_mean, run_var, after, grad, eps=1e-5):
    """``after(relu(batch_norm(x)))`` in float64 autograd through torch's functional forms, x the
    (N*H*W, C) NHWC rows of an (N, C, H, W) batch, backward from ``grad``: (output, dict of dx (rows
    as x), dgamma, dbeta, and the (mean, rstd, scale, shift) the op is given).  Batch statistics
    (biased variance) or the running ones."""
    n, h, w = nhw
    c = x.shape[1]
    x4 = x.detach().double().cpu().reshape(n, h, w, c).permute(0, 3, 1, 2).requires_grad_()
    gm = gamma.clone().requires_grad_()
    bt = beta.clone().requires_grad_()
    if batch_stats:
        mean, var = x4.detach().mean((0, 2, 3)), x4.detach().var((0, 2, 3), unbiased=False)
    else:
        mean, var = run_mean, run_var
    y = F.batch_norm(x4, mean.clone(), var.clone(), gm, bt, training=batch_stats, eps=eps)
    out = after(F.relu(y))
    out.backward(grad)
    rstd = (var + eps).rsqrt()
    scale = gamma * rstd
    grads = dict(dx=x4.grad.permute(0, 2, 3, 1).reshape(-1, c), dgamma=gm.grad, dbeta=bt.grad)
    return out.detach(), grads, (mean, rstd, scale, beta - mean * scale)


def rel_err(got, want):
    """max |got - want| / max |want| (in float64 on the CPU)."""
    return (got.double().cpu() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def assert_all_close(ref, tol, **got):
    """Each named result within ``tol`` (relative) of ``ref[name]``."""
    for name, t in got.items():
        err = rel_err(t, ref[name])
        assert err <= tol, f"{name}: {err:.2e} > {tol}"
