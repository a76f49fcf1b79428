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
