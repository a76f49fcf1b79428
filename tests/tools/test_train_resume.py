"""`densenet-fused train --resume`: the same numbers as an uninterrupted run with loader workers,
a resume that changes the recorded run refused (one line, exit 2, nothing written), what may
change on resume, and the checkpoint and metrics.csv consistent after a crash between the writes."""
import os
import shutil

import pytest
import torch
from trainutil import TINY, copy_run, files, make_colors, restore_rng, train  # noqa: F401  (autouse fixture)

from densenet_fused.tools.train import read_metrics
from densenet_fused.tools.train.config import epochs_change_error, lr_factor

KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return make_colors(tmp_path_factory.mktemp("colors"))


def common(colors, workers):
    return ["--data", colors, "--batch-size", 8, *TINY, "--workers", workers]


@pytest.fixture(scope="module")
def whole(colors, tmp_path_factory):
    """Two epochs in one go, no loader workers."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert train(*common(colors, 0), "--out", out, "--epochs", 2) == 0
    return out


@pytest.fixture(scope="module")
def first(colors, tmp_path_factory):
    """One epoch (--epochs 1) with two loader workers: the run that the tests resume (copies of it)."""
    out = tmp_path_factory.mktemp("first") / "run"
    assert train(*common(colors, 2), "--out", out, "--epochs", 1) == 0
    return out


def test_resumed_run_with_workers_equals_uninterrupted_run_without(colors, whole, first, tmp_path):
    """Shuffle order from (seed, epoch), augmentation from (seed, epoch, index): --workers 2, stopped
    after epoch 1 and resumed, gives the numbers of one uninterrupted run with --workers 0."""
    split = copy_run(first, tmp_path / "split")
    assert train(*common(colors, 2), "--out", split, "--epochs", 2, "--resume") == 0
    a, b = read_metrics(whole / "metrics.csv"), read_metrics(split / "metrics.csv")
    assert [r["epoch"] for r in b] == ["1", "2"]
    for ra, rb in zip(a, b):
        for key in KEYS:  # metrics.csv keeps 6 decimals; the augmentation differs at the 2nd (0.0477 vs 0.0397)
            assert abs(float(ra[key]) - float(rb[key])) <= 2e-6, (key, ra, rb)
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (whole, split))
    for name, value in ca["model"].items():
        torch.testing.assert_close(cb["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert cb["epoch"] == 2
    assert [{k: str(r[k]) for k in ("epoch", *KEYS)} for r in cb["metrics"]] == [{k: r[k] for k in ("epoch", *KEYS)}
                                                                                  for r in b]
    before = files(split)
    assert train(*common(colors, 2), "--out", split, "--epochs", 2, "--resume") == 0  # nothing left to do
    assert files(split) == before


def _changed(colors, tmp_path):
    """Data sets that differ from `colors` in one way each."""
    renamed = shutil.copytree(colors, tmp_path / "renamed")
    for split in ("train", "val"):
        os.rename(renamed / split / "blue", renamed / split / "cyan")
    fewer = shutil.copytree(colors, tmp_path / "fewer")
    os.remove(fewer / "train" / "red" / "3.png")
    moved = shutil.copytree(colors, tmp_path / "moved")  # same names: the same list of samples
    os.rename(moved / "train" / "red" / "3.png", moved / "train" / "green" / "3x.png")
    os.rename(moved / "train" / "green" / "5.png", moved / "train" / "red" / "5x.png")
    return renamed, fewer, moved


CASES = {  # option changes -> the phrase naming what differs
    "class names": (lambda d: ["--data", d[0]], "class names (['blue', 'green', 'red'] there, ['cyan', 'green', 'red']"),
    "image count": (lambda d: ["--data", d[1]], "training images (48 there, 47 here)"),
    "sample list": (lambda d: ["--data", d[2]], "sample list"),
    "batch size": (lambda d: ["--batch-size", 4], "--batch-size (8 there, 4 here)"),
    "baseline": (lambda d: ["--baseline"], "--baseline (False there, True here)"),
    "image size": (lambda d: ["--image-size", 24], "--image-size (16 there, 24 here)"),
    "seed": (lambda d: ["--seed", 1], "--seed (0 there, 1 here)"),
    "flip": (lambda d: ["--no-flip"], "--no-flip (True there, False here)"),
}


def _apply(argv, change):
    """argv with ``change`` (an option and its value, or a flag): the value replaced or the option added."""
    argv = list(argv)
    if len(change) == 2 and change[0] in argv:
        argv[argv.index(change[0]) + 1] = change[1]
        return argv
    return argv + change


@pytest.mark.parametrize("case", list(CASES))
def test_resume_that_changes_the_run_is_refused_naming_it(case, colors, first, tmp_path, capsys):
    change, phrase = CASES[case]
    run = copy_run(first, tmp_path / "run")
    before = files(run)
    argv = _apply([*common(colors, 0), "--out", run, "--epochs", 2, "--resume"], change(_changed(colors, tmp_path)))
    assert train(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("densenet-fused train: error: --resume: this run differs"), err
    assert phrase in err and "only --epochs" in err, err
    assert files(run) == before  # nothing written


def test_epochs_change_is_accepted_only_where_the_trained_epochs_keep_their_learning_rates():
    assert lr_factor(0, 2) == 1 and lr_factor(1, 2) == pytest.approx(0.01)
    assert epochs_change_error(done=1, planned=1, epochs=2) is None  # 1 of 2: the uninterrupted 2-epoch run
    assert epochs_change_error(done=3, planned=10, epochs=20) is None  # before the first division
    why = epochs_change_error(done=2, planned=2, epochs=8)  # a finished run extended: 10x the last lr
    assert why.startswith("--epochs 8: epoch 2 ran at 0.01 x --lr (the schedule of 2 epochs), where 8 epochs "
                          "would give 1 x --lr"), why
    why = epochs_change_error(done=6, planned=10, epochs=8)  # shortened past a division that would move
    assert "epoch 5 ran at 1 x --lr" in why and "8 epochs would give 0.1 x --lr" in why, why


def test_extending_a_finished_run_is_refused_not_restarted_at_10x_the_learning_rate(colors, whole, tmp_path,
                                                                                    capsys):
    run = copy_run(whole, tmp_path / "run")
    before = files(run)
    assert train(*common(colors, 0), "--out", run, "--epochs", 8, "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume: --epochs 8: epoch 2 ran at 0.01 x --lr" in err, err
    assert files(run) == before


def test_new_lr_on_resume_is_the_base_learning_rate_from_there_on(colors, first, tmp_path, capsys):
    run = copy_run(first, tmp_path / "run")
    assert train(*common(colors, 0), "--out", run, "--epochs", 2, "--resume", "--lr", 0.05) == 0
    assert "--lr 0.05 (the checkpoint's run: 0.1): the base learning rate from epoch 2 on" in capsys.readouterr().out
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["config"]["lr"] == 0.05 and ck["scheduler"]["base_lrs"] == [0.05]
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.01)  # epoch 2 of 2: 0.01 x --lr


def test_metrics_rewritten_from_the_checkpoint_and_stale_temporary_files_removed(colors, first, tmp_path):
    """A crash after the checkpoint was replaced and before metrics.csv was: the row is in the
    checkpoint, and the resume writes metrics.csv from it; an interrupted save's .tmp files go."""
    run = copy_run(first, tmp_path / "run")
    row = read_metrics(run / "metrics.csv")
    (run / "metrics.csv").write_text("epoch,train_loss\n")  # the row lost
    (run / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    (run / "metrics.csv.tmp").write_text("epoch\n")
    assert train(*common(colors, 0), "--out", run, "--epochs", 2, "--resume") == 0
    rows = read_metrics(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == row[0]
    assert sorted(os.listdir(run)) == ["accuracy.png", "checkpoint.pt", "loss.png", "metrics.csv"]


def test_checkpoint_without_recorded_configuration_is_refused(colors, first, tmp_path, capsys):
    run = copy_run(first, tmp_path / "run")
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    del ck["format"], ck["metrics"]
    torch.save(ck, run / "checkpoint.pt")
    before = files(run)
    assert train(*common(colors, 0), "--out", run, "--epochs", 2, "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records no run configuration" in err and "--weights" in err, err
    assert files(run) == before


def test_finished_run_gets_its_last_row_back_on_resume(colors, whole, tmp_path, capsys):
    """The crash between the two writes after the last epoch: nothing left to train, the row is
    written from the checkpoint."""
    run = copy_run(whole, tmp_path / "run")
    rows = read_metrics(run / "metrics.csv")
    (run / "metrics.csv").write_text("epoch,train_loss\n")
    assert train(*common(colors, 0), "--out", run, "--epochs", 2, "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert read_metrics(run / "metrics.csv") == rows


def test_seeded_samples_draw_per_sample_and_leave_the_global_generator_alone():
    from densenet_fused.tools.train.data import SeededSamples

    class Noise(torch.utils.data.Dataset):  # an "augmentation": one draw from torch's CPU generator
        def __len__(self):
            return 100

        def __getitem__(self, index):
            return torch.rand(()).item()

    samples = SeededSamples(Noise(), seed=0)
    state = torch.get_rng_state()
    first = [samples[(2, i)] for i in range(100)]
    assert torch.equal(torch.get_rng_state(), state)
    assert [samples[(2, i)] for i in reversed(range(100))] == first[::-1]  # any order, any worker
    assert len(set(first)) == 100
    assert samples[(3, 0)] != first[0] and SeededSamples(Noise(), seed=1)[(2, 0)] != first[0]
