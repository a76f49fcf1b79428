"""`make install`: install this checkout in editable mode, unless the installed build is up to date.

    python tools/install_editable.py          # what `make install` (so `make test`, `make demo`) runs
    python tools/install_editable.py --force  # build and install again in any case

`pip install --no-build-isolation --no-deps -e .` compiles every C++ and CUDA source again each time
it runs (its build folder is a new temporary one: minutes on a 2-core machine), so it is skipped when
all of these hold:
- this Python has densenet_fused installed in editable mode from this checkout;
- the compiled extension (densenet_fused/_C*.so) and the stamp this script writes after a build
  (build/editable_install.json) are newer than every file under csrc/, setup.py and pyproject.toml;
- the stamp's configuration is today's: Python, torch version, nvcc found, and the build switches
  DENSENET_FUSED_SKIP_CUDA, DENSENET_FUSED_FORCE_CUDA, TORCH_CUDA_ARCH_LIST, CUDA_HOME.
Otherwise pip runs verbose, so the compile shows its progress (ninja's [n/N] lines).
"""
import glob
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import time
from urllib.parse import unquote, urlparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = os.path.join(ROOT, "build", "editable_install.json")
SWITCHES = ("DENSENET_FUSED_SKIP_CUDA", "DENSENET_FUSED_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME")


def configuration() -> dict:
    """What the build depends on besides its sources."""
    try:
        torch_v = md.version("torch")
    except md.PackageNotFoundError:
        torch_v = None
    return {"python": sys.executable, "torch": torch_v, "nvcc": shutil.which("nvcc"),
            **{k: os.environ.get(k) for k in SWITCHES}}


def sources(root: str = ROOT) -> list:
    return (glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True)
            + [os.path.join(root, "setup.py"), os.path.join(root, "pyproject.toml")])


def editable_here(root: str = ROOT) -> bool:
    """densenet_fused is installed in this Python in editable mode from ``root``."""
    try:
        info = json.loads(md.distribution("densenet_fused").read_text("direct_url.json") or "{}")
    except md.PackageNotFoundError:
        return False
    url = urlparse(info.get("url", ""))
    return bool(info.get("dir_info", {}).get("editable")) and url.scheme == "file" and \
        os.path.realpath(unquote(url.path)) == os.path.realpath(root)


def stale_reason(root: str = ROOT, stamp: str = STAMP):
    """None when the installed build is up to date, else why it is not (one phrase)."""
    if not editable_here(root):
        return "densenet_fused is not installed in editable mode from this checkout in this Python"
    built = glob.glob(os.path.join(root, "densenet_fused", "_C*.so"))
    if not built or not os.path.exists(stamp):
        return "no extension built by `make install` here yet"
    with open(stamp) as f:
        recorded = json.load(f)
    now = configuration()
    changed = [k for k in now if recorded.get(k) != now[k]]
    if changed:
        return "the build configuration changed: " + ", ".join(
            f"{k} {recorded.get(k)!r} -> {now[k]!r}" for k in changed)
    oldest = min(os.path.getmtime(p) for p in built + [stamp])
    newer = [os.path.relpath(p, root) for p in sources(root) if os.path.isfile(p) and os.path.getmtime(p) > oldest]
    if newer:
        return f"{len(newer)} source file(s) changed since the last build, e.g. {newer[0]}"
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--force"]):
        print(f"install_editable.py: error: expected no argument or --force, got {' '.join(argv)}", file=sys.stderr)
        return 2
    reason = "--force" if argv else stale_reason()
    if reason is None:
        print("install: the installed editable build is up to date (newer than every csrc/ file, setup.py and "
              "pyproject.toml; same torch and build switches): not rebuilding", flush=True)
        return 0
    print(f"install: building the extension, because {reason} (CUDA sources too where nvcc is found and torch "
          "is a CUDA build, unless DENSENET_FUSED_SKIP_CUDA=1, which `make CPU_ONLY=1` sets)", flush=True)
    if os.path.exists(STAMP):
        os.remove(STAMP)
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", ROOT]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)
    os.makedirs(os.path.dirname(STAMP), exist_ok=True)
    with open(STAMP, "w") as f:
        json.dump(configuration(), f, indent=1)
    print(f"install: built and installed in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
