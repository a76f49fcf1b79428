"""`densenet-fused train` stops on a dead run and on unreadable data: a non-finite training loss or
gradient norm (exit 3, one line naming epoch and step, the last good checkpoint kept; off with
--allow-nonfinite), an image PIL cannot read (exit 2, one line naming the file)."""
import math
import re

import pytest
import torch
from trainutil import TINY, copy_run, files, make_colors, restore_rng, train  # noqa: F401  (autouse fixture)

from densenet_fused.tools.train import read_metrics
from densenet_fused.tools.train.guard import CHECK_EVERY, NonFinite, NonFiniteWatch


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return make_colors(tmp_path_factory.mktemp("colors"))


@pytest.fixture(scope="module")
def first(colors, tmp_path_factory):
    out = tmp_path_factory.mktemp("first") / "run"
    assert train("--data", colors, "--batch-size", 8, *TINY, "--workers", 0, "--out", out, "--epochs", 1) == 0
    return out


def _steps(watch, values, params):
    """Record one step per (loss, gradient) value; the gradient is written into params[0]."""
    for step, (loss, grad) in enumerate(values):
        params[0].grad = torch.full_like(params[0], grad)
        watch.record(step, torch.tensor(loss), params)


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_watch_names_the_first_non_finite_step_at_the_next_check(bad):
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    params[1].grad = torch.ones(2)
    values = [(1.0, 0.5)] * 25
    values[13] = (math.nan, 0.5) if bad == "loss" else (0.7, math.inf)  # a finite loss, an infinite gradient
    values[17] = (math.inf, math.nan)
    watch = NonFiniteWatch(steps=25, device=torch.device("cpu"))
    _steps(watch, values, params)
    assert [s for s in range(25) if watch.due(s)] == [CHECK_EVERY - 1, 2 * CHECK_EVERY - 1, 24]
    watch.check(epoch=3, upto=10)  # steps 1..10 finite: no stop
    with pytest.raises(NonFinite) as stop:
        watch.check(epoch=3, upto=20)
    assert (stop.value.epoch, stop.value.step, stop.value.steps) == (3, 14, 25)
    what = "training loss" if bad == "loss" else "gradient norm"
    assert str(stop.value).startswith(f"non-finite {what} at epoch 3, step 14 of 25 (loss "), str(stop.value)


def test_watch_records_without_synchronizing_each_step():
    """record() only writes device tensors; the one host read is in check()."""
    watch = NonFiniteWatch(steps=4, device=torch.device("meta"))
    p = torch.nn.Parameter(torch.ones(3, device="meta"))
    p.grad = torch.ones(3, device="meta")
    for step in range(4):
        watch.record(step, torch.ones((), device="meta"), [p])  # a .item() here would raise on meta tensors


def test_non_finite_run_stops_and_keeps_the_last_good_checkpoint(colors, first, tmp_path, capsys):
    run = copy_run(first, tmp_path / "run")
    before = files(run)
    # --lr may change on resume: 1e9 x 0.01 in epoch 2 blows the weights up within a few steps
    assert train("--data", colors, "--batch-size", 8, *TINY, "--workers", 0, "--out", run, "--epochs", 2,
                 "--resume", "--lr", 1e9) == 3
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert re.fullmatch(r"densenet-fused train: stopped: non-finite (training loss|gradient norm) at epoch 2, "
                        r"step [1-6] of 6 \(loss \S+, gradient norm \S+\); \S+checkpoint\.pt keeps epoch 1 "
                        r"\(pass --allow-nonfinite to train on\)", err[-1]), err[-1]
    assert not any("Traceback" in line for line in err)
    assert files(run) == before  # checkpoint, metrics and plots of epoch 1 untouched, no .tmp left


def test_allow_nonfinite_trains_on(colors, first, tmp_path):
    run = copy_run(first, tmp_path / "run")
    assert train("--data", colors, "--batch-size", 8, *TINY, "--workers", 0, "--out", run, "--epochs", 2,
                 "--resume", "--lr", 1e9, "--allow-nonfinite") == 0
    assert [r["epoch"] for r in read_metrics(run / "metrics.csv")] == ["1", "2"]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("split", ["train", "val"])
def test_unreadable_image_stops_with_one_line_naming_it(split, workers, tmp_path, capsys):
    data = make_colors(tmp_path / "data", n_train=4, n_val=2)
    bad = data / split / "green" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    out = tmp_path / "out"
    assert train("--data", data, "--batch-size", 4, *TINY, "--workers", workers, "--out", out, "--epochs", 1) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert err[-1].startswith(f"densenet-fused train: error: --data: cannot read the image {bad} (") , err[-1]
    assert not any("Traceback" in line for line in err), err
    assert not (out / "checkpoint.pt").exists()
