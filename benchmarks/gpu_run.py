"""The benchmark steps of a GPU run (benchmarks/gpu_check.sh calls them).  Each appends its results to
OUT/rows.jsonl as soon as a case is done (a run killed at its time limit keeps the finished cases) and
redraws OUT/plot_steps.png / OUT/plot_depth.png from everything in it.

    python benchmarks/gpu_run.py bench  OUT --cases A,B --providers P,Q [--dtype bf16] [--warmup 3 --steps 5 --rounds 2]
    python benchmarks/gpu_run.py host   OUT --case densenet121_block3_n128 --batch 4 --providers fused,torchvision
    python benchmarks/gpu_run.py budget OUT --growth 12 --depths 100,250,400 --providers fused,torchvision
    python benchmarks/gpu_run.py merge  OUT/rows.jsonl benchmarks/results/h200.json

``--dry-run`` (bench, host, budget): check every case, provider and depth named, print what would run,
and run nothing (any machine).  ``merge`` writes one JSON in ``bench.write_json``'s layout (what
benchmarks/make_table.py reads), a provider's row of a case taken from the first run that has it (a
later run repeats fused and torchvision only as anchors of its own ratios), with the host times under
"host_time".
"""
import argparse
import dataclasses
import json
import os
import sys

from densenet_fused.tools import bench as B

ROWS, PLOT = "rows.jsonl", "plot"


def _names(text):
    return [t for t in text.split(",") if t]


def _check_providers(providers):
    bad = [p for p in providers if p not in B.PROVIDERS]
    if bad or not providers:
        raise SystemExit(f"unknown provider(s) {bad or providers}; expected some of {', '.join(B.PROVIDERS)}")


def _check_cases(cases):
    bad = [c for c in cases if c not in B.CASES]
    if bad or not cases:
        raise SystemExit(f"unknown case(s) {bad or cases}; expected some of {', '.join(B.CASES)}")


def _append(out, record):
    with open(os.path.join(out, ROWS), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_rows(path):
    """(environment of the first record, step rows, depth-at-budget rows, host-time rows) of a rows.jsonl,
    each provider's rows of a (case, dtype, mode) from the first record that has them."""
    env, rows, budget, host, seen = None, [], [], [], set()
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            env = env or rec["environment"]
            for r in rec.get("results", []):
                key = (r["case"], r["dtype"], r["mode"], r["provider"])
                if key not in seen:
                    seen.add(key)
                    rows.append(r)
            budget += rec.get("depth_at_budget", [])
            host += rec.get("host_time", [])
    return env, rows, budget, host


def _replot(out):
    _, rows, budget, _ = read_rows(os.path.join(out, ROWS))
    try:
        print("plots:", *B.plot(rows, budget, os.path.join(out, PLOT)))
    except Exception as exc:  # noqa: BLE001 - a plot never costs the numbers already written
        print(f"plot failed: {type(exc).__name__}: {exc}")


def bench(args):
    cases, providers = _names(args.cases), _names(args.providers)
    _check_cases(cases)
    _check_providers(providers)
    plan = f"{args.dtype}, warm-up {args.warmup}, {args.rounds} rounds of {args.steps} steps, interleaved"
    if args.dry_run:
        for c in cases:
            print(f"would run case {c} ({plan}): {', '.join(providers)}")
        return 0
    from tqdm import tqdm
    env = B.environment(args.device)
    for c in tqdm(cases, desc="cases", unit="case"):
        rows = B.run_case(B.CASES[c], providers, args.device, args.dtype, args.warmup, args.steps, args.rounds)
        _append(args.out, {"step": args.tag, "environment": env, "results": rows})
        print(B.format_table(rows, "step"), flush=True)
        _replot(args.out)
    return 0


def host(args):
    _check_cases([args.case])
    providers = _names(args.providers)
    _check_providers(providers)
    case = B.CASES[args.case]
    case = dataclasses.replace(case, name=case.name.rsplit("_n", 1)[0] + f"_n{args.batch}", batch=args.batch)
    if args.dry_run:
        print(f"would time the host: {case.name}, {args.dtype}, {args.rounds} rounds of {args.steps} steps: "
              f"{', '.join(providers)}")
        return 0
    rows = B.host_time(case, providers, args.device, args.dtype, args.steps, args.rounds)
    _append(args.out, {"step": "host", "environment": B.environment(args.device), "host_time": rows})
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['case']} {r['provider']}: host {r['wall_ms']:.2f} ms wall, {r['cpu_ms']:.2f} ms CPU per step")
        else:
            print(f"{r['case']} {r['provider']}: {r['status']} {r['error']}")
    return 0


