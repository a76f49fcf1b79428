"""At a memory budget (CUDA only): the deepest DenseNet-BC and the largest batch each provider trains one
step of under an 8 GB cap, batch 64, bf16 autocast.

    pytest benchmarks/test_depth_budget.py --benchmark-json=out.json
"""
import pytest
import torch

from densenet_fused.tools import bench as B

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (memory cap)")


@pytest.mark.parametrize("growth,depths", [(12, [100, 190, 250, 400, 700, 1000, 1204, 1600]),
                                           (40, [100, 190, 250, 400, 502, 700])])
def test_depth_at_8gb(benchmark, growth, depths):
    rows = benchmark.pedantic(B.depth_at_budget, args=("cuda", 8.0, growth,
                                                       ["fused", "torchvision", "torchvision_me"], depths),
                              rounds=1, iterations=1)
    benchmark.extra_info.update(B.environment("cuda"))
    benchmark.extra_info["rows"] = rows
    deepest = {p: max([r["depth"] for r in rows if r["provider"] == p and r["status"] == "ok"], default=0)
               for p in ("fused", "torchvision", "torchvision_me")}
    benchmark.extra_info["deepest"] = deepest
    assert all(r["status"] in ("ok", "oom") for r in rows)


@pytest.mark.parametrize("case", ["densenet121_n64", "densenet_bc100_k12_block1_n64"])
def test_largest_batch_at_8gb(benchmark, case):
    rows = benchmark.pedantic(B.batch_at_budget, args=("cuda", 8.0, B.CASES[case],
                                                       ["fused", "torchvision", "torchvision_me"],
                                                       [32, 64, 128, 256, 512, 1024]), rounds=1, iterations=1)
    benchmark.extra_info.update(B.environment("cuda"))
    benchmark.extra_info["rows"] = rows
    assert all(r["status"] in ("ok", "oom") for r in rows)
