"""The benchmark harness itself, on the CPU at tiny sizes."""
import json

import pytest
import torch

from densenet_fused.tools import bench as B

TINY = B.Case("tiny_block", "block", 2, 6, layers=3, c0=5, growth=4, bn_size=2)


def test_run_case_rows_and_ratios():
    rows = B.run_case(TINY, ["fused", "torchvision", "torchvision_me"], "cpu", "fp32", warmup=1, steps=2, rounds=2)
    assert len(rows) == 9
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["time_ms"] > 0 and r["time_samples"] == 4
        assert r["saved_mb"] > 0 and r["peak_mb"] is None  # no CUDA allocator on the CPU
    fused = next(r for r in rows if r["provider"] == "fused" and r["mode"] == "step")
    tv = next(r for r in rows if r["provider"] == "torchvision" and r["mode"] == "step")
    assert tv["time_ratio_fused"] == pytest.approx(fused["time_ms"] / tv["time_ms"])
    assert tv["saved_ratio_fused"] == pytest.approx(fused["saved_mb"] / tv["saved_mb"])
    assert fused["saved_mb"] < tv["saved_mb"]


def test_out_of_memory_is_a_result(tmp_path):
    def builder(case, provider, device):
        if provider == "torchvision":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return B.build(case, provider, device)

    rows = B.run_case(TINY, ["fused", "torchvision"], "cpu", "fp32", 0, 1, 1, builder=builder)
    status = {(r["provider"], r["mode"]): r["status"] for r in rows}
    assert status[("torchvision", "step")] == "oom" and status[("fused", "step")] == "ok"
    assert all(r["time_ms"] is None for r in rows if r["provider"] == "torchvision")
    path = tmp_path / "r.json"
    B.write_json(path, B.environment("cpu"), rows)
    data = json.loads(path.read_text())
    assert data["environment"]["device"] == "cpu" and len(data["results"]) == 6
    assert "oom" in B.format_table(rows)


def test_error_is_recorded_not_raised():
    def builder(case, provider, device):
        raise RuntimeError("broken provider")

    rows = B.run_case(TINY, ["torchvision"], "cpu", "fp32", 0, 1, 1, builder=builder)
    assert {r["status"] for r in rows} == {"error"} and "broken provider" in rows[0]["error"]


def test_cli_bench_quick_writes_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "CPU_CASES", {TINY.name: TINY})
    from densenet_fused.tools.cli import main
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quick_cpu.json").read_text())
    assert {r["provider"] for r in data["results"]} == {"fused", "fused_keep_b", "torchvision", "torchvision_me"}
    assert (tmp_path / "quick_cpu_steps.png").stat().st_size > 1000


def test_compile_under_a_memory_budget_recomputes():
    # torch.compile's min-cut recomputation at budget 0.05 saves less for backward than eager
    # torchvision, and its compile does not leak its budget into the global config
    import torch._functorch.config as functorch_config
    before = functorch_config.activation_memory_budget
    rows = B.run_case(TINY, ["torchvision", "torchvision_compile_budget0.05"], "cpu", "fp32", 0, 1, 1)
    step = {r["provider"]: r for r in rows if r["mode"] == "step"}
    assert all(r["status"] == "ok" for r in step.values()), step
    assert step["torchvision_compile_budget0.05"]["saved_mb"] < step["torchvision"]["saved_mb"]
    assert functorch_config.activation_memory_budget == before


def test_unknown_provider():
    with pytest.raises(ValueError, match="expected one of"):
        B.build(TINY, "nope", "cpu")


