"""The demo's verdicts: float64 agreement and the float32 tolerance rule with ReLU mask flips counted."""
import torch

from densenet_fused.tools import bench as B
from densenet_fused.tools import demo

TINY = B.Case("tiny_block", "block", 2, 6, layers=3, c0=5, growth=4, bn_size=2)


def test_accuracy_of_a_small_block_meets_the_rule(no_tf32):
    acc = demo.accuracy(torch.device("cpu"), TINY)
    errors, bound = acc["errors"], acc["bound"]
    assert max(errors["fused float64 vs torchvision float64"]) <= demo.FLOAT64_TOLERANCE
    assert all(f <= b for f, b in zip(errors["fused float32 vs float64"], bound))
    tv = errors["torchvision float32 vs float64"]
    flips = errors["float64 with every near-0 mask flipped"]
    assert bound == [2 * t + demo.FLOAT32_FLOOR + f for t, f in zip(tv, flips)]
    assert acc["near_zero"] >= 0


def test_flipping_masks_flips_exactly_the_near_zero_inputs_and_restores_the_relus():
    block = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.ReLU()).double()
    torch.nn.init.ones_(block[0].weight)  # the ReLU sees x itself
    relu = block[1]
    x = torch.tensor([0.0, 1.0, -1.0, 1e-9, 0.5, -2.0], dtype=torch.float64).reshape(1, 1, 2, 3)
    grad = torch.arange(1.0, 7.0, dtype=torch.float64).reshape(1, 1, 2, 3)
    ref = demo._step(block, x, grad)
    (y, dx, _), near = demo._flipped_masks_step(block, x, grad)
    assert block[1] is relu
    assert near == 2  # 0 and 1e-9 lie within 2^-23 of the largest input (2.0)
    assert torch.equal(y, ref[0])  # the forward is unchanged
    flipped = (dx != ref[1]).flatten().tolist()
    assert flipped == [True, False, False, True, False, False]
    assert dx.flatten()[0] == grad.flatten()[0] and ref[1].flatten()[0] == 0


def test_print_accuracy_fails_a_fused_error_beyond_the_bound(capsys):
    errors = {"fused float64 vs torchvision float64": [1e-15, 1e-15, 1e-15],
              "torchvision float32 vs float64": [1e-7, 1e-6, 2e-6],
              "fused float32 vs float64": [1e-7, 1e-6, 2e-6],
              "float64 with every near-0 mask flipped": [0.0, 0.0, 0.0]}
    bound = [2 * 1e-7 + 1e-5, 2 * 1e-6 + 1e-5, 2 * 2e-6 + 1e-5]
    assert demo.print_accuracy({"errors": errors, "bound": bound, "near_zero": 0})
    errors["fused float32 vs float64"] = [1e-7, 1e-3, 2e-6]  # a real bug: 1e-3 in the input gradient
    assert not demo.print_accuracy({"errors": errors, "bound": bound, "near_zero": 0})
    assert "MISMATCH" in capsys.readouterr().out
