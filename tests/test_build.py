"""The extension build: CUDA sources compiled where nvcc exists, torch version recorded."""
import os
import shutil
import subprocess
import sys

import torch

import densenet_fused
from densenet_fused import _build_info


def _nvcc_present():
    """A CUDA toolkit (nvcc and runtime headers) where setup.py looks for one."""
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None]
    return any(h and os.path.exists(os.path.join(h, "bin", "nvcc")) and
               os.path.exists(os.path.join(h, "include", "cuda_runtime.h")) for h in homes)


def test_extension_loaded_and_matches_build_info():
    assert os.path.exists(densenet_fused._loader._C.__file__)
    assert densenet_fused.TORCH_VERSION_BUILT == _build_info.TORCH_VERSION == torch.__version__
    assert densenet_fused.WITH_CUDA == _build_info.WITH_CUDA


def test_cuda_kernels_compiled_where_nvcc_is_present():
    expect = (_nvcc_present() and torch.version.cuda is not None
              and os.environ.get("DENSENET_FUSED_SKIP_CUDA", "0") not in ("1", "true", "yes", "on"))
    assert densenet_fused.WITH_CUDA == expect, (
        f"extension WITH_CUDA={densenet_fused.WITH_CUDA}, expected {expect} (nvcc present: {_nvcc_present()}, "
        f"torch CUDA {torch.version.cuda})")
    if expect:
        assert _build_info.CUDA_ARCH_LIST  # an explicit list, never "the visible GPU"


def test_other_torch_version_gives_rebuild_instructions():
    code = ("import torch; torch.__version__ = '0.0.0-other'\n"
            "try:\n    import densenet_fused\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "ERR" in out.stdout, out.stdout + out.stderr
    assert "built against torch" in out.stdout and "0.0.0-other" in out.stdout
    assert "pip install --no-build-isolation --no-deps -e ." in out.stdout


def test_cli_demo_runs():
    from densenet_fused.cli import main
    assert main(["demo", "--device", "cpu"]) == 0
