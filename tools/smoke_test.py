"""Smoke test of an installed densenet_fused (a wheel), run from outside the source tree:

    cd /tmp && python /path/to/tools/smoke_test.py

import, the installed location, one training step of a fused block against torchvision's
_DenseBlock on the CPU in float64, and the command line's --help.
"""
import os
import subprocess
import sys

import torch


def main() -> int:
    import densenet_fused
    from densenet_fused import FusedDenseBlock
    from torchvision.models.densenet import _DenseBlock

    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    where = os.path.dirname(os.path.abspath(densenet_fused.__file__))
    if where == os.path.join(src, "densenet_fused"):  # (a venv inside the checkout is fine)
        raise SystemExit(f"smoke test: densenet_fused was imported from the source tree ({where}), "
                         "expected an installed copy: run it from another folder")
    torch.manual_seed(0)
    ref = _DenseBlock(3, 5, 2, 4, drop_rate=0.0).double().train()
    fused = FusedDenseBlock(3, 5, 2, 4).double().train()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    grad = torch.randn(2, 5 + 3 * 4, 6, 7, dtype=torch.float64)
    errs = []
    for block in (ref, fused):
        xi = x.clone().requires_grad_()
        y = block(xi)
        y.backward(grad)
        errs.append((y, xi.grad, [p.grad for p in block.parameters()]))
    (y_r, dx_r, g_r), (y_f, dx_f, g_f) = errs
    worst = max([(y_f - y_r).abs().max().item(), (dx_f - dx_r).abs().max().item()]
                + [(a - b).abs().max().item() for a, b in zip(g_f, g_r)])
    if worst > 1e-10:
        raise SystemExit(f"smoke test: fused block differs from torchvision by {worst:.2e} in float64 (expected <= 1e-10)")
    help_text = subprocess.run([sys.executable, "-m", "densenet_fused.tools.cli", "--help"], capture_output=True, text=True,
                               check=True).stdout
    if "demo" not in help_text or "bench" not in help_text:
        raise SystemExit("smoke test: `densenet-fused --help` does not list its commands:\n" + help_text)
    print(f"smoke test passed: densenet_fused {densenet_fused.__version__} installed at {where}, "
          f"torch {torch.__version__}, WITH_CUDA={densenet_fused.WITH_CUDA}, float64 agreement {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
