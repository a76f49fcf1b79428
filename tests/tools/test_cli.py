"""The command line: plain-text help that explains every option and lists every case, and one
exit status (2, one line on stderr) for bad input everywhere."""
import argparse

import pytest
import torch

from densenet_fused.tools import bench as B
from densenet_fused.tools import cli
from densenet_fused.tools import cost as C


def _parsers():
    parser = cli.build_parser()
    return {"densenet-fused": parser, **parser.commands}


def _flat(text):
    return " ".join(text.split())


def _options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", ["densenet-fused", "demo", "bench", "train", "cost"])
def test_help_is_plain_text_without_pointers_at_source_files(name):
    text = _parsers()[name].format_help()
    assert "``" not in text and ".py" not in text and "densenet_fused/" not in text, text


@pytest.mark.parametrize("name", ["demo", "bench", "cost"])
def test_every_option_is_explained(name):
    for action in _options(_parsers()[name]):
        assert action.help and len(action.help) > 10, f"{name} {action.option_strings[0]} has no help"


@pytest.mark.parametrize("name", ["demo", "bench", "train", "cost"])
def test_every_default_is_shown(name):
    parser = _parsers()[name]
    text = _flat(parser.format_help())
    for action in _options(parser):
        if action.required:
            assert f"{action.option_strings[0]}" in text
        elif action.default not in (None, False, ""):
            shown = f"default: {action.default}" in text or "(default:" in action.help
            assert shown, f"{name} {action.option_strings[0]}: default not shown"


def test_cost_help_lists_every_case_and_mode():
    text = _flat(_parsers()["cost"].format_help())
    for case in [*C.CASES, C.EDGES, "all"]:
        assert case in text
    for option in ("--kernels", "--host", "--processes", "--steps", "--arch"):
        assert option in text
    assert "host per step: fused X ms, torchvision Y ms, ratio R" in text
    assert f"default: {cli.HOST_PROCESSES}" in text and f"default: {cli.HOST_STEPS}" in text


def test_bench_help_lists_every_case_and_provider():
    text = _flat(_parsers()["bench"].format_help())
    for name in [*B.CASES, *B.CPU_CASES, *B.PROVIDERS]:
        assert name in text
    for provider in B.PROVIDERS:
        assert B.PROVIDER_NOTES[provider], f"provider {provider} is not explained"


BAD_INPUT = [
    ["cost", "--case", "bogus"],
    ["cost", "--case", "transition_head_stem"],
    ["cost", "--arch", "80"],
    ["cost", "--processes", "2"],
    ["cost", "--host", "--steps", "0"],
    ["cost", "--host", "--kernels"],
    ["cost", "--arch", "70", "--kernels"],
    ["bench", "--device", "cpu", "--cases", "no_such_case"],
    ["bench", "--device", "cpu", "--dtypes", "fp16"],
    ["bench", "--device", "cpu", "--providers", "fused,bogus"],
    ["bench", "--device", "cpu", "--budget-only"],
    ["train", "--data", "x"],
    ["no-such-command"],
    [],
] + ([["demo", "--device", "cuda"], ["bench", "--device", "cuda"]] if not torch.cuda.is_available() else [])


@pytest.mark.parametrize("argv", BAD_INPUT, ids=lambda a: " ".join(a) or "nothing")
def test_bad_input_exits_2_with_one_line(argv, capsys, monkeypatch):
    monkeypatch.setattr(C, "main", lambda **kw: pytest.fail(f"cost ran on bad input {argv}"))
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("densenet-fused") and "error:" in err, err


def test_unknown_cost_case_names_the_cases(capsys):
    with pytest.raises(SystemExit):
        cli.main(["cost", "--case", "bogus"])
    err = capsys.readouterr().err
    assert all(case in err for case in [*C.CASES, C.EDGES, "all"])


def _cost_call(monkeypatch, argv):
    seen = {}
    monkeypatch.setattr(C, "main", lambda **kw: seen.update(kw) or 0)
    assert cli.main(["cost", *argv]) == 0
    return seen


def test_cost_passes_every_option_by_name(monkeypatch):
    assert _cost_call(monkeypatch, ["--host", "--case", "densenet121_block1", "--processes", "4", "--steps", "7",
                                    "--out", "x.json"]) == \
        dict(case="densenet121_block1", kernels=False, arch=90, host=True, processes=4, steps=7, out="x.json")
    assert _cost_call(monkeypatch, ["--host"]) == \
        dict(case="densenet121_block3", kernels=False, arch=90, host=True, processes=3, steps=20, out="")
    assert _cost_call(monkeypatch, ["--kernels", "--arch", "80", "--case", C.EDGES]) == \
        dict(case=C.EDGES, kernels=True, arch=80)
    assert _cost_call(monkeypatch, []) == dict(case="densenet121_block3", kernels=False, arch=90)
