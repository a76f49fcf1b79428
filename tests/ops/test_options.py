"""The ops' named options (densenet_fused.ops.options) and the schemas they lower to."""
import re
from pathlib import Path

import pytest
import torch

import densenet_fused  # noqa: F401  (registers the ops)
from densenet_fused.ops.options import lowered

OPS = ("bn_grad_finish", "bn_scale_shift", "channel_stats", "running_stats_update", "bnrelu_conv1x1_fwd",
       "bnrelu_conv1x1_bwd", "bnrelu_conv3x3_fwd", "bnrelu_conv3x3_bwd", "bnrelu_maxpool_fwd", "bnrelu_maxpool_bwd",
       "bnrelu_avgpool_conv1x1_fwd", "bnrelu_avgpool_conv1x1_bwd", "bnrelu_global_avgpool_fwd",
       "bnrelu_global_avgpool_bwd")


@pytest.mark.parametrize("name", OPS)
def test_no_schema_takes_more_than_ten_arguments(name):
    schema = getattr(torch.ops.densenet_fused, name).default._schema
    assert len(schema.arguments) <= 10, str(schema)


def test_every_declared_op_is_listed():
    """OPS above is every op csrc/ops.cpp declares (a new op is checked too)."""
    src = (Path(__file__).resolve().parents[2] / "csrc" / "ops.cpp").read_text()
    assert set(re.findall(r'm\.def\("(\w+)\(', src)) == set(OPS)


def test_lowered_lists():
    a, b = torch.zeros(1), torch.ones(1)
    assert lowered("op", "bn", [a, b], ("scale", "shift")) == (a, b)
    assert lowered("op", "pq", None, ("P", "Q"), optional=True) == (None, None)
    assert lowered("op", "pq", [], ("P", "Q"), optional=True) == (None, None)
    with pytest.raises(RuntimeError, match=r"^op: expected pq = \[\] or \[P, Q\], got 1 tensors$"):
        lowered("op", "pq", [a], ("P", "Q"), optional=True)
    with pytest.raises(RuntimeError, match=r"^op: expected bn = \[scale, shift\], got 0 tensors$"):
        lowered("op", "bn", [], ("scale", "shift"))
