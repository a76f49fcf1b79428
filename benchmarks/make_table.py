"""Regenerate the README's generated blocks: the headline and the results tables from
benchmarks/results/*.json, and the train synopsis from `densenet-fused train --help`.

    python benchmarks/make_table.py            # rewrites the blocks between their markers in README.md
    python benchmarks/make_table.py --print    # prints them instead

tests/tools/test_readme.py fails when the README's blocks differ from what this script writes.
"""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = ("headline", "results", "host-time", "train-usage")
USAGE_WIDTH = 100  # the train synopsis is formatted at this width, whatever the terminal
PROVIDERS = ("fused_graphed", "fused_keep_b", "fused_aten3x3", "fused_unplanned",
             "fused_triton3x3",  # fused_triton3x3: results before it became the default
             "torchvision", "torchvision_me", "torchvision_compile", "torchvision_graphed",
             "torchvision_compile_budget0.3", "torchvision_compile_budget0.05")


# providers of older result files that the benchmark no longer has
OLD_PROVIDERS = {"fused_triton3x3": "fused with the Triton 3x3 kernels, before they became the default on CUDA "
                                    "(fused then ran the 3x3 on cuDNN)"}


def _note(provider):
    sys.path.insert(0, ROOT)
    from densenet_fused.tools.bench import PROVIDER_NOTES
    return OLD_PROVIDERS.get(provider) or PROVIDER_NOTES[provider]


def _fmt(v, spec):
    return format(v, spec) if v is not None else "-"


