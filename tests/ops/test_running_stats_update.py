import pytest
import torch
from torch import nn

from densenet_fused.ops import running_stats_update


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_batchnorm2d_over_steps(device, dtype):
    shapes = [(4, 5, 3, 2), (4, 9, 3, 2), (4, 2, 3, 2)]
    momenta = [0.1, None, 0.37]
    ref = [nn.BatchNorm2d(s[1], momentum=m).to(device, dtype).train() for s, m in zip(shapes, momenta)]
    ours = [nn.BatchNorm2d(s[1], momentum=m).to(device, dtype) for s, m in zip(shapes, momenta)]
    for step in range(3):
        xs = [torch.randn(s, dtype=dtype, device=device) * (step + 1) + step for s in shapes]
        for bn, x in zip(ref, xs):
            bn(x)
        means = [x.mean((0, 2, 3)) for x in xs]
        variances = [x.var((0, 2, 3), unbiased=False) for x in xs]
        running_stats_update(ours, means, variances, count=4 * 3 * 2)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=tol, atol=tol)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 3


def test_many_layers_in_one_call(device):
    # More layers than one CUDA launch holds.
    bns = [nn.BatchNorm2d(3).to(device) for _ in range(70)]
    means = [torch.full((3,), float(i), device=device) for i in range(70)]
    variances = [torch.ones(3, device=device) for _ in range(70)]
    running_stats_update(bns, means, variances, count=11)
    for i, bn in enumerate(bns):
        torch.testing.assert_close(bn.running_mean, torch.full((3,), 0.1 * i, device=device))
        torch.testing.assert_close(bn.running_var, torch.full((3,), 0.9 + 0.1 * 11 / 10, device=device))


def test_opcheck(device):
    rm, rv = torch.randn(4, device=device), torch.rand(4, device=device) + 1
    nbt = torch.zeros((), dtype=torch.long, device=device)
    args = ([rm], [rv], [nbt], [torch.randn(4, device=device)], [torch.rand(4, device=device)], [0.1], 10)
    torch.library.opcheck(torch.ops.densenet_fused.running_stats_update.default, args)


def test_bad_input_changes_nothing():
    bns = [nn.BatchNorm2d(4), nn.BatchNorm2d(5)]
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    with pytest.raises(RuntimeError, match="mean\\[1\\] and var\\[1\\] of 5 channels"):
        running_stats_update(bns, [torch.zeros(4), torch.zeros(4)], [torch.ones(4), torch.ones(5)], count=8)
    with pytest.raises(RuntimeError, match="count > 1"):
        running_stats_update(bns, [torch.zeros(4), torch.zeros(5)], [torch.ones(4), torch.ones(5)], count=1)
    for bn, (m, v) in zip(bns, before):
        assert torch.equal(bn.running_mean, m) and torch.equal(bn.running_var, v)
        assert int(bn.num_batches_tracked) == 0
