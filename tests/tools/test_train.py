"""`densenet-fused train` on the CPU: ImageFolder PNGs made here with a learnable signal (train,
bad input, options), scikit-learn's digits (a real data set a package ships), torchrun with gloo.
Resume: test_train_resume.py; the non-finite stop and unreadable images: test_train_guard.py;
--cuda-graphs: test_train_graphs.py."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from trainutil import REPO, make_colors, restore_rng, train  # noqa: F401  (restore_rng: autouse fixture)
from trainutil import TINY as TINY_ANY_WORKERS

from densenet_fused import densenet_bc
from densenet_fused.tools import cli
from densenet_fused.tools.train import METRICS_COLUMNS, read_metrics, write_digits_imagefolder

TINY = [*TINY_ANY_WORKERS, "--workers", "0"]


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return make_colors(tmp_path_factory.mktemp("colors"))


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
    assert ck["epoch"] == 3 and {"model", "optimizer", "scheduler", "rng", "config", "metrics"} <= set(ck)
    assert ck["metrics"] == rows  # the rows live in the checkpoint too
    assert ck["config"]["classes"] == ["blue", "green", "red"] and ck["config"]["train_images"] == 48
    assert ck["scheduler"]["last_epoch"] == 3
    model = densenet_bc(10, 4, num_classes=3)
    model.load_state_dict(ck["model"], strict=True)  # the package's model, state_dict-compatible
    assert sorted(os.listdir(out)) == ["accuracy.png", "checkpoint.pt", "loss.png", "metrics.csv"]


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
    (tmp_path / "a_file").write_text("")
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
        "out under a file": ([*ok, *TINY, "--out", tmp_path / "a_file" / "run"], "a_file is not a directory"),
        "negative seed": ([*ok, *TINY, "--seed", -1], "--seed -1: expected 0 or more"),
        "cuda graphs on cpu": ([*ok, *TINY, "--cuda-graphs"], "--cuda-graphs needs --device cuda"),
    }


BAD = ["missing data dir", "not a data root", "empty cifar root", "unknown model", "torchvision unknown",
       "no dense block", "bad depth",
       "depth of another model", "budget on cpu", "depth auto on cpu", "existing run",
       "resume without checkpoint", "missing weights", "out under a file", "negative seed", "cuda graphs on cpu"]


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


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_bad_input_before_anything_trains(colors, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert train("--data", colors, "--epochs", 1, "--batch-size", 8, *TINY, "--out", locked / "run") == 2
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write in" in err and str(locked) in err, err
    assert os.listdir(locked) == []


def test_every_option_has_help_and_says_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    options = out.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries = re.split(r"\n(?=  -)", "\n" + options)[1:]  # one per option: its line and its help's lines
    names = [e.split()[0].rstrip(",") for e in entries]
    assert names == ["-h", "--data", "--model", "--epochs", "--batch-size", "--out", "--device", "--lr", "--resume",
                     "--weights", "--baseline", "--depth", "--growth-rate", "--memory-budget", "--workers",
                     "--image-size", "--no-flip", "--seed", "--sync-bn", "--allow-nonfinite", "--cuda-graphs"]
    for name, entry in zip(names[1:], entries[1:]):
        words = " ".join(entry.split()[2:])  # the help text (after the option and its metavar)
        assert "default" in words or "(required" in words, (name, words)
    for phrase in ("(default: 0.1;", "What may change on resume", "--epochs   accepted when", "exit status: 0"):
        assert phrase in out, phrase


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
    assert os.path.isfile(os.path.join(REPO, "densenet_fused", "__init__.py"))  # this checkout's package
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


def test_memory_budget_searches_note_what_fits_and_refuse_nothing(monkeypatch):
    """--memory-budget's outcomes (the searches themselves need CUDA: stood in for here): the batch or
    depth found is noted; none found is bad input naming the budget."""
    from types import SimpleNamespace

    from densenet_fused.tools.train import plan

    args = SimpleNamespace(memory_budget=2.5, batch_size=16, baseline=False, model="densenet121")
    data = SimpleNamespace(image_size=32, train=range(100))
    found = {"batch": 8, "depth": 190}
    monkeypatch.setattr(plan, "search_batch", lambda *a: found["batch"])
    monkeypatch.setattr(plan, "search_depth", lambda *a: found["depth"])
    notes = []
    assert plan._budget_batch(args, "cuda", data, None, notes) == 8
    assert plan._auto_depth(args, "cuda", data, 12, notes) == 190
    assert notes == ["--memory-budget: batch 8 is the largest power of two up to 16 that fits 2.5 GB",
                     f"--depth auto: depth 190 is the deepest of {plan.AUTO_DEPTHS} that fits 2.5 GB at batch 16"]
    found.update(batch=0, depth=0)
    with pytest.raises(plan.TrainError, match=r"^--memory-budget 2.5 GB: no batch of 2 or more densenet121 "
                                              r"training steps at 32x32 fits within it$"):
        plan._budget_batch(args, "cuda", data, None, notes)
    with pytest.raises(plan.TrainError, match=r"^--memory-budget 2.5 GB: no DenseNet-BC \(k=12\) of depth >= 40 "
                                              r"trains a step of batch 16 within it$"):
        plan._auto_depth(args, "cuda", data, 12, notes)
    assert len(notes) == 2
