"""`densenet-fused cost --host`: the fused block's CUDA code path run on meta tensors under a stand-in
Triton driver (kernels compiled for sm_90a, only the GPU stubbed).  Functional checks only: host time is
a benchmark (benchmarks/results), never asserted in a test."""
import json
import os
import re
import subprocess
import sys

import pytest

from densenet_fused.tools import host_cost

_MEASURE = """
import json, dataclasses, torch
from densenet_fused.tools.cost import CostCase
from densenet_fused.tools.host_cost import measure
case = CostCase("tiny", layers=3, c0=16, growth=8, bn_size=2, batch=2, hw=6)
times = measure(case, "fused", steps=2, warmup=1)
print(json.dumps(dataclasses.asdict(times)))
"""

_PLANNED_NO_SYNC = """
import json, torch, triton
from densenet_fused import FusedDenseBlock
from densenet_fused.autograd.planned import _plans
from densenet_fused.ops import launch, plan
from densenet_fused.tools.host_cost import _cuda_autocast, stand_in
direct = []
_orig = plan.Plan._direct
plan.Plan._direct = lambda self: (direct.append(len(self.launches)), _orig(self))[1]
def refuse(*args, **kwargs):
    raise AssertionError("a host synchronization on the CUDA path")
blk = FusedDenseBlock(3, 16, 2, 8, drop_rate=0.2).to(device="meta", memory_format=torch.channels_last).train()
x = torch.empty((2, 16, 6, 6), device="meta").to(memory_format=torch.channels_last).requires_grad_()
grad = torch.empty((2, 40, 6, 6), device="meta", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
with stand_in(triton.runtime.driver), launch.routing("meta"), _cuda_autocast(torch.bfloat16):
    for owner, name in ((torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"),
                        (torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "query"), (torch.cuda.Event, "query"),
                        (torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "cpu"),
                        (torch.Tensor, "numpy"), (torch.Tensor, "__bool__")):
        setattr(owner, name, refuse)
    for step in range(3):
        torch.autograd.backward(blk(x), grad)
plans = _plans[next(iter(blk.values()))]
print(json.dumps({"plans": len(plans), "direct": direct}))
"""


def test_fused_step_runs_on_meta_tensors_under_the_stand_in_driver(tmp_path):
    """A tiny block's training step: every Triton kernel compiled for sm_90a (a stand-in driver: no GPU),
    four launches per layer forward and six backward through the launch seam, Triton's autotuner choices
    kept in the private cache directory given to the process."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["forward_ms"] > 0 and got["backward_ms"] > 0
    # per layer 1x1 forward + its statistics merge, 3x3 forward + its merge; block level: one BN scale/shift
    assert got["launches_forward"] == 4 * 3 + 1, got
    # per layer: 1x1 recompute, 3x3 dgrad + wgrad + finish, 1x1 backward + finish
    assert got["launches_backward"] == 6 * 3, got
    assert any(p.name.endswith(".cubin") for p in (tmp_path / "triton").rglob("*")), "nothing compiled"
    # dropout on, every synchronizing call made to raise: the first step records its plan, the next two
    # replay it straight into the compiled launchers (13 launches forward, 18 backward: as unplanned)
    res = subprocess.run([sys.executable, "-c", _PLANNED_NO_SYNC], capture_output=True, text=True, env=env,
                         timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"plans": 1, "direct": [4 * 3 + 1, 6 * 3] * 2}, got


def test_report_ends_with_the_summary_line():
    t = host_cost.StepTimes
    runs = {"fused": [t(1.0, 2.0, 97, 144), t(1.2, 2.2, 97, 144)], "torchvision": [t(4.0, 8.0, 0, 0)] * 2}
    text = host_cost.report("densenet121_block3", runs)
    assert re.fullmatch(r"host per step: fused 3\.20 ms, torchvision 12\.00 ms, ratio 0\.267",
                        text.splitlines()[-1]), text
    assert "4.0 + 6.0" in text  # launches per layer


def test_unknown_case_and_provider_are_refused():
    with pytest.raises(ValueError, match="unknown case 'nope'"):
        host_cost.main("nope")
    with pytest.raises(ValueError, match="unknown provider 'x'"):
        host_cost.measure("densenet121_block3", "x", steps=1)


def test_cuda_autocast_state_is_restored_on_exit_and_on_error():
    import torch
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    with pytest.raises(ZeroDivisionError):
        with host_cost._cuda_autocast(torch.float16):
            assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16
            1 / 0
    assert (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")) == before
