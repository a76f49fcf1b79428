"""Install what `make test` / `make demo` need into the running Python.

    python tools/install_deps.py pinned   # constraints.txt: the exact versions CI ran (default)
    python tools/install_deps.py min      # constraints-min.txt: the lowest supported set
    python tools/install_deps.py latest   # the newest versions, no pins: find the next breakage on purpose

pinned and min keep an already installed torch that meets the lower bound (as on the GPU machines,
which have torch preinstalled and no network): torch, torchvision and triton are then left alone,
the script says whether they are the versions the constraints file pins, and only what is missing
is installed, pinned. An environment without torch gets the full set of the constraints file.
Nothing to install: nothing is run. pip runs without -q, so its progress shows.
"""
import importlib.metadata as md
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the package, its tests, the demo and the benchmarks import (pyproject.toml's dependencies
# and extras), plus the build tools of `pip install --no-build-isolation -e .`.
# (A fresh venv brings an old setuptools that satisfies a bare "setuptools": the bound makes pip
# upgrade it to one that reads pyproject.toml's SPDX license.)
NEEDED = ["torch", "torchvision", "numpy", "tqdm", "matplotlib", "pytest", "pytest-benchmark", "timm",
          "scikit-learn", "pillow", "ninja", "setuptools>=77", "wheel", "build"]
TORCH_STACK = ("torch", "torchvision", "triton")
TORCH_MIN = (2, 11)  # the lower bound in pyproject.toml, tested by `make test-min`
FILES = {"pinned": "constraints.txt", "min": "constraints-min.txt"}


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


def read_pins(path):
    """{lower-case name: version} of the ``name==version`` lines of a constraints file."""
    pins = {}
    with open(path) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, _, version = line.partition("==")
                pins[name.strip().lower()] = version.strip()
    return pins


def stack_report(pins, file_name):
    """One line saying whether the installed torch stack is the one ``pins`` names."""
    installed = {n: _version(n) for n in TORCH_STACK}
    have = ", ".join(f"{n} {v}" for n, v in installed.items() if v)
    differ = [f"{n} {installed[n] or 'missing'} (pinned {pins[n]})" for n in TORCH_STACK
              if n in pins and (installed[n] or "").split("+")[0] != pins[n]]
    if not differ:
        return f"install_deps: the installed {have} are the versions {file_name} pins; kept"
    return (f"install_deps: keeping the installed {have} (torch >= {'.'.join(map(str, TORCH_MIN))}); "
            f"{file_name} pins other versions: {', '.join(differ)}; for exactly those, use a fresh "
            f"virtual environment")


def _pip(*args):
    cmd = [sys.executable, "-m", "pip", "install", *args]
    print("+", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    subprocess.check_call(cmd)
    print(f"install_deps: pip finished in {time.monotonic() - t0:.0f} s", flush=True)


def main(mode="pinned"):
    if mode not in ("pinned", "min", "latest"):
        print(f"install_deps.py: error: expected pinned, min or latest, got {mode!r}", file=sys.stderr)
        return 2
    if mode == "latest":
        _pip("--upgrade", *NEEDED)
        return 0
    pins_path = os.path.join(ROOT, FILES[mode])
    pins = read_pins(pins_path)
    torch_v = _version("torch")
    if torch_v is None or _release(torch_v) < TORCH_MIN or _version("torchvision") is None:
        print(f"install_deps: installing the {mode} set of {FILES[mode]} (torch {pins['torch']}, torchvision "
              f"{pins['torchvision']}, triton {pins['triton']}; with torch's CUDA libraries, a few GB)", flush=True)
        _pip("-c", pins_path, *NEEDED)
        return 0
    print(stack_report(pins, FILES[mode]), flush=True)
    missing = [n for n in NEEDED if _name(n) not in TORCH_STACK and not _satisfied(n)]
    if not missing:
        print("install_deps: every other dependency is installed; nothing to do", flush=True)
        return 0
    # the pins of everything but the torch stack (a pin on torch would make pip replace it)
    with open(pins_path) as f:
        kept = [line for line in f if line.split("==")[0].strip().lower() not in TORCH_STACK
                and not line.lower().startswith(("nvidia-", "cuda-"))]
    filtered = os.path.join(ROOT, "build", f"constraints-{mode}-without-torch.txt")
    os.makedirs(os.path.dirname(filtered), exist_ok=True)
    with open(filtered, "w") as f:
        f.writelines(kept)
    print(f"install_deps: installing what is missing: {', '.join(missing)}", flush=True)
    # torch named at its installed version: kept as it is, and its own requirements respected
    _pip("-c", filtered, f"torch=={torch_v}", *missing)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
