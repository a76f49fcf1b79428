"""The benchmark's graphed providers (fused_graphed: make_graphed_callables; torchvision_graphed:
torch.compile mode="reduce-overhead"): skipped with a reason without CUDA, never replaced; on a GPU they
produce rows, and the captured fused step replays the eager one."""
import copy

import pytest
import torch

from densenet_fused.tools import bench as B

TINY = B.Case("tiny_block", "block", 2, 6, layers=3, c0=5, growth=4, bn_size=2)


def test_graphed_providers_are_listed_and_need_cuda():
    assert set(B.GRAPHED) <= set(B.PROVIDERS)
    for p in B.GRAPHED:
        assert "needs a CUDA device" in B.unavailable(p, "cpu")
        assert B.unavailable(p, "cuda") == ""
    assert all(B.unavailable(p, "cpu") == "" for p in B.PROVIDERS if p not in B.GRAPHED)
    with pytest.raises(ValueError, match="expected one of"):
        B.unavailable("fused_grpahed", "cpu")


@pytest.mark.parametrize("provider", B.GRAPHED)
def test_build_refuses_a_graphed_provider_on_the_cpu(provider):
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        B.build(TINY, provider, "cpu")


def test_graphed_providers_skipped_on_the_cpu_with_their_reason(capsys):
    built = []

    def builder(case, provider, device):
        built.append(provider)
        return B.build(case, provider, device)

    rows = B.run_case(TINY, ["fused", "fused_graphed", "torchvision", "torchvision_graphed"], "cpu", "fp32",
                      warmup=0, steps=1, rounds=1, builder=builder)
    assert built == ["fused", "torchvision"]  # nothing stands in for a graphed provider
    step = {r["provider"]: r for r in rows if r["mode"] == "step"}
    for p in B.GRAPHED:
        r = step[p]
        assert r["status"] == "skipped" and "needs a CUDA device" in r["error"], r
        assert r["time_ms"] is None and r["peak_mb"] is None and r["time_ratio_fused"] is None
    assert step["fused"]["status"] == step["torchvision"]["status"] == "ok"
    printed = capsys.readouterr()
    for p in B.GRAPHED:
        assert f"provider {p} skipped: {p} replays CUDA graphs: needs a CUDA device" in printed.out + printed.err
    assert "skipped" in B.format_table(rows)


def test_rows_are_tagged_with_device_versions_and_config():
    import triton
    rows = B.run_case(TINY, ["fused"], "cpu", "fp32", 0, 1, 1)
    for r in rows:
        assert (r["device"], r["torch"], r["triton"]) == ("cpu", torch.__version__, triton.__version__)
        assert r["device_name"] and r["config"]["layers"] == 3 and r["config"]["c0"] == 5


def test_host_time_rows(capsys):
    rows = B.host_time(TINY, ["fused", "torchvision", "fused_graphed"], "cpu", "fp32", steps=2, rounds=2, warmup=1)
    by = {r["provider"]: r for r in rows}
    for p in ("fused", "torchvision"):
        assert by[p]["status"] == "ok" and by[p]["steps"] == 4
        assert by[p]["wall_ms"] > 0 and by[p]["cpu_ms"] > 0
    assert by["fused_graphed"]["status"] == "skipped" and by["fused_graphed"]["wall_ms"] is None
    assert "provider fused_graphed skipped" in capsys.readouterr().out


def test_depth_search_builds_only_its_providers():
    case = B.Case("densenet_bc16_k4", "model", 2, 32, c0=3)
    row = B.one_step(case, "fused_keep_b", "cpu", "fp32", B._bc_builder(16, 4))
    assert row["status"] == "error" and "the depth search builds fused, torchvision, torchvision_me" in row["error"]


# ----------------------------------------------------------------------------- GPU machines
CUDA_CASE = B.Case("tiny_cuda_block", "block", 4, 8, layers=3, c0=16, growth=8, bn_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_providers_produce_rows_on_cuda():
    rows = B.run_case(CUDA_CASE, ["fused", "fused_graphed", "torchvision", "torchvision_graphed"], "cuda", "bf16",
                      warmup=1, steps=3, rounds=2)
    for r in rows:
        assert r["status"] == "ok", (r["provider"], r["error"])
        assert r["time_ms"] > 0 and r["time_samples"] == 6 and r["device"] == "cuda"
    step = {r["provider"]: r for r in rows if r["mode"] == "step"}
    out_mb = 4 * 40 * 8 * 8 * 2 / 2 ** 20  # the block's output alone, in bf16
    for p in B.GRAPHED:  # the graphs' pools hold at least the step's output; nothing seen by autograd hooks
        assert step[p]["peak_mb"] > out_mb and step[p]["saved_mb"] is None
        assert step[p]["time_ratio_fused"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_graphed_replays_the_eager_step(no_tf32):
    torch.manual_seed(0)
    base = B.build(CUDA_CASE, "fused", "cuda")
    r = B.Runner(CUDA_CASE, "fused_graphed", "cuda", "fp32", builder=lambda c, p, d: copy.deepcopy(base))
    assert r.status == "ok", r.error
    r.step(record=False)  # a replay: output and gradients of the graphs
    y = r.module(r.x).detach().clone()
    x = r.x.detach().clone().requires_grad_()
    y_eager = base(x)
    y_eager.backward(r.grad)
    torch.testing.assert_close(y, y_eager.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.x.grad, x.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(r.module.named_parameters(), base.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
    r.release()
