"""Install what `make test` / `make demo` need into the running Python.

    python tools/install_deps.py pinned   # constraints.txt: the exact versions CI ran (default)
    python tools/install_deps.py min      # constraints-min.txt: the lowest supported set
    python tools/install_deps.py latest   # the newest versions, no pins: find the next breakage on purpose

pinned and min use an already installed torch when it meets the lower bound (as on the GPU
machines, which have torch preinstalled and no network): torch, torchvision and triton are then
left alone and only what is missing is installed, pinned. A fresh environment gets the full
pinned set.
"""
import importlib.metadata as md
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the package, its tests, the demo and the benchmarks import (pyproject.toml's dependencies
# and extras), plus the build tools of `pip install --no-build-isolation -e .`.
# (A fresh venv brings an old setuptools that satisfies a bare "setuptools": the bound makes pip
# upgrade it to one that reads pyproject.toml's SPDX license.)
NEEDED = ["torch", "torchvision", "numpy", "tqdm", "matplotlib", "pytest", "pytest-benchmark", "timm",
          "scikit-learn", "pillow", "ninja", "setuptools>=77", "wheel", "build"]
TORCH_STACK = ("torch", "torchvision", "triton")
TORCH_MIN = (2, 11)  # the lower bound in pyproject.toml, tested by `make test-min`


def _version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _release(v):
    out = []
    for part in v.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _name(requirement):
    return requirement.split(">=")[0]


def _satisfied(requirement):
    name, _, low = requirement.partition(">=")
    v = _version(name)
    return v is not None and (not low or _release(v) >= _release(low))


def _pip(*args):
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def main(mode="pinned"):
    if mode not in ("pinned", "min", "latest"):
        raise SystemExit(f"install_deps.py: expected pinned, min or latest, got {mode!r}")
    if mode == "latest":
        _pip("--upgrade", *NEEDED)
        return 0
    pins = os.path.join(ROOT, "constraints.txt" if mode == "pinned" else "constraints-min.txt")
    torch_v = _version("torch")
    if torch_v is not None and _release(torch_v) >= TORCH_MIN and _version("torchvision") is not None:
        missing = [n for n in NEEDED if _name(n) not in TORCH_STACK and not _satisfied(n)]
        print(f"install_deps: using the installed torch {torch_v} and torchvision {_version('torchvision')} "
              f"(meet torch >= {'.'.join(map(str, TORCH_MIN))}); for the {mode} set of {os.path.basename(pins)}, "
              f"use a fresh virtual environment")
        if not missing:
            return 0
        # the pins of everything but the torch stack (a pin on torch would make pip replace it)
        with open(pins) as f:
            kept = [line for line in f if line.split("==")[0].strip().lower() not in TORCH_STACK
                    and not line.lower().startswith(("nvidia-", "cuda-"))]
        filtered = os.path.join(ROOT, "build", f"constraints-{mode}-without-torch.txt")
        os.makedirs(os.path.dirname(filtered), exist_ok=True)
        with open(filtered, "w") as f:
            f.writelines(kept)
        # torch named at its installed version: kept as it is, and its own requirements respected
        _pip("-c", filtered, f"torch=={torch_v}", *missing)
        return 0
    _pip("-c", pins, *NEEDED)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
