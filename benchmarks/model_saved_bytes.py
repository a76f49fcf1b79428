"""Activation bytes a whole DenseNet saves for backward: torchvision against densenet_fused.

One training forward per model (fp32, N=4, 224x224, on the CPU unless --device is given), counted
with torch.autograd.graph.saved_tensors_hooks, each storage once, parameters excluded (the
measure of the README's whole-model table).  Writes benchmarks/results/<device>_model_saved_bytes.json and the README table between
the markers below.

    python benchmarks/model_saved_bytes.py [--device cpu] [--batch 4] [--no-readme]
"""
import argparse
import json
import os
import sys

import torch
import torchvision
from tqdm import tqdm

import densenet_fused
from densenet_fused.tools.bench import SavedBytes, environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- model-saved-bytes:start -->", "<!-- model-saved-bytes:end -->"
MODELS = ("densenet121", "densenet169", "densenet201")


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with SavedBytes() as s:
        model(x)
    return sum(b for ptr, b in s.storages.items() if ptr not in params)


def table(data: dict) -> str:
    env = data["environment"]
    out = [f"Activation bytes saved for backward by one training forward ({env['device_name']}, torch "
           f"{env['torch']}, fp32, N={data['batch']}, 224x224, parameters excluded, each storage once; "
           f"measured {env['date']}, `benchmarks/results/{data['file']}`):", "",
           "| model | torchvision | densenet_fused | ratio |", "|---|---|---|---|"]
    for r in data["rows"]:
        out.append(f"| {r['model']} | {r['torchvision_mib']:.1f} MiB | {r['fused_mib']:.1f} MiB | "
                   f"{r['ratio']:.3f}x |")
    return "\n".join(out)


def plot(data: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = data["rows"]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([i - 0.2 for i in xs], [r["torchvision_mib"] for r in rows], 0.4, label="torchvision")
    ax.bar([i + 0.2 for i in xs], [r["fused_mib"] for r in rows], 0.4, label="densenet_fused")
    ax.set_xticks(list(xs), [r["model"] for r in rows])
    ax.set_ylabel("MiB saved for backward")
    ax.set_title(f"one training forward, fp32, N={data['batch']}, 224x224 ({data['environment']['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    rows = []
    for name in tqdm(MODELS, desc="models"):
        tv = getattr(torchvision.models, name)().to(args.device).train()
        ours = getattr(densenet_fused, name)().to(args.device).train()
        t, o = saved_bytes(tv, x), saved_bytes(ours, x)
        rows.append({"model": name, "torchvision_mib": t / 2 ** 20, "fused_mib": o / 2 ** 20, "ratio": o / t})
        del tv, ours
    dev = torch.device(args.device).type
    fname = f"{dev}_model_saved_bytes.json"
    data = {"environment": environment(args.device), "batch": args.batch, "file": fname, "rows": rows}
    with open(os.path.join(ROOT, "benchmarks", "results", fname), "w") as f:
        json.dump(data, f, indent=1)
    png = plot(data, os.path.join(ROOT, "benchmarks", "results", fname.replace(".json", ".png")))
    text = table(data) + f"\n\n![saved bytes per model]({os.path.relpath(png, ROOT)})"
    print(text)
    if not args.no_readme:
        path = os.path.join(ROOT, "README.md")
        readme = open(path).read()
        if START not in readme or END not in readme:
            print(f"README.md has no {START} ... {END} block", file=sys.stderr)
            return 1
        head, rest = readme.split(START, 1)
        _, tail = rest.split(END, 1)
        with open(path, "w") as f:
            f.write(head + START + "\n" + text + "\n" + END + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
