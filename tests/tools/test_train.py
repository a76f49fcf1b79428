"""`densenet-fused train` on the CPU: ImageFolder PNGs made here with a learnable signal (train,
resume, bad input), scikit-learn's digits (a real data set a package ships), torchrun with gloo."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from densenet_fused import densenet_bc
from densenet_fused.tools import cli
from densenet_fused.tools.train import METRICS_COLUMNS, read_metrics, write_digits_imagefolder

TINY = ["--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--device", "cpu", "--workers", "0"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _restore_rng():
    """The command seeds (and on --resume restores) the global RNGs: put them back after each test."""
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


def make_colors(root, n_train=16, n_val=8, size=16, seed=0):
    """Three classes: noisy images whose red, green or blue channel is the brightest."""
    rng = np.random.RandomState(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.randint(0, 140, size=(size, size, 3))
                img[..., c] += 100
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return make_colors(tmp_path_factory.mktemp("colors"))


def train(*argv):
    return cli.main(["train", *map(str, argv)])


def test_train_learns_and_writes_metrics_checkpoint_plots(colors, tmp_path):
    out = tmp_path / "run"
    assert train("--data", colors, "--out", out, "--epochs", 3, "--batch-size", 8, *TINY) == 0
    with open(out / "metrics.csv") as f:
        assert f.readline().strip() == ",".join(METRICS_COLUMNS)
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["val_acc"]) >= 0.9  # chance is 1/3
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert all(float(r["images_per_s"]) > 0 and r["peak_mem_mb"] == "" for r in rows)  # no GPU memory on the CPU
    for name in ("loss.png", "accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 3 and {"model", "optimizer", "scheduler", "rng"} <= set(ck)
    assert ck["scheduler"]["last_epoch"] == 3
    model = densenet_bc(10, 4, num_classes=3)
    model.load_state_dict(ck["model"], strict=True)  # the package's model, state_dict-compatible
    assert sorted(os.listdir(out)) == ["accuracy.png", "checkpoint.pt", "loss.png", "metrics.csv"]


def test_resume_appends_rows_and_continues_the_same_run(colors, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["--data", colors, "--batch-size", 8, *TINY]
    assert train(*common, "--out", whole, "--epochs", 2) == 0
    assert train(*common, "--out", split, "--epochs", 1) == 0
    assert len(read_metrics(split / "metrics.csv")) == 1
    assert train(*common, "--out", split, "--epochs", 2, "--resume") == 0
    a, b = read_metrics(whole / "metrics.csv"), read_metrics(split / "metrics.csv")
    assert [r["epoch"] for r in b] == ["1", "2"]
    # model, optimizer, lr schedule and RNG states restored: the same numbers as one uninterrupted run
    for ra, rb in zip(a, b):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert abs(float(ra[key]) - float(rb[key])) <= 1e-5, (key, ra, rb)
    assert torch.load(split / "checkpoint.pt", weights_only=True)["epoch"] == 2
    # nothing left to do: no new row
    assert train(*common, "--out", split, "--epochs", 2, "--resume") == 0
    assert len(read_metrics(split / "metrics.csv")) == 2


def test_baseline_checkpoint_loads_as_weights_of_the_fused_model(colors, tmp_path):
    base = tmp_path / "base"
    assert train("--data", colors, "--out", base, "--epochs", 1, "--batch-size", 8, "--baseline", *TINY) == 0
    fused = tmp_path / "fused"
    assert train("--data", colors, "--out", fused, "--epochs", 1, "--batch-size", 8,
                 "--weights", base / "checkpoint.pt", *TINY) == 0
    assert len(read_metrics(fused / "metrics.csv")) == 1


def _bad_inputs(colors, tmp_path):
    run = tmp_path / "existing"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch\n")
    (tmp_path / "flat").mkdir()
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)  # a CIFAR root without its files
    ok = ["--data", colors, "--epochs", 1, "--batch-size", 8]
    return {
        "missing data dir": (["--data", tmp_path / "nope", "--epochs", 1, "--batch-size", 8, *TINY],
                             "no such directory"),
        "not a data root": (["--data", tmp_path / "flat", "--epochs", 1, "--batch-size", 8, *TINY], "expected a CIFAR"),
        "empty cifar root": (["--data", tmp_path / "cifar", "--epochs", 1, "--batch-size", 8, *TINY],
                             "torchvision's CIFAR10 cannot read it"),
        "unknown model": ([*ok, "--model", "densenet99", "--device", "cpu"], "unknown model"),
        "torchvision unknown": ([*ok, "--model", "torchvision:nope", "--device", "cpu", "--workers", 0],
                                "torchvision cannot build"),
        "no dense block": ([*ok, "--model", "torchvision:resnet18", "--device", "cpu", "--workers", 0],
                           "no dense block"),
        "bad depth": ([*ok, "--model", "densenet_bc", "--depth", "11", "--device", "cpu"], "6n + 4"),
        "depth of another model": ([*ok, "--model", "densenet121", "--depth", "40", "--device", "cpu"],
                                   "densenet_bc only"),
        "budget on cpu": ([*ok, *TINY, "--memory-budget", 1], "needs --device cuda"),
        "depth auto on cpu": (["--data", colors, "--epochs", 1, "--batch-size", 8, "--model", "densenet_bc",
                               "--depth", "auto", "--device", "cpu", "--memory-budget", 1], "needs --device cuda"),
        "existing run": ([*ok, *TINY, "--out", run], "already holds a run"),
        "resume without checkpoint": ([*ok, *TINY, "--resume"], "no "),
        "missing weights": ([*ok, *TINY, "--weights", tmp_path / "none.pt"], "no such file"),
    }


BAD = ["missing data dir", "not a data root", "empty cifar root", "unknown model", "torchvision unknown",
       "no dense block", "bad depth",
       "depth of another model", "budget on cpu", "depth auto on cpu", "existing run",
       "resume without checkpoint", "missing weights"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(case, colors, tmp_path, capsys):
    argv, expected = _bad_inputs(colors, tmp_path)[case]
    if "--out" not in argv:
        argv = [*argv, "--out", tmp_path / "out"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert train(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("densenet-fused train: error: ") and expected in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    if case == "existing run":
        assert sorted(os.listdir(tmp_path / "existing")) == ["metrics.csv"]


def test_sync_bn_on_cpu_with_norms_outside_fused_blocks_is_bad_input(colors, tmp_path, capsys, monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) on the CPU, --sync-bn needs every BatchNorm inside fused
    blocks: DDP refuses nn.SyncBatchNorm in CPU models.  Checked before anything starts."""
    monkeypatch.setenv("WORLD_SIZE", "2")  # prepare() reads it; no process group is started
    assert train("--data", colors, "--epochs", 1, "--batch-size", 8, *TINY, "--baseline", "--sync-bn",
                 "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "--sync-bn on cpu" in err and "outside fused" in err and "features.denseblock1" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_budget_too_small_for_any_batch_is_bad_input(colors, tmp_path, capsys):
    argv = ["--data", colors, "--out", tmp_path / "out", "--epochs", 1, "--model", "densenet_bc", "--depth", 10,
            "--growth-rate", 4, "--device", "cuda", "--workers", 0, "--memory-budget", 0.0001]
    assert train(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no batch of 2 or more" in err
    assert not (tmp_path / "out").exists()


def test_digits_validation_accuracy_well_above_chance(tmp_path):
    pytest.importorskip("sklearn")
    counts = write_digits_imagefolder(tmp_path / "digits", size=32, per_class=60)
    assert counts == {"train": 480, "val": 120}
    out = tmp_path / "run"
    assert train("--data", tmp_path / "digits", "--out", out, "--epochs", 4, "--batch-size", 16, "--no-flip",
                 "--model", "densenet_bc", "--depth", 10, "--growth-rate", 8, "--device", "cpu", "--workers", 0) == 0
    rows = read_metrics(out / "metrics.csv")
    assert len(rows) == 4
    assert float(rows[-1]["val_acc"]) >= 0.3, rows  # chance is 0.1; measured 0.46


def test_torchrun_gloo_two_processes_sync_bn_rank0_writes(colors, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "densenet_fused.tools.cli", "train", "--data", str(colors), "--out", str(out), "--epochs", "2",
           "--batch-size", "8", *map(str, TINY), "--sync-bn"]  # the fused model synchronizes on gloo
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]  # one writer: one row per epoch
    assert float(rows[-1]["val_acc"]) > 1 / 3
    assert proc.stdout.count("densenet-fused train: wrote") == 1
    assert sorted(os.listdir(out)) == ["accuracy.png", "checkpoint.pt", "loss.png", "metrics.csv"]


@pytest.mark.parametrize("name", ["torchvision:densenet121", "timm:densenet121"])
def test_torchvision_and_timm_models_are_converted_and_baseline_is_not(name):
    from densenet_fused import FusedDenseBlock
    from densenet_fused.tools.train import build_model

    fused = build_model(name, num_classes=7)
    blocks = [m for m in fused.modules() if isinstance(m, FusedDenseBlock)]
    assert len(blocks) == 4 and fused.training
    assert not any(isinstance(m, FusedDenseBlock) for m in build_model(name, num_classes=7, baseline=True).modules())


def test_weights_of_another_model_are_bad_input(tmp_path):
    from densenet_fused.tools.train import TrainError, build_model

    path = tmp_path / "w.pt"
    torch.save(densenet_bc(10, 4, num_classes=5).state_dict(), path)
    build_model("densenet_bc", 5, depth=10, growth_rate=4, weights=str(path))  # matches: loads
    with pytest.raises(TrainError, match="does not match --model densenet_bc with 3 classes"):
        build_model("densenet_bc", 3, depth=10, growth_rate=4, weights=str(path))


def test_large_imagefolder_images_get_imagenet_style_224_crops(tmp_path):
    from densenet_fused.tools.train import load_data

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            img = rng.randint(0, 255, size=(90, 120, 3)).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / split / name / "0.png")
    data = load_data(str(tmp_path))
    assert (data.kind, data.classes, data.image_size) == ("ImageFolder", ["a", "b"], 224)
    assert data.train[0][0].shape == data.val[0][0].shape == (3, 224, 224)
    small = load_data(str(tmp_path), image_size=48)  # --image-size: CIFAR-style at 48x48
    assert small.train[0][0].shape == small.val[0][0].shape == (3, 48, 48)
