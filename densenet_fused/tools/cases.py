"""The block cases `densenet-fused cost` counts and `cost --host` times: DenseNet-121 blocks 3 and 1 at
N=128 and DenseNet-BC-100 k=12's first block at N=64, in bf16 (their shapes from bench's cases, which take
them from ``models.CONFIGS`` / ``densenet_bc_config``)."""
from dataclasses import dataclass
from typing import Dict

import torch

from .bench import densenet121_block, densenet_bc_block1


@dataclass(frozen=True)
class CostCase:
    name: str
    layers: int
    c0: int
    growth: int
    bn_size: int
    batch: int
    hw: int
    dtype: torch.dtype = torch.bfloat16  # bf16 autocast: the buffer's dtype

    @property
    def rows(self) -> int:
        return self.batch * self.hw * self.hw


def _from_bench(name: str, case) -> CostCase:
    """The cost case of one of bench's block cases (its shapes derived from ``models.CONFIGS`` /
    ``densenet_bc_config``): the configurations are written once, in modules/models.py."""
    return CostCase(name, case.layers, case.c0, case.growth, case.bn_size, case.batch, case.hw)


CASES: Dict[str, CostCase] = {c.name: c for c in (
    _from_bench("densenet121_block3", densenet121_block(3, 128)),
    _from_bench("densenet121_block1", densenet121_block(1, 128)),
    _from_bench("densenet_bc100_k12", densenet_bc_block1(100, 12, 64)),
)}
