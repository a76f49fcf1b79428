"""Distributed use on gloo (CPU, float64): a fused block whose norms are nn.SyncBatchNorm takes its
batch statistics over the process group.  Each rank's output and input gradient must equal its
slice of the single-process full-batch result (torchvision's _DenseBlock), the parameter
gradients summed over the ranks the full-batch ones, and the running statistics after 3 steps
the full-batch ones; uneven per-rank batches included; DistributedDataParallel trains it; and the
number of collectives is what the design says (forward 1 + 2 per layer, backward 2 per layer)."""
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from densenet_fused import FusedDenseBlock, convert, convert_sync_batchnorm

torchvision = pytest.importorskip("torchvision")
from torchvision.models.densenet import _DenseBlock  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

LAYERS, C0, BN_SIZE, K = 3, 5, 2, 3
TOL = 1e-9


def _blocks(order):
    """(torchvision reference block, the distributed fused block) with the same weights, float64."""
    torch.manual_seed(0)
    ref = _DenseBlock(LAYERS, C0, BN_SIZE, K, drop_rate=0.0).double()
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    src = copy.deepcopy(ref)
    if order == "sync_then_convert":
        fused = convert(nn.SyncBatchNorm.convert_sync_batchnorm(src))
    elif order == "convert_then_sync":
        fused = nn.SyncBatchNorm.convert_sync_batchnorm(convert(src))
    else:  # the package's convert_sync_batchnorm: the norms stay BatchNorm2d (DDP accepts it on CPU)
        fused = convert_sync_batchnorm(convert(src))
        assert type(fused.denselayer1.norm1) is nn.BatchNorm2d
    assert isinstance(fused, FusedDenseBlock)
    if order != "fused_sync":
        assert isinstance(fused.denselayer1.norm1, nn.SyncBatchNorm)
    return ref.train(), fused.train()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _buffer_errs(mine, ref):
    pairs = zip(mine.named_buffers(), ref.buffers())
    return {name: _rel(b.to(torch.float64), c.to(torch.float64)) for (name, b), c in pairs}


def _trained_errs(model, ref):
    """Relative errors of the parameters and buffers of ``model`` against ``ref``'s after training."""
    errs = {name: _rel(p.detach(), q.detach()) for (name, p), q in zip(model.named_parameters(), ref.parameters())}
    errs.update(_buffer_errs(model, ref))
    return errs


def _full_batch_step(ref, opt, x, y):
    """One SGD step of the reference model on the full batch (summed cross entropy)."""
    opt.zero_grad()
    nn.functional.cross_entropy(ref(x), y, reduction="sum").backward()
    opt.step()


class _Counter:
    """Counts the collectives this process calls (patched in the spawned worker only)."""

    def __init__(self):
        self.n = 0
        self._orig = {}

    def __enter__(self):
        for name in ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast"):
            orig = getattr(dist, name)
            self._orig[name] = orig

            def counted(*a, _orig=orig, **kw):
                self.n += 1
                return _orig(*a, **kw)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def _three_steps(rank, sizes, ref, mine, run, seed, in_shape, out_shape):
    """Three steps of ``run(rank's slice of x)`` (with ``mine``'s parameters) against ``ref`` on the
    full batch, loss sum(out * wgt): relative errors of the outputs, input gradients, parameter
    gradients (summed over the ranks) and buffers; the collectives (forward, backward) per step."""
    errs = {}
    counts = []
    for step in range(3):
        gen = torch.Generator().manual_seed(seed + step)
        x = torch.randn(sum(sizes), *in_shape, generator=gen, dtype=torch.float64)
        wgt = torch.randn(sum(sizes), *out_shape, generator=gen, dtype=torch.float64)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        xr = x[lo:hi].clone().requires_grad_(True)
        xf = x.clone().requires_grad_(True)
        ref.zero_grad()
        mine.zero_grad()
        out_full = ref(xf)
        (out_full * wgt).sum().backward()
        with _Counter() as fwd:
            out = run(xr)
        with _Counter() as bwd:
            (out * wgt[lo:hi]).sum().backward()
        counts.append((fwd.n, bwd.n))
        errs[f"out{step}"] = _rel(out.detach(), out_full.detach()[lo:hi])
        errs[f"dx{step}"] = _rel(xr.grad, xf.grad[lo:hi])
        for (name, p), q in zip(mine.named_parameters(), ref.parameters()):
            g = p.grad.clone()
            dist.all_reduce(g)
            errs[f"d{name}{step}"] = _rel(g, q.grad)
    errs.update(_buffer_errs(mine, ref))
    return {"errs": errs, "counts": counts}


def _equivalence(rank, world, sizes, order):
    ref, fused = _blocks(order)
    return _three_steps(rank, sizes, ref, fused, fused, 100, (C0, 7, 5), (C0 + LAYERS * K, 7, 5))


