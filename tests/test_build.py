"""The extension build: CUDA sources compiled where nvcc exists, torch version recorded."""
import os
import shutil
import subprocess
import sys

import pytest
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


def _elf_needed(path):
    """DT_NEEDED entries of an ELF64 little-endian shared object (no readelf needed)."""
    import struct
    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "expected an ELF64 little-endian file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(sec for sec in sections if sec[1] == 6)  # SHT_DYNAMIC
    strtab = sections[dynamic[6]]  # sh_link: the string table of the dynamic section
    needed = []
    for off in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = strtab[4] + val
            needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF check")
def test_extension_links_the_shared_libstdcxx():
    # a toolchain with only a static libstdc++.a (the GPU machines' /opt/gcc) gave _C a private
    # libstdc++ copy whose locale was never initialized: every TORCH_CHECK message segfaulted
    assert "libstdc++.so.6" in _elf_needed(densenet_fused._loader._C.__file__)


def test_op_errors_raise_instead_of_crashing():
    # in a subprocess, so a crash fails this test instead of the whole session
    code = ("import torch, densenet_fused\n"
            "from densenet_fused.ops import bn_grad_finish\n"
            "G = torch.randn(6, 4); x = torch.randn(6, 4); v = torch.randn(4)\n"
            "try:\n    bn_grad_finish(G, x, v, v[:3], v, torch.float32)\n"
            "except RuntimeError as e:\n    print('RAISED', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert "RAISED bn_grad_finish: expected P to be a 1-D tensor of 4 channels" in out.stdout, out.stdout


def test_version_is_the_package_metadata_version():
    import importlib.metadata
    assert densenet_fused.__version__ == importlib.metadata.version("densenet_fused")


def test_cli_demo_runs(capsys):
    from densenet_fused.tools.cli import main
    assert main(["demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for line in ("torchvision memory_efficient=True", "saved for backward MB",
                 "fused float64 vs torchvision float64", "equals torchvision's to rounding (<= 1e-10): OK"):
        assert line in out, out
