import pytest
import torch

import oracle
from densenet_fused.ops import channel_stats

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m,c_total,c_begin,c", [(1, 3, 0, 3), (7, 13, 0, 13), (300, 50, 13, 29), (517, 37, 5, 31)])
def test_matches_oracle_on_strided_slices(device, dtype, m, c_total, c_begin, c):
    x = oracle.strided_slice(m, c_total, c_begin, c, dtype, offset=0.5, scale=2.0, device=device)
    assert x.stride() == (c_total, 1)
    mean, var, rstd = channel_stats(x, 1e-5)
    ref = oracle.channel_stats(x.cpu(), 1e-5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for got, want in zip((mean, var, rstd), ref):
        assert got.dtype == acc and got.device == x.device
        torch.testing.assert_close(got.cpu().double(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_mean_small_std_has_no_cancellation(device, dtype):
    # |mean| = 1e4 with std 1e-1: a naive E[x^2] - E[x]^2 in fp32 loses every digit of var.
    m, c = 4099, 5
    base = torch.randn(m, c, dtype=torch.float64) * 0.1 + 1e4
    x = base.to(dtype).to(device)
    _, var, _ = channel_stats(x, 0.0)
    ref_var = oracle.channel_stats(x.cpu(), 0.0)[1]
    torch.testing.assert_close(var.cpu().double(), ref_var, rtol=1e-3, atol=0)


def test_deterministic(device):
    x = torch.randn(5000, 40, device=device)
    a = channel_stats(x, 1e-5)
    b = channel_stats(x, 1e-5)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_opcheck(device):
    x = oracle.strided_slice(33, 20, 3, 11, torch.float32, device=device)
    torch.library.opcheck(torch.ops.densenet_fused.channel_stats.default, (x, 1e-5))


@pytest.mark.parametrize("bad,msg", [
    (lambda: torch.randn(2, 3, 4), "2-D"),
    (lambda: torch.randint(0, 5, (4, 3)), "float"),
    (lambda: torch.randn(3, 4).t(), "unit channel stride"),
    (lambda: torch.randn(0, 4), "at least one row"),
])
def test_bad_input(bad, msg):
    with pytest.raises(RuntimeError, match=msg):
        channel_stats(bad(), 1e-5)
