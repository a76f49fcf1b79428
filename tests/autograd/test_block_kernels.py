"""The block running on the CUDA kernels' code paths.

- Without a GPU: the Triton bnrelu_conv1x1 kernels run under TRITON_INTERPRET=1 on CPU
  tensors, substituted for the CPU kernels, so CI checks the block as it runs on CUDA.
- With a GPU: the block on CUDA against torchvision, float32 and bf16 autocast, by the
  tolerance rule of docs/design.md section 6 (error against float64 at most 2x torchvision's own
  error in that dtype, plus a small floor).
"""
import os

import pytest
import torch

from blockutil import assert_close, make_pair, replay_step_from_cuda_graph, run_step, triton_block_ops
from flags import tf32_disabled
from densenet_fused.ops import bnrelu_conv3x3 as op3
from densenet_fused.ops.table import substituted


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.mark.skipif(not INTERPRET, reason="substitutes interpreted Triton kernels on CPU tensors")
@pytest.mark.parametrize("drop_rate", [0.0, 0.25])
def test_block_on_triton_kernels_matches_torchvision(drop_rate):
    """The block with its Triton kernels (1x1, 3x3, scale/shift) in place of the CPU kernels (the
    launchers themselves: on CUDA, float32 without TF32 runs cuBLAS/cuDNN instead)."""
    ref, fused = make_pair(torch.float32, drop_rate=drop_rate)
    ref.train(), fused.train()
    init = {k: v.clone() for k, v in fused.state_dict().items()}
    x = torch.randn(3, 13, 9, 7).to(memory_format=torch.channels_last)
    grad = torch.randn(3, 13 + 5 * 7, 9, 7)
    torch.manual_seed(5)
    y_r, dx_r, g_r = run_step(ref, x, grad)
    torch.manual_seed(5)
    with tf32_disabled(), substituted(triton_block_ops()):
        y_f, dx_f, g_f = run_step(fused, x, grad)
    if drop_rate == 0:
        assert_close(y_f, y_r, 1e-4, "output")
        assert_close(dx_f, dx_r, 1e-4, "input grad")
        for name, g in g_r.items():
            assert_close(g_f[name], g, 1e-4, name)
        for (name, b_r), b_f in zip(ref.named_buffers(), fused.buffers()):
            assert_close(b_f.double(), b_r.double(), 1e-4, name)
    else:  # the fused block's own masks: its CPU-kernel run with the same seed is the reference
        _, fused2 = make_pair(torch.float32, drop_rate=drop_rate)
        fused2.load_state_dict(init)
        torch.manual_seed(5)
        y_c, dx_c, g_c = run_step(fused2.train(), x, grad)
        assert_close(y_f, y_c, 1e-4, "output")
        assert_close(dx_f, dx_c, 1e-4, "input grad")
        for name, g in g_c.items():
            assert_close(g_f[name], g, 1e-4, name)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _errors_vs_fp64(dtype_ctx, ref64, block, x, grad):
    """Max relative errors (output, input grad, worst parameter grad) against float64."""
    y64, dx64, g64 = run_step(ref64, x.double(), grad.double())
    with dtype_ctx():
        y, dx, g = run_step(block, x, grad)

    def rel(a, b):
        return (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1e-30)

    return rel(y, y64), rel(dx, dx64), max(rel(g[n], g64[n]) for n in g64)


def _check_tolerance_rule(device, mode):
    """Fused and torchvision blocks with the same weights, each against float64: the fused
    error may be at most 2x torchvision's own error in that dtype plus a small floor."""
    torch.manual_seed(0)
    kw = dict(num_layers=6, num_input_features=29, growth_rate=12, bn_size=4, device=device)
    ref, fused = make_pair(torch.float32, **kw)
    ref64, _ = make_pair(torch.float64, **kw)
    ref64.load_state_dict(ref.state_dict())
    x = torch.randn(8, 29, 15, 13, device=device).to(memory_format=torch.channels_last)
    grad = torch.randn(8, 29 + 6 * 12, 15, 13, device=device)

    def ctx():
        if mode == "float32":
            return torch.autocast(device, enabled=False)
        return torch.autocast(device, dtype=torch.bfloat16)

    e_ref = _errors_vs_fp64(ctx, ref64, ref.train(), x, grad)
    ref64.load_state_dict(fused.state_dict())
    e_fused = _errors_vs_fp64(ctx, ref64, fused.train(), x, grad)
    floor = 1e-5 if mode == "float32" else 1e-3
    for what, f, r in zip(("output", "input grad", "param grads"), e_fused, e_ref):
        assert f <= 2 * r + floor, f"{mode} {what}: fused error {f:.2e} > 2 x torchvision error {r:.2e} + {floor}"


def test_block_bf16_autocast_on_cpu_by_tolerance_rule(no_tf32):
    # the autocast path (bf16 buffer, fp32 statistics and accumulation) on the CPU kernels
    _check_tolerance_rule("cpu", "bf16_autocast")


@gpu
@pytest.mark.parametrize("conv3x3", ["aten", "triton"])
@pytest.mark.parametrize("mode", ["float32", "bf16_autocast"])
def test_block_on_cuda_by_tolerance_rule(mode, conv3x3, no_tf32):
    with op3.using_conv3x3(conv3x3):
        _check_tolerance_rule("cuda", mode)


@gpu
def test_training_step_replays_from_a_cuda_graph():
    """No host synchronization or data-dependent allocation in a step (drop_rate=0): a captured
    forward+backward replayed on new data gives eager's output and gradients."""
    torch.manual_seed(0)
    kw = dict(num_layers=4, num_input_features=16, growth_rate=8, bn_size=2, device="cuda")
    _, fused = make_pair(torch.float32, **kw)
    _, eager = make_pair(torch.float32, **kw)
    eager.load_state_dict(fused.state_dict())
    fused.train(), eager.train()
    shape = (4, 16, 8, 8)
    static_x = torch.randn(shape, device="cuda").to(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(4, 48, 8, 8, device="cuda")
    new_x = torch.randn(shape, device="cuda").to(memory_format=torch.channels_last)
    static_y = replay_step_from_cuda_graph(fused, static_x, grad, new_x)
    y_e, dx_e, g_e = run_step(eager, new_x, grad)
    assert_close(static_y, y_e, 1e-4, "graph output")
    assert_close(static_x.grad, dx_e, 1e-4, "graph input grad")
    for name, p in fused.named_parameters():
        assert_close(p.grad, g_e[name], 1e-4, f"graph grad of {name}")
