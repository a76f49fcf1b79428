"""Distributed use on gloo (CPU): SyncBatchNorm norms inside a fused block (convert_sync_batchnorm)
are refused with a clear error over more than one process -- synchronized statistics are not
implemented yet and must never be replaced silently by local ones -- and run in a world of one."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densenet_fused import FusedDenseBlock


def _worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        block = torch.nn.SyncBatchNorm.convert_sync_batchnorm(FusedDenseBlock(2, 5, 2, 3)).train()
        before = block.denselayer1.norm1.running_mean.clone()
        x = torch.randn(2, 5, 4, 4)
        try:
            block(x).sum().backward()
            outcome = "ran"
        except NotImplementedError as exc:
            unchanged = torch.equal(before, block.denselayer1.norm1.running_mean)
            outcome = f"refused unchanged={unchanged}: {exc}"
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()


def _run(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True)
        return [open(os.path.join(tmp, f"rank{r}.txt")).read() for r in range(world)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_sync_batchnorm_over_two_processes_is_refused_before_any_state_change():
    for outcome in _run(2):
        assert outcome.startswith("refused unchanged=True"), outcome
        assert "nn.SyncBatchNorm over 2 processes" in outcome and "not supported yet" in outcome


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_sync_batchnorm_in_a_world_of_one_runs():
    assert _run(1) == ["ran"]
