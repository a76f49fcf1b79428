import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter; it must be
# chosen before any module defining a kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import densenet_fused  # noqa: E402,F401  (loads the ops)
from flags import tf32_disabled  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def no_tf32():
    with tf32_disabled():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    from densenet_fused import _build_info
    return (f"densenet_fused: torch {torch.__version__}, extension built with CUDA={_build_info.WITH_CUDA}, "
            f"CUDA available: {torch.cuda.is_available()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
