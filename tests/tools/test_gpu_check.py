"""benchmarks/gpu_check.sh and its helpers on the CPU: both dry runs end to end (every test id, case,
provider and depth they name exists), the CUDA-test selection, the stop after a lost CUDA context, the
name checks of benchmarks/gpu_run.py and its merge into benchmarks/results' layout."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def _module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([BENCH, ROOT])
    return env


@pytest.mark.parametrize("mode,steps", [
    ("first", ["versions", "build", "gpu_tests", "blocks", "host_n4", "profile", "kernels", "blocks_compiled"]),
    ("second", ["versions", "build", "densenet121", "depth_k12", "depth_k40", "densenet121_compiled",
                "densenet121_budgets", "densenet201"])])
def test_dry_run(tmp_path, mode, steps):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), str(out), mode, "--dry-run"],
                          env={**_env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = (out / "summary.txt").read_text().splitlines()
    ran = [line.split(":")[0] for line in summary if ": exit " in line]
    assert ran == steps, summary
    assert all(": exit 0 " in line for line in summary if ": exit " in line), summary
    assert len(list(out.rglob("*"))) <= 8  # a device call returns at most 8 files
    log = (out / "log.txt").read_text()
    if mode == "first":
        tests = (out / "tests.log").read_text()
        # collected as on a CUDA machine: the device fixture's cuda variants, the Triton tests, the build test
        assert "[cuda" in tests and "tests/test_build.py::" in tests and "tests/ops/test_bnrelu_conv1x1_triton.py::" in tests
        assert "tests/tools/test_bench_graphed.py::test_graphed_providers_produce_rows_on_cuda" in tests
        assert "tests/tools/test_bench_graphed.py::test_host_time_rows" not in tests  # a CPU test is not re-run
        assert "benchmarks/ops/test_bnrelu_conv3x3.py::test_conv3x3[128x14x14x128x32]" in log  # the CUDA shapes
        assert "would run case densenet121_block3_n128 (bf16" in log and "fused_graphed" in log
        assert "torchvision_graphed" in log and "would profile densenet121_block3_n128" in log
        assert "would time the host: densenet121_block3_n4" in log
    else:
        assert "would run case densenet121_n128" in log and "would run case densenet201_n64" in log
        assert "torchvision_compile_budget0.05" in log
        assert "k=12, batch 64: depths [100, 250, 400, 1000, 1204, 1600, 2002, 2500, 3004]" in log


def test_usage_errors(tmp_path):
    for args in ([str(tmp_path), "third", "--dry-run"], [str(tmp_path), "first", "--dryrun"]):
        proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), *args], capture_output=True, text=True)
        assert proc.returncode == 2 and "usage: gpu_check.sh OUT first|second [--dry-run]" in proc.stdout


@pytest.mark.parametrize("argv,message", [
    (["bench", "o", "--cases", "densenet121_block3_n128", "--providers", "fused,fused_grpahed"],
     "unknown provider(s) ['fused_grpahed']"),
    (["bench", "o", "--cases", "densenet121_blok3_n128", "--providers", "fused"], "unknown case(s)"),
    (["host", "o", "--case", "densenet121_block3", "--providers", "fused"], "unknown case(s)"),
    (["budget", "o", "--growth", "12", "--depths", "100,101", "--providers", "fused"], "got [101]"),
    (["budget", "o", "--growth", "12", "--depths", "100", "--providers", "fused_graphed"],
     "the depth search builds fused, torchvision, torchvision_me"),
])
def test_gpu_run_refuses_unknown_names(argv, message):
    gpu_run = _module("gpu_run")
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        gpu_run.main(argv + ["--dry-run"])


def _pytest(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "cuda_tests", "-p", "no:cacheprovider", *args,
                           str(tmp_path)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)


SELECTION = '''
import pytest
import torch

TRITON_DEVICE = None

@pytest.mark.gpu
def test_marked(): pass

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_skipped_without_cuda(): pass

@pytest.mark.skipif(True, reason="substitutes interpreted Triton kernels on CPU tensors")
def test_interpreter_only(): pass

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_param(device): pass

@pytest.mark.parametrize("impl,dev", [("aten", "cpu"), ("triton", torch.device("cuda", 0))])
def test_tuple(impl, dev): pass

def test_cpu(): pass
'''


def test_cuda_only_selection(tmp_path):
    (tmp_path / "test_sel.py").write_text(SELECTION)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    (tmp_path / "test_triton_mod.py").write_text(
        "import pytest\nimport torch\nTRITON_DEVICE = 'cuda' if torch.cuda.is_available() else None\n"
        "def test_kernel(): assert TRITON_DEVICE\n"
        "@pytest.mark.parametrize('impl', ['aten', 'triton'])\ndef test_impl(impl): pass\n"
        "def test_cpu_op(): pass\n")
    (tmp_path / "test_device_mod.py").write_text(
        "import torch\nDEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'\ndef test_any(): pass\n")
    (tmp_path / "test_other.py").write_text("def test_build(): pass\ndef test_more(): pass\n")
    proc = _pytest(tmp_path, "--cuda-only", "--as-if-cuda", "--collect-only", "-q", "--cuda-also",
                   "test_other.py::test_build")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = sorted(line for line in proc.stdout.splitlines() if "::" in line)
    assert ids == ["test_device_mod.py::test_any", "test_other.py::test_build", "test_sel.py::test_marked",
                   "test_sel.py::test_param[cuda]", "test_sel.py::test_skipped_without_cuda",
                   "test_sel.py::test_tuple[triton-dev1]", "test_triton_mod.py::test_impl[triton]",
                   "test_triton_mod.py::test_kernel"], proc.stdout
    # without --as-if-cuda this machine has no CUDA Triton module (the skip-marked cuda variant is collected)
    proc = _pytest(tmp_path, "--cuda-only", "--collect-only", "-q")
    assert "test_param[cuda]" in proc.stdout and "test_triton_mod.py" not in proc.stdout
    assert "test_device_mod.py" not in proc.stdout


def test_as_if_cuda_only_collects(tmp_path):
    (tmp_path / "test_a.py").write_text("def test_a(): pass\n")
    proc = _pytest(tmp_path, "--as-if-cuda")
    assert proc.returncode != 0 and "--as-if-cuda only collects: add --collect-only" in proc.stderr


def test_a_lost_cuda_context_stops_the_session(tmp_path):
    (tmp_path / "test_crash.py").write_text(
        "def test_1_fails(): assert False\n"
        "def test_2_crash(): raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
        "def test_3_after(): pass\n")
    proc = _pytest(tmp_path, "-v")
    assert "test_1_fails FAILED" in proc.stdout and "test_2_crash FAILED" in proc.stdout
    assert "test_3_after" not in proc.stdout.split("short test summary")[0]
    assert "CUDA context lost in test_crash.py::test_2_crash" in proc.stdout
    assert proc.returncode == 1


def test_merge_keeps_each_providers_first_run(tmp_path):
    gpu_run = _module("gpu_run")
    env = {"device": "cuda", "device_name": "GPU", "torch": "2.11", "triton": "3.6", "date": "2026-12-03"}

    def row(provider, ms, run):
        return {"case": "c", "dtype": "bf16", "mode": "step", "provider": provider, "time_ms": ms, "run": run,
                "status": "ok", "peak_mb": 1.0, "saved_mb": None, "time_ratio_fused": None}

    records = [{"step": "blocks", "environment": env, "results": [row("fused", 1.0, 1), row("torchvision", 2.0, 1)]},
               {"step": "blocks_compiled", "environment": env,
                "results": [row("fused", 1.1, 2), row("torchvision_graphed", 1.5, 2)]},
               {"step": "host", "environment": env, "host_time": [{"provider": "fused", "wall_ms": 3.0}]},
               {"step": "budget_k12", "environment": env, "depth_at_budget": [{"provider": "fused", "depth": 100}]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dest = tmp_path / "gpu.json"
    assert gpu_run.main(["merge", str(tmp_path / "rows.jsonl"), str(dest)]) == 0
    data = json.loads(dest.read_text())
    assert data["environment"] == env
    assert [(r["provider"], r["run"]) for r in data["results"]] == [("fused", 1), ("torchvision", 1),
                                                                    ("torchvision_graphed", 2)]
    assert data["host_time"] == [{"provider": "fused", "wall_ms": 3.0}]
    assert data["depth_at_budget"] == [{"provider": "fused", "depth": 100}]


def test_cuda_tests_run_order():
    from types import SimpleNamespace
    cuda_tests = _module("cuda_tests")
    ids = ["tests/ops/test_a.py::t", "tests/tools/test_b.py::t", "tests/autograd/test_block.py::t",
           "tests/test_build.py::t", "tests/modules/test_models.py::t"]
    got = sorted((SimpleNamespace(nodeid=i) for i in ids), key=cuda_tests._priority)
    assert [i.nodeid for i in got] == ["tests/test_build.py::t", "tests/autograd/test_block.py::t",
                                       "tests/modules/test_models.py::t",
                                       "tests/tools/test_b.py::t", "tests/ops/test_a.py::t"]


def test_tests_not_started_by_the_deadline_are_skipped(tmp_path):
    (tmp_path / "test_late.py").write_text("def test_a(): pass\ndef test_b(): pass\n")
    proc = _pytest(tmp_path, "-rs", "--deadline", "1")  # 1970: every test is late
    assert proc.returncode == 0 and "2 skipped" in proc.stdout
    assert "not started: the test step's time budget had ended (--deadline)" in proc.stdout
    proc = _pytest(tmp_path, "--deadline", "4e9")  # 2096
    assert proc.returncode == 0 and "2 passed" in proc.stdout
