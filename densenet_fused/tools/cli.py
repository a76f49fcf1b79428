"""``densenet-fused``: command-line entry point.

  densenet-fused demo  [--device cpu|cuda]       memory, time and accuracy of a fused block against
                                                 torchvision's (plain and memory_efficient), side by side
  densenet-fused bench [--quick] [--device cpu|cuda] [--out DIR]
                                                 fused vs torchvision (plain, memory_efficient, compile):
                                                 table on stdout, JSON + PNG plots in DIR
  densenet-fused train --data DIR --model NAME --epochs E --batch-size B --out OUT [...]
                                                 train a DenseNet on a CIFAR root or an ImageFolder
                                                 (see densenet_fused/tools/train.py and `train --help`)
  densenet-fused cost  [--case NAME|all] [--kernels]
                                                 GPU launches and bytes of a block's training step, counted
                                                 without a GPU (densenet_fused/tools/cost.py)
"""
import argparse
import os
import sys

import torch


def bench(args) -> int:
    import os

    from tqdm import tqdm

    from . import bench as B

    dev = args.device
    cuda = dev == "cuda"
    if args.quick:
        cases = ([B.CASES[n] for n in ("densenet121_block3_n128", "densenet121_block1_n128",
                                       "densenet_bc100_k12_block1_n64")]  # whole models: `bench --cases`
                 if cuda else list(B.CPU_CASES.values()))
        dtypes = ["bf16"] if cuda else ["fp32"]
        warmup, steps, rounds = (3, 5, 2) if cuda else (1, 1, 2)
    else:
        cases = list(B.CASES.values()) if cuda else list(B.CPU_CASES.values())
        dtypes = ["fp32", "bf16"] if cuda else ["fp32"]
        warmup, steps, rounds = (5, 10, 2) if cuda else (2, 3, 3)
    if args.cases:
        cases = [c for c in (B.CASES if cuda else B.CPU_CASES).values() if any(k in c.name for k in args.cases.split(","))]
        if not cases:
            raise SystemExit(f"no case matches {args.cases!r}; cases: {', '.join(B.CASES if cuda else B.CPU_CASES)}")
    if args.dtypes:
        dtypes = args.dtypes.split(",")
    providers = args.providers.split(",") if args.providers else (
        list(B.PROVIDERS) if cuda else ["fused", "fused_keep_b", "torchvision", "torchvision_me"]
        + ([] if args.quick else list(B.COMPILE_BUDGETS)))  # compiling on a CPU takes minutes: not in --quick
    env = B.environment(dev)
    rows = []
    if args.budget_only:
        cases = []
    for case, dtype in tqdm([(c, d) for c in cases for d in dtypes], desc="bench", unit="case"):
        rows += B.run_case(case, providers, dev, dtype, warmup, steps, rounds)
    budget = []
    if cuda and not args.quick and not args.no_budget:
        depths = {12: [100, 190, 250, 400, 700, 1000, 1204, 1600], 40: [100, 190, 250, 400, 502, 700]}
        batches = [32, 64, 128, 256, 512, 1024]
        budget_providers = ["fused", "torchvision", "torchvision_me"]
        todo = (sum(len(v) for v in depths.values()) + 2 * len(batches)) * len(budget_providers)
        with tqdm(total=todo, desc="at an 8 GB budget", unit="step") as bar:
            for growth, ds in depths.items():
                budget += B.depth_at_budget(dev, 8.0, growth, budget_providers, ds, progress=bar)
            for name in ("densenet121_n64", "densenet_bc100_k12_block1_n64"):
                budget += B.batch_at_budget(dev, 8.0, B.CASES[name], budget_providers, batches, progress=bar)
    print(f"{env['device_name']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")
    for mode in ("step", "forward", "backward"):
        print(B.format_table(rows, mode))
    os.makedirs(args.out, exist_ok=True)
    name = ("quick_" + dev if args.quick else dev) + (f"_{args.tag}" if args.tag else "")
    path = os.path.join(args.out, name + ".json")
    B.write_json(path, env, rows, budget)
    written = B.plot(rows, budget, os.path.join(args.out, name))
    print("wrote", path, *written)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="densenet-fused", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_demo = sub.add_parser("demo", help="side-by-side of a fused block against the reference")
    p_demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p_bench = sub.add_parser("bench", help="fused vs torchvision: time and memory, JSON + plots")
    p_bench.add_argument("--quick", action="store_true", help="a few representative cases")
    p_bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                         choices=["cpu", "cuda"])
    p_bench.add_argument("--out", default="bench_out", help="folder for JSON and PNG files")
    p_bench.add_argument("--providers", default="", help="comma list (default: all on CUDA, no compile on CPU)")
    p_bench.add_argument("--no-budget", action="store_true", help="skip the depth-at-a-memory-budget search")
    p_bench.add_argument("--budget-only", action="store_true", help="only the depth-at-a-memory-budget search")
    p_bench.add_argument("--cases", default="", help="comma list of substrings selecting cases by name")
    p_bench.add_argument("--dtypes", default="", help="comma list of fp32, bf16")
    p_bench.add_argument("--tag", default="", help="suffix of the output file names")
    p_train = sub.add_parser("train", help="train a DenseNet on a CIFAR root or an ImageFolder (train/, val/)")
    from .train.config import add_arguments as add_train_arguments
    add_train_arguments(p_train)
    p_cost = sub.add_parser("cost", help="GPU launches and bytes of a training step, counted without a GPU")
    p_cost.add_argument("--case", default="densenet121_block3",
                        help="densenet121_block3 (default), densenet121_block1, densenet_bc100_k12 or all")
    p_cost.add_argument("--kernels", action="store_true",
                        help="compile every Triton kernel and autotuner config for sm_90a: registers, spills, smem")
    p_cost.add_argument("--arch", type=int, default=90, choices=[80, 90],
                        help="with --kernels: compile for sm_90a (90, default) or sm_80 (80)")
    args = parser.parse_args(argv)
    if args.cmd == "cost":
        from .cost import main as cost_main
        return cost_main(args.case, args.kernels, args.arch)
    if args.cmd == "demo":
        from .demo import demo
        return demo(args.device)
    if args.cmd == "bench":
        return bench(args)
    if args.cmd == "train":
        from .train import run
        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