def _ddp_step(rank, world, sizes, order):
    """Two SGD steps of DDP(stem conv -> fused block -> pool -> linear) against the same model
    trained on the full batch in this process (torchvision block, plain BatchNorm2d)."""
    torch.manual_seed(1)
    body = nn.Sequential(nn.Conv2d(3, C0, 3, padding=1, bias=False), _DenseBlock(LAYERS, C0, BN_SIZE, K, 0.0),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C0 + LAYERS * K, 4)).double()
    ref = copy.deepcopy(body)
    # DDP refuses nn.SyncBatchNorm in CPU models: the package's conversion keeps BatchNorm2d norms
    model = convert_sync_batchnorm(convert(body))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for step in range(2):
        gen = torch.Generator().manual_seed(7 + step)
        x = torch.randn(sum(sizes), 3, 6, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 4, (sum(sizes),), generator=gen)
        opt.zero_grad()
        # DDP averages the ranks' gradients: scale so the average is the full-batch sum's gradient
        (world * nn.functional.cross_entropy(ddp(x[lo:hi]), y[lo:hi], reduction="sum")).backward()
        opt.step()
        _full_batch_step(ref, ref_opt, x, y)
    return {"errs": _trained_errs(model, ref)}


def _equivalence_with_hooks(rank, world, sizes, order):
    """A hook on a dense layer makes the block run layer by layer: still synchronized."""
    ref, fused = _blocks(order)
    fired = []
    fused.denselayer2.register_forward_hook(lambda *a: fired.append(1))
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    x = torch.randn(sum(sizes), C0, 5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    xr, xf = x[lo:hi].clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, out_full = fused(xr), ref(xf)
    out.square().sum().backward()
    out_full.square().sum().backward()
    assert fired
    return {"errs": {"out": _rel(out.detach(), out_full.detach()[lo:hi]), "dx": _rel(xr.grad, xf.grad[lo:hi])}}


def _stem(rank, world, sizes, order):
    """The fused stem with an nn.SyncBatchNorm norm0 against torchvision's stem on the full batch."""
    from collections import OrderedDict

    from densenet_fused.modules.stem import fused_stem
    torch.manual_seed(2)
    ref = nn.Sequential(OrderedDict(conv0=nn.Conv2d(3, 6, 7, 2, 3, bias=False), norm0=nn.BatchNorm2d(6),
                                    relu0=nn.ReLU(inplace=True), pool0=nn.MaxPool2d(3, 2, 1))).double().train()
    with torch.no_grad():
        ref.norm0.weight.uniform_(0.5, 1.5)
        ref.norm0.bias.uniform_(-0.5, 0.5)
    mine = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    return _three_steps(rank, sizes, ref, mine, lambda x: fused_stem(x, mine.conv0, mine.norm0, mine.pool0), 30,
                        (3, 17, 15), (6, 5, 4))


def _model(rank, world, sizes, order):
    """Two SGD steps of the package's DenseNet (fused stem, blocks, transition, head) trained over the
    ranks, against torchvision's DenseNet (same weights) on the full batch in this process.
    order "fused_sync_ddp": densenet_fused.convert_sync_batchnorm + DDP (gloo); "torch_sync":
    nn.SyncBatchNorm norms everywhere (DDP refuses them on the CPU: gradients summed by hand)."""
    import densenet_fused
    torch.manual_seed(3)
    ref = torchvision.models.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=3).double()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model = densenet_fused.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=3).double()
    model.load_state_dict(ref.state_dict())
    if order == "fused_sync_ddp":
        model = convert_sync_batchnorm(model)
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        run = nn.parallel.DistributedDataParallel(model)
        scale = world  # DDP averages the ranks' gradients
    else:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        run, scale = model, 1
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    counts = []
    for step in range(2):
        gen = torch.Generator().manual_seed(50 + step)
        x = torch.randn(sum(sizes), 3, 35, 29, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (sum(sizes),), generator=gen)
        opt.zero_grad()
        with _Counter() as c:
            (scale * nn.functional.cross_entropy(run(x[lo:hi]), y[lo:hi], reduction="sum")).backward()
        counts.append(c.n)
        if order != "fused_sync_ddp":
            for p in model.parameters():
                dist.all_reduce(p.grad)
        opt.step()
        _full_batch_step(ref, ref_opt, x, y)
    return {"errs": _trained_errs(model, ref), "counts": counts}


def _eval_and_world_of_one(rank, world, sizes, order):
    """Eval mode runs no collective and uses the running statistics."""
    ref, fused = _blocks(order)
    ref.eval()
    fused.eval()
    x = torch.randn(3, C0, 4, 6, dtype=torch.float64, requires_grad=True)
    with _Counter() as c:
        out = fused(x)
        out.sum().backward()
    return {"errs": {"out": _rel(out.detach(), ref(x).detach())}, "counts": [(c.n, 0)]}