def table(path):
    data = json.load(open(path))
    env = data["environment"]
    rows = [r for r in data["results"] if r["mode"] == "step"]
    present = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    mem_key = "peak_mb" if any(r.get("peak_mb") for r in rows) else "saved_mb"
    mem_name = "peak MB" if mem_key == "peak_mb" else "saved-for-backward MB"
    out = [f"**{env['device_name']}** ({env['device']}), torch {env['torch']}, triton {env['triton']}, "
           f"measured {env['date']} (`{os.path.relpath(path, ROOT)}`). Training step (forward + backward), "
           f"median ms; {mem_name}; in brackets fused/provider (below 1 favours fused).", ""]
    head = "| case | dtype | fused ms | fused " + mem_name + " | " + " | ".join(
        f"{p} ms [ratio] | {p} {mem_name} [ratio]" for p in present) + " |"
    out += [head, "|" + "---|" * (4 + 2 * len(present))]
    for case, dtype in sorted({(r["case"], r["dtype"]) for r in rows}):
        get = {r["provider"]: r for r in rows if (r["case"], r["dtype"]) == (case, dtype)}
        f = get.get("fused", {})
        cells = [case, dtype, _fmt(f.get("time_ms"), ".2f") if f.get("status") == "ok" else f.get("status", "-"),
                 _fmt(f.get(mem_key), ".1f")]
        for p in present:
            r = get.get(p)
            if r is None or r["status"] != "ok":
                cells += [(r or {}).get("status", "-"), "-"]
                continue
            mem_ratio = r.get("peak_ratio_fused" if mem_key == "peak_mb" else "saved_ratio_fused")
            cells += [f"{r['time_ms']:.2f} [{_fmt(r.get('time_ratio_fused'), '.2f')}]",
                      f"{_fmt(r.get(mem_key), '.1f')} [{_fmt(mem_ratio, '.2f')}]"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Providers: " + "; ".join(f"`{p}`: {_note(p)}" for p in ["fused"] + present) + "."]
    png = os.path.splitext(path)[0] + "_steps.png"
    if os.path.exists(png):
        out += ["", f"![step time and memory per provider]({os.path.relpath(png, ROOT)})"]
    budget = data.get("depth_at_budget") or []
    depth_rows = [b for b in budget if b.get("search", "depth") == "depth"]
    if depth_rows:
        out += ["", f"Deepest DenseNet-BC (32x32, batch {depth_rows[0]['batch']}, {depth_rows[0]['dtype']}) trained "
                f"one step under a {depth_rows[0]['budget_gb']:g} GB cap:", "",
                "| provider | growth | deepest OK (params) | first failing |", "|---|---|---|---|"]
        for p, g in sorted({(b["provider"], b["growth"]) for b in depth_rows}):
            mine = [b for b in depth_rows if (b["provider"], b["growth"]) == (p, g)]
            ok = [b for b in mine if b["status"] == "ok"]
            bad = [b["depth"] for b in mine if b["status"] != "ok"]
            best = max(ok, key=lambda b: b["depth"]) if ok else None
            best_s = f"{best['depth']} ({best['params'] / 1e6:.1f}M)" if best else "-"
            out.append(f"| {p} | {g} | {best_s} | {min(bad) if bad else '-'} |")
    batch_rows = [b for b in budget if b.get("search") == "batch"]
    if batch_rows:
        out += ["", f"Largest batch trained one step under a {batch_rows[0]['budget_gb']:g} GB cap:", "",
                "| case | provider | largest OK | first failing |", "|---|---|---|---|"]
        for case, p in sorted({(b["case"], b["provider"]) for b in batch_rows}):
            mine = [b for b in batch_rows if (b["case"], b["provider"]) == (case, p)]
            ok = [b["batch"] for b in mine if b["status"] == "ok"]
            bad = [b["batch"] for b in mine if b["status"] != "ok"]
            out.append(f"| {case} | {p} | {max(ok) if ok else '-'} | {min(bad) if bad else '-'} |")
    return "\n".join(out)


def _results_files():
    """The benchmark's JSON files (`densenet-fused bench`), not the other scripts' (model_saved_bytes.py)."""
    files = []
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json"))):
        with open(path) as f:
            if "results" in json.load(f):
                files.append(path)
    return files


def headline(paths) -> str:
    """Fused against torchvision in the latest run of each device: one table row per case."""
    latest = {}
    for path in paths:
        data = json.load(open(path))
        env = data["environment"]
        if not any(r["mode"] == "step" for r in data["results"]):
            continue
        if env["device"] not in latest or env["date"] >= latest[env["device"]][0]["date"]:
            latest[env["device"]] = (env, data["results"], path)
    out = ["| device, date | training step of | memory, fused / torchvision | time, fused / torchvision |",
           "|---|---|---|---|"]
    for device in sorted(latest, key=lambda d: d != "cuda"):  # GPU first
        env, results, path = latest[device]
        for r in sorted((r for r in results if r["mode"] == "step" and r["provider"] == "torchvision"),
                        key=lambda r: r["case"]):
            peak = r.get("peak_ratio_fused")
            mem = f"{peak:.2f}x (peak)" if peak else f"{_fmt(r.get('saved_ratio_fused'), '.2f')}x (saved for backward)"
            out.append(f"| {env['device_name']}, {env['date']} | {r['case']} ({r['dtype']}) | {mem} | "
                       f"{_fmt(r.get('time_ratio_fused'), '.2f')}x |")
    return "\n".join(out)


def host_time() -> str:
    """`densenet-fused cost --host --out benchmarks/results/*_host_cost.json` rows: one table per file."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*_host_cost.json"))):
        rows = json.load(open(path))
        if not rows:
            continue
        r0 = rows[0]
        out += [f"{os.path.relpath(path, ROOT)}: {r0['host']} ({r0['cpus']} CPUs), {r0['date']}, torch {r0['torch']}, "
                f"triton {r0['triton']}, medians of {r0['processes']} processes per provider", "",
                "| case | fused ms/step | torchvision ms/step | ratio | fused us/layer fwd + bwd | "
                "Triton launches/layer |", "|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['case']} | {r['fused_step_ms']:.2f} | {r['torchvision_step_ms']:.2f} | "
                       f"{r['ratio']:.3f} | {r['fused_fwd_us_per_layer']:.0f} + {r['fused_bwd_us_per_layer']:.0f} | "
                       f"{r['fused_triton_launches_per_layer']:.1f} |")
        out.append("")
    return "\n".join(out).strip() or "No host-time results yet."


def train_usage() -> str:
    """The synopsis of `densenet-fused train --help`, at USAGE_WIDTH columns."""
    os.environ["COLUMNS"] = str(USAGE_WIDTH)
    sys.path.insert(0, ROOT)
    from densenet_fused.tools.cli import build_parser
    usage = build_parser().commands["train"].format_usage().strip()
    return "```\n" + usage.removeprefix("usage: ") + "\n```"


def blocks() -> dict:
    """{marker name: generated text} of every generated README block."""
    files = _results_files()
    return {"headline": headline(files),
            "results": "\n\n".join(table(f) for f in files) if files else "No results yet.",
            "host-time": host_time(),
            "train-usage": train_usage()}


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"make_table.py: README.md has no {start} ... {end} block")
    return text[:text.index(start) + len(start)] + "\n" + body + "\n" + text[text.index(end):]


def main():
    generated = blocks()
    if "--print" in sys.argv:
        print("\n\n".join(generated.values()))
        return
    readme = os.path.join(ROOT, "README.md")
    s = open(readme).read()
    for name, body in generated.items():
        s = replace_block(s, name, body)
    open(readme, "w").write(s)
    print("README.md regenerated: headline and results from",
          ", ".join(os.path.relpath(f, ROOT) for f in _results_files()), "and the train synopsis from --help")


if __name__ == "__main__":
    main()
