"""What `make` runs before building: tools/install_deps.py tells the truth about the torch it keeps,
and tools/install_editable.py rebuilds exactly when a source or the build configuration changed."""
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import install_deps  # noqa: E402
import install_editable  # noqa: E402


def _versions(monkeypatch, **versions):
    monkeypatch.setattr(install_deps, "_version", lambda name: versions.get(name))


def test_stack_report_says_when_the_installed_torch_is_the_pinned_one(monkeypatch):
    pins = install_deps.read_pins(os.path.join(ROOT, "constraints.txt"))
    _versions(monkeypatch, torch=pins["torch"] + "+cu130", torchvision=pins["torchvision"], triton=pins["triton"])
    line = install_deps.stack_report(pins, "constraints.txt")
    assert "are the versions constraints.txt pins" in line and "fresh virtual environment" not in line
    _versions(monkeypatch, torch="2.11.0", torchvision="0.26.0", triton="3.6.0")
    line = install_deps.stack_report(pins, "constraints.txt")
    assert f"torch 2.11.0 (pinned {pins['torch']})" in line and "fresh virtual environment" in line


def test_install_deps_refuses_an_unknown_set(capsys):
    assert install_deps.main("newest") == 2
    assert "expected pinned, min or latest" in capsys.readouterr().err


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A fake checkout with a built extension and a stamp as `make install` leaves them."""
    for rel in ("csrc/cpu/a.cpp", "csrc/ops.cpp", "setup.py", "pyproject.toml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("source\n")
    old = time.time() - 100
    for p in tmp_path.rglob("*"):
        os.utime(p, (old, old))
    (tmp_path / "densenet_fused").mkdir()
    (tmp_path / "densenet_fused" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    stamp = tmp_path / "build" / "editable_install.json"
    stamp.parent.mkdir()
    stamp.write_text(json.dumps(install_editable.configuration()))
    monkeypatch.setattr(install_editable, "editable_here", lambda root: True)
    return tmp_path, str(stamp)


def test_an_up_to_date_build_is_not_rebuilt(checkout):
    root, stamp = checkout
    assert install_editable.stale_reason(str(root), stamp) is None


def test_a_changed_source_rebuilds(checkout):
    root, stamp = checkout
    (root / "csrc" / "cpu" / "a.cpp").write_text("changed\n")
    assert "csrc/cpu/a.cpp" in install_editable.stale_reason(str(root), stamp)


def test_a_changed_build_switch_rebuilds(checkout, monkeypatch):
    root, stamp = checkout
    monkeypatch.setenv("DENSENET_FUSED_SKIP_CUDA", "1")
    assert "DENSENET_FUSED_SKIP_CUDA" in install_editable.stale_reason(str(root), stamp)


def test_no_extension_or_another_install_rebuilds(checkout, monkeypatch):
    root, stamp = checkout
    monkeypatch.setattr(install_editable, "editable_here", lambda r: False)
    assert "not installed in editable mode" in install_editable.stale_reason(str(root), stamp)
    monkeypatch.setattr(install_editable, "editable_here", lambda r: True)
    os.remove(stamp)
    assert "no extension built" in install_editable.stale_reason(str(root), stamp)


def test_install_editable_refuses_unknown_arguments(capsys):
    assert install_editable.main(["--fast"]) == 2
    assert "expected no argument or --force" in capsys.readouterr().err
