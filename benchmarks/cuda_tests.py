"""pytest plugin: run only the tests that need CUDA (benchmarks/gpu_check.sh on a GPU machine), or list
them on a machine without one.

    PYTHONPATH=benchmarks python -m pytest -p cuda_tests --cuda-only tests           # GPU machine
    PYTHONPATH=benchmarks python -m pytest -p cuda_tests --cuda-only --as-if-cuda \\
        --collect-only -q tests                                                      # CPU: the same list

A test needs CUDA when, collected on a CUDA machine, it
  - carries the ``gpu`` marker, or
  - carries a ``skipif`` whose reason names CUDA or a GPU (it is skipped without one), or
  - is parametrized with a CUDA device ("cuda", "cuda:1", torch.device("cuda"), also inside tuples:
    the ``device`` fixture of tests/conftest.py gives every such test a cuda variant), or
  - lives in a module whose ``DEVICE`` is "cuda" (a module of Triton kernel tests: they run interpreted on
    CPU tensors without a GPU, compiled on the GPU with one), or in a module whose ``TRITON_DEVICE`` is
    "cuda" and uses it (its source names TRITON_DEVICE) or is parametrized with "triton", or
  - is named by ``--cuda-also`` (node id prefixes: a check of the CUDA build that needs no device).

``--as-if-cuda`` (CPU machines only, with --collect-only): ``torch.cuda.is_available()`` answers True
from before the test modules are imported, so the collection is the one a GPU machine makes; nothing
runs.

With --cuda-only the kept tests run in this order: tests/test_build.py, the other runtime tests (whole
blocks, models: tests/autograd, tests/modules and the top level), tests/tools, tests/ops (a run stopped
at its time limit has the most telling results).

After a test fails with an error that leaves the CUDA context unusable (an illegal memory access, a
device-side assert, a launch failure), every later test in that process is skipped ("CUDA context lost
after <test>") and, without xdist, the session stops as after -x: the log keeps the first crash, not a
cascade.  A crash that kills the process (a segfault) ends a run without xdist; faulthandler's traceback
and the last test started are in the log.

``--deadline EPOCH_SECONDS``: tests not started by then are skipped (with that reason), so a run under a
hard time limit still ends with its report (failures and their tracebacks) instead of being killed.
"""
import inspect
import re
import time

import pytest

_CUDA_REASON = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)
# errors after which the process's CUDA context is unusable (every later CUDA call fails)
_STICKY = re.compile(r"illegal memory access|illegal instruction|device-side assert|unspecified launch failure|"
                     r"misaligned address|CUDA error: an illegal|uncorrectable ECC|launch timed out", re.IGNORECASE)
_lost = []  # the node id after which this process's CUDA context was lost


def pytest_addoption(parser):
    group = parser.getgroup("cuda_tests", "tests that need CUDA (benchmarks/cuda_tests.py)")
    group.addoption("--cuda-only", action="store_true", help="deselect every test that does not need CUDA")
    group.addoption("--as-if-cuda", action="store_true",
                    help="collect as a CUDA machine would (torch.cuda.is_available() is True); with --collect-only")
    group.addoption("--cuda-also", action="append", default=[], metavar="NODEID",
                    help="also keep the tests whose node id starts with NODEID (repeatable)")
    group.addoption("--deadline", type=float, default=None, metavar="EPOCH_SECONDS",
                    help="skip the tests not started by then, so the run ends with its report before a hard limit")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    ns = early_config.known_args_namespace
    if not getattr(ns, "as_if_cuda", False):
        return
    import torch
    if torch.cuda.is_available():
        raise pytest.UsageError("--as-if-cuda is for machines without CUDA")
    if not getattr(ns, "collectonly", False):
        raise pytest.UsageError("--as-if-cuda only collects: add --collect-only")
    torch.cuda.is_available = lambda: True  # this process only collects, never runs a test
    torch.cuda.device_count = lambda: 1


def _is_cuda(value) -> bool:
    import torch
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    if isinstance(value, (tuple, list)):
        return any(_is_cuda(v) for v in value)
    return False


def needs_cuda(item) -> bool:
    """Whether ``item`` (collected on a CUDA machine) needs CUDA, by the rules of the module docstring."""
    if item.get_closest_marker("gpu") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        if _CUDA_REASON.search(str(mark.kwargs.get("reason", ""))):
            return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_is_cuda(v) for v in callspec.params.values()):
        return True
    module = getattr(item, "module", None)
    if getattr(module, "DEVICE", None) == "cuda":
        return True
    if getattr(module, "TRITON_DEVICE", None) == "cuda":
        if callspec is not None and "triton" in callspec.params.values():
            return True
        try:
            return "TRITON_DEVICE" in inspect.getsource(item.function)
        except (AttributeError, OSError, TypeError):
            return False
    return False


def pytest_collection_modifyitems(config, items):
    if not config.getoption("cuda_only"):
        return
    also = tuple(config.getoption("cuda_also"))
    keep, drop = [], []
    for item in items:
        (keep if needs_cuda(item) or (also and item.nodeid.startswith(also)) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = sorted(keep, key=_priority)  # stable: collection order within a group


def _priority(item) -> int:
    """Run order on a GPU machine, so that a run stopped at its time limit has the most telling results:
    the build, then whole blocks and models, then the tools, then the single ops."""
    path = item.nodeid.split("::")[0]
    if path.startswith("tests/test_build"):
        return 0
    if path.startswith("tests/ops/"):
        return 3
    return 2 if path.startswith("tests/tools/") else 1


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and not _lost and _STICKY.search(str(report.longrepr)):
        _lost.append(item.nodeid)
        if not hasattr(item.config, "workerinput"):  # one process: stop as -x does (an xdist worker only skips)
            item.session.shouldfail = f"CUDA context lost in {item.nodeid}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _lost:
        pytest.skip(f"CUDA context lost after {_lost[0]}")
    deadline = item.config.getoption("deadline")
    if deadline is not None and time.time() > deadline:
        pytest.skip("not started: the test step's time budget had ended (--deadline)")
