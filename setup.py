"""Build densenet_fused and its C++/CUDA extension ``densenet_fused._C``.

CUDA sources are compiled when nvcc is found (CUDA_HOME, CUDA_PATH, nvcc on PATH or
/usr/local/cuda) and torch is a CUDA build; otherwise a CPU-only extension is built.
The GPU is never probed.  Overrides:

  DENSENET_FUSED_FORCE_CUDA=1   compile CUDA sources (fail if nvcc is missing)
  DENSENET_FUSED_SKIP_CUDA=1    CPU-only build even where nvcc exists
  TORCH_CUDA_ARCH_LIST          default "8.0;9.0+PTX" (Ampere, Hopper, PTX for the newest)
  MAX_JOBS                      parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _is_cuda_home(path):
    """A CUDA toolkit root: nvcc and the runtime headers (a bare nvcc wrapper script is not one)."""
    return bool(path) and os.path.exists(os.path.join(path, "bin", "nvcc")) and os.path.exists(
        os.path.join(path, "include", "cuda_runtime.h"))


def _find_cuda_home():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if _is_cuda_home(home):
            return home
    return None


cuda_home = _find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if _flag("DENSENET_FUSED_FORCE_CUDA") and _flag("DENSENET_FUSED_SKIP_CUDA"):
    raise RuntimeError("set at most one of DENSENET_FUSED_FORCE_CUDA and DENSENET_FUSED_SKIP_CUDA")
if _flag("DENSENET_FUSED_SKIP_CUDA"):
    with_cuda = False
elif _flag("DENSENET_FUSED_FORCE_CUDA"):
    if cuda_home is None:
        raise RuntimeError("DENSENET_FUSED_FORCE_CUDA=1 but no nvcc was found: set CUDA_HOME")
    if torch.version.cuda is None:
        raise RuntimeError("DENSENET_FUSED_FORCE_CUDA=1 but torch %s is not a CUDA build" % torch.__version__)
    with_cuda = True
else:
    with_cuda = cuda_home is not None and torch.version.cuda is not None

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for
# Link the shared libstdc++ that torch itself uses.  Some toolchains ship only a static
# libstdc++.a in their own library folder (the GPU machines' CXX=/opt/gcc/bin/g++ does): _C then
# carries a private libstdc++ copy whose locale facets are never initialized, and formatting any
# error message (every TORCH_CHECK) segfaulted.  ``-l:libstdc++.so.6`` asks for the shared file by
# name, so no static archive earlier in the search path can satisfy it.
link_flags = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []
define_macros = [("TORCH_VERSION_BUILT", '"%s"' % torch.__version__)]
if with_cuda:
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    define_macros.append(("DENSENET_FUSED_WITH_CUDA", None))
    ext = CUDAExtension(
        "densenet_fused._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("densenet_fused._C", sources, define_macros=define_macros,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

# Objects compiled against another torch's headers must not be linked into this build (ninja
# rebuilds by timestamps only): a build folder stamped with another torch version is cleared.
_stamp = os.path.join(ROOT, "build", "torch_version.txt")
if os.path.exists(_stamp) and open(_stamp).read().strip() != torch.__version__:
    for _tmp in glob.glob(os.path.join(ROOT, "build", "temp*")):
        shutil.rmtree(_tmp)
os.makedirs(os.path.dirname(_stamp), exist_ok=True)
with open(_stamp, "w") as f:
    f.write(torch.__version__ + "\n")

# Record what the extension is built against, so that importing it under another torch
# fails with instructions instead of an undefined-symbol error.
with open(os.path.join(ROOT, "densenet_fused", "_build_info.py"), "w") as f:
    f.write("# Written by setup.py; do not edit.\n")
    f.write("TORCH_VERSION = %r\n" % torch.__version__)
    f.write("TORCH_CUDA_VERSION = %r\n" % torch.version.cuda)
    f.write("WITH_CUDA = %r\n" % with_cuda)
    f.write("CUDA_ARCH_LIST = %r\n" % (os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None))

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