def budget(args):
    providers = _names(args.providers)
    if not providers or any(p not in B.BUDGET_PROVIDERS for p in providers):
        raise SystemExit(f"the depth search builds {', '.join(B.BUDGET_PROVIDERS)}; got {providers}")
    depths = [int(d) for d in _names(args.depths)]
    bad = [d for d in depths if d < 10 or (d - 4) % 6]
    if bad or not depths:
        raise SystemExit(f"DenseNet-BC depths are 6n + 4 (n >= 1); got {bad or depths}")
    if args.dry_run:
        print(f"would search depth at {args.budget_gb:g} GB, k={args.growth}, batch {args.batch}: depths "
              f"{depths} for {', '.join(providers)}")
        return 0
    from tqdm import tqdm
    env = B.environment(args.device)
    with tqdm(total=len(depths) * len(providers), desc=f"depth at {args.budget_gb:g} GB, k={args.growth}") as bar:
        for p in providers:
            ok, failed = [], None
            for d in depths:  # one record per depth: a run stopped at its time limit keeps the depths done
                rows = B.depth_at_budget(args.device, args.budget_gb, args.growth, [p], [d], batch=args.batch,
                                         dtype=args.dtype)
                _append(args.out, {"step": f"budget_k{args.growth}", "environment": env, "depth_at_budget": rows})
                bar.update(1)
                if rows[-1]["status"] != "ok":
                    failed = f"{d} ({rows[-1]['status']}: {rows[-1].get('error', '')})"
                    bar.update(len(depths) - depths.index(d) - 1)
                    break
                ok.append(f"{d} ({rows[-1]['peak_mb']:.0f} MB)")
            tqdm.write(f"k={args.growth} {p}: deepest ok {ok[-1] if ok else '-'}, first failing {failed or '-'}")
    _replot(args.out)
    return 0


def merge(args):
    env, rows, budget_rows, host_rows = read_rows(args.rows)
    B.write_json(args.dest, env, rows, budget_rows)
    with open(args.dest) as f:
        data = json.load(f)
    data["host_time"] = host_rows
    with open(args.dest, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {args.dest}: {len(rows)} rows, {len(budget_rows)} budget rows, {len(host_rows)} host rows")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("bench", "host", "budget"):
        p = sub.add_parser(name)
        p.add_argument("out")
        p.add_argument("--providers", required=True, help="comma list of bench.PROVIDERS")
        p.add_argument("--device", default="cuda")
        p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
        p.add_argument("--dry-run", action="store_true", help="check the names, print the plan, run nothing")
    p = sub.choices["bench"]
    p.add_argument("--cases", required=True, help="comma list of bench.CASES names")
    p.add_argument("--tag", default="bench", help="the record's step name in rows.jsonl")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p = sub.choices["host"]
    p.add_argument("--case", required=True, help="a bench.CASES name; its batch is replaced by --batch")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.choices["budget"]
    p.add_argument("--growth", type=int, required=True)
    p.add_argument("--depths", required=True, help="comma list of DenseNet-BC depths (6n + 4), ascending")
    p.add_argument("--budget-gb", type=float, default=8.0)
    p.add_argument("--batch", type=int, default=64)
    p = sub.add_parser("merge")
    p.add_argument("rows", help="a rows.jsonl written by the other steps")
    p.add_argument("dest", help="the JSON to write (benchmarks/results/<gpu>.json)")
    args = ap.parse_args(argv)
    if getattr(args, "out", None) and not args.dry_run:
        os.makedirs(args.out, exist_ok=True)
    return {"bench": bench, "host": host, "budget": budget, "merge": merge}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
