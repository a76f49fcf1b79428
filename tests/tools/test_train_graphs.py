"""`densenet-fused train --cuda-graphs`: refused with one line where it cannot run (no CUDA, several
processes), the last partial batch dropped (CPU); on a GPU, graphed steps equal eager steps by the
tolerance rule (docs/design.md section 6) and the command trains."""
import copy
import types

import pytest
import torch
import torch.nn.functional as F
from flags import tf32_disabled
from trainutil import TINY, make_colors, restore_rng, train  # noqa: F401  (autouse fixture)

from densenet_fused import densenet_bc
from densenet_fused.tools.train import load_data, read_metrics
from densenet_fused.tools.train.loop import Session, _make_loaders

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return make_colors(tmp_path_factory.mktemp("colors"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_cuda_graphs_without_cuda_is_one_line_exit_2(colors, tmp_path, capsys):
    argv = ["--data", colors, "--epochs", 1, "--batch-size", 8, "--model", "densenet_bc", "--depth", 10,
            "--out", tmp_path / "out", "--cuda-graphs"]  # no --device: cpu here
    assert train(*argv) == 2
    err = capsys.readouterr().err
    assert err == ("densenet-fused train: error: --cuda-graphs needs --device cuda: a CUDA graph captures GPU work; "
                   "CUDA is not available on this machine\n"), err
    assert not (tmp_path / "out").exists()


def test_cuda_graphs_under_torchrun_is_one_line_exit_2(colors, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # read by the checks; no process group is started
    assert train("--data", colors, "--epochs", 1, "--batch-size", 8, *TINY, "--out", tmp_path / "out",
                 "--cuda-graphs") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cuda-graphs runs in one process: under torchrun (2 processes)" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_graphs_loader_drops_the_last_partial_batch(colors, graphs):
    data = load_data(str(colors))  # 48 training images
    args = types.SimpleNamespace(seed=0, workers=0, cuda_graphs=graphs)
    plan = types.SimpleNamespace(args=args, data=data, batch_size=10, device=torch.device("cpu"))
    s = Session(plan, world=1, rank=0)
    _make_loaders(s)
    s.train_sampler.set_epoch(0)
    sizes = [len(y) for _, y in s.train_loader]
    assert sizes == ([10] * 4 if graphs else [10] * 4 + [8])
    assert len(s.train_loader) == len(sizes)


def _steps(base, batches, graphed, dtype):
    """Four SGD steps (the command's optimizer) eagerly or through GraphedStep; the model and losses."""
    from densenet_fused.tools.train.graphs import GraphedStep

    model = copy.deepcopy(base).cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    step = GraphedStep(model, dtype) if graphed else None
    losses = []
    for x, y in batches:
        if graphed:
            loss, _ = step(x, y)
        else:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, torch.tensor(losses)


def _error(model, ref, base) -> float:
    """Largest difference of the parameter updates and running statistics, relative to the
    reference's largest (a gradient-scale error, as in the block tests)."""
    def flat(m):
        start = dict(base.named_parameters())
        upd = [(p.detach().cpu().double() - start[n].detach().double()).flatten() for n, p in m.named_parameters()]
        bufs = [b.detach().cpu().double().flatten() for n, b in m.named_buffers() if "running" in n]
        return torch.cat(upd), torch.cat(bufs)
    (u, b), (u_ref, b_ref) = flat(model), flat(ref)
    return max(((u - u_ref).abs().max() / u_ref.abs().max()).item(), ((b - b_ref).abs().max() / b_ref.abs().max()).item())


@pytest.mark.gpu
@needs_cuda
def test_graphed_steps_equal_eager_steps_by_the_tolerance_rule():
    torch.manual_seed(0)
    base = densenet_bc(10, 8, num_classes=5)
    batches = [(torch.randn(16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last),
                torch.randint(0, 5, (16,), device="cuda")) for _ in range(4)]  # a new batch each replay
    with tf32_disabled():
        ref, ref_losses = _steps(base, batches, graphed=False, dtype=None)  # fp32 eager: the reference
        g32, g32_losses = _steps(base, batches, graphed=True, dtype=None)
    assert _error(g32, ref, base) <= 1e-4, "fp32 graphed vs fp32 eager"
    torch.testing.assert_close(g32_losses, ref_losses, rtol=1e-5, atol=1e-6)
    eager, eager_losses = _steps(base, batches, graphed=False, dtype=torch.bfloat16)
    graphed, graphed_losses = _steps(base, batches, graphed=True, dtype=torch.bfloat16)
    eager_err, graphed_err = _error(eager, ref, base), _error(graphed, ref, base)
    assert graphed_err <= 2 * eager_err + 1e-3, (graphed_err, eager_err)
    loss_tol = 2 * (eager_losses - ref_losses).abs().max().item() + 1e-3
    assert (graphed_losses - ref_losses).abs().max().item() <= loss_tol
    for (name, a), b in zip(graphed.named_buffers(), eager.buffers()):
        if name.endswith("num_batches_tracked"):
            assert a.item() == b.item() == 4, name  # the warm-up's statistics updates were undone


@pytest.mark.gpu
@needs_cuda
def test_train_cuda_graphs_trains_like_eager(colors, tmp_path, capsys):
    common = ["--data", colors, "--epochs", 2, "--batch-size", 8, "--model", "densenet_bc", "--depth", 10,
              "--growth-rate", 4, "--device", "cuda", "--workers", 0]  # 48 images: 6 full batches, none dropped
    assert train(*common, "--out", tmp_path / "eager") == 0
    assert train(*common, "--out", tmp_path / "graphs", "--cuda-graphs") == 0
    eager, graphs = read_metrics(tmp_path / "eager" / "metrics.csv"), read_metrics(tmp_path / "graphs" / "metrics.csv")
    assert [r["epoch"] for r in graphs] == ["1", "2"]
    for a, b in zip(eager, graphs):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) <= 0.02, (a, b)
    big = [64 if a == 8 else a for a in common]  # --batch-size 64 > 48 images: no full batch
    assert train(*big, "--out", tmp_path / "big", "--cuda-graphs") == 2
    assert "no step would run" in capsys.readouterr().err
