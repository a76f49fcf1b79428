"""Block and model suites: fused vs torchvision (plain, memory_efficient=True, torch.compile).

    pytest benchmarks/test_blocks.py --benchmark-json=out.json

Each test runs every provider of one case interleaved (A B A B) in one run and records
their figures and fused/provider ratios in ``extra_info``; pytest-benchmark's own timing
is of the fused training step (synchronized).  On a CPU only the small CPU cases run.
"""
import pytest
import torch

from densenet_fused.tools import bench as B

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CASES = list(B.CASES.values()) if CUDA else list(B.CPU_CASES.values())
PROVIDERS = list(B.PROVIDERS) if CUDA else ["fused", "fused_keep_b", "torchvision", "torchvision_me",
                                            *B.COMPILE_BUDGETS]
DTYPES = ["fp32", "bf16"] if CUDA else ["fp32"]
WARMUP, STEPS, ROUNDS = (5, 10, 2) if CUDA else (1, 1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_training_step(benchmark, case, dtype):
    rows = B.run_case(case, PROVIDERS, DEVICE, dtype, WARMUP, STEPS, ROUNDS)
    benchmark.extra_info.update(B.environment(DEVICE))
    benchmark.extra_info["case"] = case.name
    benchmark.extra_info["dtype"] = dtype
    benchmark.extra_info["rows"] = rows
    fused = B.Runner(case, "fused", DEVICE, dtype)
    if fused.status != "ok":
        benchmark.extra_info["fused_status"] = fused.status
        pytest.skip(f"fused provider: {fused.status} {fused.error}")

    def step():
        fused.step(record=False)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=STEPS, warmup_rounds=WARMUP, iterations=1)
    assert all(r["status"] in ("ok", "oom") for r in rows), [r["error"] for r in rows if r["status"] == "error"]
