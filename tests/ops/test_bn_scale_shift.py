"""bn_scale_shift: the ATen kernel (CPU) and the Triton kernel (interpreter in CI, CUDA on a GPU)."""
import importlib
import os

import pytest
import torch

from densenet_fused.ops import bn_scale_shift
mod = importlib.import_module("densenet_fused.ops.bn_scale_shift")  # the module (the op shadows its name)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _args(c, acc, param_dtype, device):
    gamma = (torch.rand(c, dtype=torch.float64) + 0.5).to(param_dtype).to(device)
    beta = torch.randn(c, dtype=torch.float64).to(param_dtype).to(device)
    mean = torch.randn(c, dtype=acc, device=device)
    var = torch.rand(c, dtype=acc, device=device) + 0.1
    return gamma, beta, mean, var


def _oracle(gamma, beta, mean, var, eps):
    rstd = 1 / torch.sqrt(var.double() + eps)
    scale = gamma.double() * rstd
    return scale, beta.double() - mean.double() * scale, rstd


@pytest.mark.parametrize("acc,param_dtype,tol", [(torch.float64, torch.float64, 1e-14),
                                                 (torch.float32, torch.float32, 1e-6),
                                                 (torch.float32, torch.float16, 1e-6)])
def test_op(device, acc, param_dtype, tol):
    args = _args(37, acc, param_dtype, device)
    for got, want in zip(bn_scale_shift(*args, 1e-5), _oracle(*args, 1e-5)):
        assert got.dtype == acc
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=tol, atol=tol)
    torch.library.opcheck(torch.ops.densenet_fused.bn_scale_shift.default, (*args, 1e-5))


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("c", [1, 300, 1500])
def test_triton_kernel(c):
    device = "cpu" if INTERPRET else "cuda"
    args = _args(c, torch.float32, torch.float32, device)
    for got, want in zip(mod.triton_scale_shift(*args, 1e-3), _oracle(*args, 1e-3)):
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=1e-6, atol=1e-6)


def test_bad_input():
    gamma, beta, mean, var = _args(5, torch.float32, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="expected gamma to be a 1-D floating tensor of 5 channels"):
        bn_scale_shift(gamma[:3], beta, mean, var, 1e-5)
    with pytest.raises(RuntimeError, match="expected var of dtype Float"):
        bn_scale_shift(gamma, beta, mean, var.double(), 1e-5)
