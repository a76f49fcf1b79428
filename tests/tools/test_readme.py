"""The README and docs/design.md: generated blocks in step with their sources (results JSON,
`train --help`), no link or pointer outside the repository, every cited design section present."""
import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def _make_table():
    spec = importlib.util.spec_from_file_location("make_table", os.path.join(ROOT, "benchmarks", "make_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _block(text, name):
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert start in text and end in text, f"README.md lacks the {name} block"
    return text[text.index(start) + len(start):text.index(end)].strip()


@pytest.mark.parametrize("name", ["headline", "results", "host-time", "train-usage"])
def test_generated_blocks_are_current(name, monkeypatch):
    """`python benchmarks/make_table.py` rewrites these; run it when this fails."""
    monkeypatch.setenv("COLUMNS", "100")
    expected = _make_table().blocks()[name].strip()
    assert _block(_read("README.md"), name) == expected, f"README.md's {name} block is stale: " \
        "run `python benchmarks/make_table.py`"


def test_every_train_option_is_in_the_readme():
    from densenet_fused.tools.cli import build_parser
    readme = _read("README.md")
    train = build_parser().commands["train"]
    for action in train._actions:
        for option in action.option_strings:
            if option not in ("-h", "--help"):
                assert option in readme, f"`densenet-fused train {option}` is not in README.md"


DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


@pytest.mark.parametrize("path", DOCS)
def test_links_stay_inside_the_repository(path):
    text = _read(path)
    assert not any(outside in text for outside in OUTSIDE)
    assert not re.search(r"\bissues? #?\d+", text, re.IGNORECASE), "names an issue of the project's tracker"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(path), target))
        assert full.startswith(ROOT + os.sep) and os.path.exists(full), f"{path}: broken link {target}"


OUTSIDE = ("DESIGN" + " section", "../" + "shared", "DESIGN" + ".md")  # (spelled apart: this file is scanned too)


def _sources():
    for pattern in ("densenet_fused/**/*.py", "csrc/**/*.*", "tests/**/*.py", "benchmarks/**/*.py", "tools/*.py"):
        yield from glob.glob(os.path.join(ROOT, pattern), recursive=True)
    yield from (os.path.join(ROOT, p) for p in ("README.md", "Makefile", "setup.py"))


def test_code_points_at_design_sections_that_exist():
    design = _read("docs/design.md")
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", design, re.MULTILINE)}
    cited = set()
    for path in _sources():
        with open(path, errors="replace") as f:
            text = " ".join(f.read().split())
        for outside in OUTSIDE:
            assert outside not in text, f"{path} points outside the repository ({outside!r})"
        for first, last in re.findall(r"docs/design\.md sections? (\d+)(?:-(\d+))?", text):
            cited.update(range(int(first), int(last or first) + 1))
    assert cited and cited <= sections, f"cited sections {sorted(cited - sections)} are not in docs/design.md"


def test_readme_times_are_filled_in():
    assert "{{" not in _read("README.md")