def _worker(rank, world, init_file, result_file, jobs):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: job(rank, world, sizes, order) for name, (job, sizes, order) in jobs.items()}
        torch.save(results, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def _run(world, jobs):
    """Run every job in one spawned group of ``world`` processes: {job name: [result per rank]}."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), os.path.join(tmp, "res"), jobs),
                 nprocs=world, join=True)
        per_rank = [torch.load(os.path.join(tmp, f"res.{r}")) for r in range(world)]
    return {name: [res[name] for res in per_rank] for name in jobs}


ORDERS = [((3, 3), "sync_then_convert"), ((4, 1), "convert_then_sync"), ((2, 5), "fused_sync")]


@pytest.fixture(scope="module")
def two_ranks():
    """All two-process jobs in one spawn (each spawn costs seconds of start-up)."""
    jobs = {f"equivalence_{order}": (_equivalence, sizes, order) for sizes, order in ORDERS}
    jobs["ddp"] = (_ddp_step, (2, 3), "")
    jobs["eval"] = (_eval_and_world_of_one, (3, 3), "sync_then_convert")
    jobs["hooks"] = (_equivalence_with_hooks, (3, 2), "fused_sync")
    jobs["stem"] = (_stem, (3, 2), "")
    jobs["model_ddp"] = (_model, (2, 3), "fused_sync_ddp")
    jobs["model_torch_sync"] = (_model, (3, 1), "torch_sync")
    return _run(2, jobs)


@pytest.mark.parametrize("sizes,order", ORDERS)
def test_sync_batchnorm_block_equals_the_full_batch(two_ranks, sizes, order):
    for rank, res in enumerate(two_ranks[f"equivalence_{order}"]):
        worst = max(res["errs"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, (rank, worst)
        assert {k for k in res["errs"] if k.startswith("d")} >= {"dx0", "ddenselayer3.conv2.weight2"}
        # one all_gather for the block input, two per layer (bottleneck, new channels) in forward;
        # backward: BN2's sums and the new channels' P, Q per layer (none for the last layer's,
        # which no layer reads), and the block input's P, Q
        assert res["counts"] == [(1 + 2 * LAYERS, LAYERS + (LAYERS - 1) + 1)] * 3, res["counts"]


def test_ddp_trains_the_sync_batchnorm_model_as_the_full_batch(two_ranks):
    for rank, res in enumerate(two_ranks["ddp"]):
        worst = max(res["errs"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, (rank, worst)


def test_eval_mode_runs_no_collective(two_ranks):
    for res in two_ranks["eval"]:
        assert res["errs"]["out"] < TOL
        assert res["counts"] == [(0, 0)]


def test_hooked_layers_keep_the_synchronized_statistics(two_ranks):
    for res in two_ranks["hooks"]:
        assert max(res["errs"].values()) < TOL, res["errs"]


def test_stem_with_sync_batchnorm_equals_the_full_batch(two_ranks):
    for rank, res in enumerate(two_ranks["stem"]):
        worst = max(res["errs"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, (rank, worst)
        assert res["counts"] == [(1, 1)] * 3  # one all_gather forward, one all_reduce backward


@pytest.mark.parametrize("job", ["model_ddp", "model_torch_sync"])
def test_whole_model_with_fused_stem_transitions_head_trains_as_the_full_batch(two_ranks, job):
    for rank, res in enumerate(two_ranks[job]):
        worst = max(res["errs"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, (rank, worst)
        assert len(res["errs"]) > 40  # every parameter and buffer compared


def test_world_of_one_runs_without_collectives():
    res = _run(1, {"one": (_equivalence, (4,), "sync_then_convert")})["one"][0]
    assert max(res["errs"].values()) < TOL
    # (the test's own all_reduce of parameter gradients is outside the counted calls)
    assert res["counts"] == [(0, 0)] * 3


def test_convert_sync_batchnorm_marks_fused_blocks_and_converts_other_norms():
    model = nn.Sequential(nn.BatchNorm2d(4), FusedDenseBlock(2, 4, 2, 3))
    out = convert_sync_batchnorm(model)
    assert out is model and isinstance(model[0], nn.SyncBatchNorm)
    assert type(model[1].denselayer2.norm2) is nn.BatchNorm2d
    assert model[1].sync_group is not None and model[1].denselayer2.sync_group is model[1].sync_group


def test_mixed_norms_are_refused_before_any_state_change():
    block = FusedDenseBlock(2, 4, 2, 3)
    block.denselayer2.norm2 = nn.SyncBatchNorm(6)
    before = block.denselayer1.norm1.running_mean.clone()
    with pytest.raises(ValueError, match="all norms to be nn.SyncBatchNorm or none"):
        block(torch.randn(2, 4, 3, 3))
    assert torch.equal(before, block.denselayer1.norm1.running_mean)