def test_results_table_with_budget_searches(tmp_path):
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "make_table.py")
    spec = importlib.util.spec_from_file_location("make_table", path)
    make_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_table)
    rows = B.run_case(TINY, ["fused", "torchvision"], "cpu", "fp32", 0, 1, 1)
    budget = [{"search": "depth", "provider": "fused", "depth": d, "growth": 12, "batch": 64, "dtype": "bf16",
               "budget_gb": 8.0, "status": s, "params": 1e6 * d, "peak_mb": 1.0}
              for d, s in ((100, "ok"), (190, "ok"), (250, "oom"))]
    budget += [{"search": "batch", "case": "densenet121_n64", "provider": "torchvision", "batch": b, "dtype": "bf16",
                "budget_gb": 8.0, "status": s, "params": 8e6, "peak_mb": 1.0}
               for b, s in ((32, "ok"), (64, "oom"))]
    out = tmp_path / "r.json"
    B.write_json(out, B.environment("cpu"), rows, budget)
    text = make_table.table(str(out))
    assert "| tiny_block | fp32 |" in text
    assert "| fused | 12 | 190 (190.0M) | 250 |" in text
    assert "| densenet121_n64 | torchvision | 32 | 64 |" in text
    assert len(B.plot(rows, budget, str(tmp_path / "p"), B.environment("cpu"))) == 2


@pytest.mark.parametrize("i", [1, 2, 3, 4])
def test_densenet121_block_cases_are_torchvisions_blocks(i):
    import torchvision

    with torch.device("meta"):
        block = getattr(torchvision.models.densenet121().features, f"denseblock{i}")
    case = B.densenet121_block(i, 2)
    assert (case.layers, case.c0, case.growth) == (len(block), block.denselayer1.norm1.num_features,
                                                   block.denselayer1.conv2.out_channels)
    assert case.hw == 224 // 2 ** (i + 1)


def test_budget_searches_stop_each_provider_at_its_first_step_that_does_not_fit(monkeypatch):
    """depth_at_budget / batch_at_budget (their cap and steps need CUDA: stood in for here): ascending
    values per provider up to the first that is not "ok", that row kept, one progress tick a step."""
    import contextlib

    def one_step(case, provider, device, dtype, builder):
        size = case.batch if case.name == "densenet121_n64" else int(case.name.split("_")[1][2:])
        limit = {"fused": 100, "torchvision": 40} if case.name != "densenet121_n64" else {"fused": 16}
        return {"status": "ok" if size <= limit[provider] else "oom", "error": None, "params": 1, "peak_mb": 1.0}

    class Ticks:
        n = 0

        def update(self, k):
            self.n += k

    monkeypatch.setattr(B, "MemoryCap", lambda device, budget_gb: contextlib.nullcontext())
    monkeypatch.setattr(B, "one_step", one_step)
    ticks = Ticks()
    rows = B.depth_at_budget("cuda", 8, 12, ["fused", "torchvision"], [40, 100, 190, 250], progress=ticks)
    assert [(r["search"], r["provider"], r["depth"], r["status"]) for r in rows] == [
        ("depth", "fused", 40, "ok"), ("depth", "fused", 100, "ok"), ("depth", "fused", 190, "oom"),
        ("depth", "torchvision", 40, "ok"), ("depth", "torchvision", 100, "oom")]
    assert ticks.n == 5 and all(r["growth"] == 12 and r["batch"] == 64 and r["budget_gb"] == 8 for r in rows)
    rows = B.batch_at_budget("cuda", 8, B.CASES["densenet121_n64"], ["fused"], [8, 16, 32, 64])
    assert [(r["search"], r["case"], r["batch"], r["status"]) for r in rows] == [
        ("batch", "densenet121_n64", 8, "ok"), ("batch", "densenet121_n64", 16, "ok"),
        ("batch", "densenet121_n64", 32, "oom")]


def test_fused_unplanned_runs_its_steps_without_the_plan(monkeypatch):
    """The fused_unplanned provider: the fused module's forwards under densenet_fused.planning(False) (on
    the CPU neither provider is planned: the comparison is a GPU one), restored after each call."""
    import densenet_fused.autograd.block as blockmod
    from densenet_fused.autograd import planned
    case = B.Case("tiny", "block", batch=2, hw=4, layers=2, c0=8, growth=4, bn_size=2)
    m = B.build(case, "fused_unplanned", "cpu")
    assert isinstance(m, B._Unplanned)
    seen = []
    real = blockmod.block_plan
    monkeypatch.setattr(blockmod, "block_plan", lambda *a, **k: (seen.append(planned._enabled.get()), real(*a, **k))[1])
    m(torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)).sum().backward()
    assert seen == [False] and planned._enabled.get() is True
