"""Shared by the tests of `densenet-fused train`: a small ImageFolder with a learnable signal, the
command run in-process, and the global RNGs put back after each test."""
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from densenet_fused.tools import cli

TINY = ["--model", "densenet_bc", "--depth", "10", "--growth-rate", "4", "--device", "cpu"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def restore_rng():
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


def train(*argv):
    return cli.main(["train", *map(str, argv)])


def copy_run(src, dst):
    """A copy of a finished run's OUT folder (tests change copies, never the shared run)."""
    shutil.copytree(src, dst)
    return dst


def files(folder):
    """{name: bytes} of a folder's files."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}
