"""The densenet-fused command: demo, bench, train and cost.

  densenet-fused demo     the fused block against torchvision's _DenseBlock on this machine:
                          memory, step time and accuracy, side by side
  densenet-fused bench    fused against torchvision (plain, memory_efficient=True, torch.compile)
                          on a set of cases: tables on stdout, JSON and PNG plots in --out
  densenet-fused train    train a DenseNet on a CIFAR root or an ImageFolder
  densenet-fused cost     the GPU cost of a block's training step, counted on any machine:
                          kernel launches and bytes, Triton kernel resources, or host time

Every subcommand has its own --help. Bad input (an unknown case, a missing CUDA device, ...)
prints one line "densenet-fused CMD: error: ..." and exits with status 2.
"""
import argparse
import os
import sys
import textwrap

import torch

EXIT_BAD_INPUT = 2


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; each option's default (or "required") after its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or "%(default)" in text or "(default" in text:
            return text
        if action.required:
            return f"{text} (required)".strip()
        if action.default in (None, False, "", argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(parser: Parser, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")


def _names(names) -> str:
    return ", ".join(names)


# ---- demo -------------------------------------------------------------------------------------

DEMO_DESCRIPTION = """\
One training step (forward and backward) of a DenseNet-BC k=12 dense block (16 layers,
24->216 channels, 32x32; N=64 bf16 autocast on CUDA, N=8 float32 on a CPU), the fused block
against torchvision's _DenseBlock, plain and memory_efficient=True, interleaved:

  step ms                 median time of a training step (lower is better)
  saved for backward MB   bytes autograd keeps between forward and backward (any device)
  peak MB                 CUDA only: peak memory of the step above what was allocated before
  fused / X               the fused value divided by X's: below 1 favours fused

Then accuracy: float64 must agree with torchvision to rounding (1e-10); in float32 the
fused error against a float64 reference must stay within 2x torchvision's own float32 error
plus a small floor, with the ReLU inputs that lie within float32 rounding of 0 counted.
Exit status 0 when both hold, 1 when not."""


def _add_demo(sub) -> Parser:
    p = sub.add_parser("demo", help="the fused block against torchvision's on this machine: memory, time, accuracy",
                       description=DEMO_DESCRIPTION)
    p.add_argument("--device", default=_default_device(), choices=["cpu", "cuda"],
                   help="where to run (default: cuda when torch sees a CUDA device, else cpu)")
    return p


# ---- bench ------------------------------------------------------------------------------------

# `bench --quick` on CUDA: three blocks (whole models: `bench --cases densenet121_n64`, ...)
QUICK_CUDA_CASES = ("densenet121_block3_n128", "densenet121_block1_n128", "densenet_bc100_k12_block1_n64")

def _wrapped(text: str, indent: str, first: str = "") -> str:
    return textwrap.fill(text, width=96, initial_indent=first or indent, subsequent_indent=indent)


def _bench_description() -> str:
    from . import bench as B

    providers = "\n".join(_wrapped(B.PROVIDER_NOTES.get(p, ""), " " * 35, f"  {p:<32} ") for p in B.PROVIDERS)
    return ("Training steps of dense blocks and whole models, the fused implementation against\n"
            "torchvision's in one run, providers interleaved (A B A B), medians. Tables on stdout,\n"
            "JSON and PNG plots in --out.\n\nproviders:\n" + providers
            + "\n\ncases (--cases selects by substring):\n"
            + _wrapped("on CUDA: " + _names(B.CASES), "    ", "  ") + "\n"
            + _wrapped("on a CPU: " + _names(B.CPU_CASES), "    ", "  ") + "\n\n"
            + _wrapped(f"With --quick: on CUDA {_names(QUICK_CUDA_CASES)} in bf16; on a CPU the CPU cases in fp32, "
                       "without the torch.compile providers (compiling takes minutes on a CPU).", ""))


def _add_bench(sub) -> Parser:
    p = sub.add_parser("bench", help="fused against torchvision: step time and memory per case, JSON and plots",
                       description=_bench_description())
    p.add_argument("--quick", action="store_true", help="a few representative cases, few steps (see above)")
    p.add_argument("--device", default=_default_device(), choices=["cpu", "cuda"],
                   help="where to run (default: cuda when torch sees a CUDA device, else cpu)")
    p.add_argument("--out", default="bench_out", help="folder for the JSON results and the PNG plots")
    p.add_argument("--providers", default="", metavar="LIST",
                   help="comma list of providers (default: all on CUDA; on a CPU fused, fused_keep_b, "
                        "torchvision, torchvision_me, and the compile-budget ones unless --quick)")
    p.add_argument("--cases", default="", metavar="LIST", help="comma list of substrings selecting cases by name "
                   "(default: every case of the device, or the --quick ones)")
    p.add_argument("--dtypes", default="", metavar="LIST", help="comma list of fp32, bf16 (bf16: autocast) "
                   "(default: bf16 with --quick on CUDA, fp32 and bf16 on CUDA, fp32 on a CPU)")
    p.add_argument("--no-budget", action="store_true",
                   help="CUDA, full run: skip the search for the deepest model and largest batch under 8 GB")
    p.add_argument("--budget-only", action="store_true",
                   help="CUDA, full run: only that search under 8 GB, no step timings")
    p.add_argument("--tag", default="", help="suffix of the output file names (quick_cuda_TAG.json, ...)")
    return p


def _comma_list(text: str) -> list:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def _bench_plan(args, parser: Parser) -> dict:
    """The cases, dtypes, providers and repetitions of a bench run; bad values refused (exit 2)."""
    from . import bench as B

    _check_device(parser, args.device)
    cuda = args.device == "cuda"
    pool = B.CASES if cuda else B.CPU_CASES
    if args.quick:
        cases = [B.CASES[n] for n in QUICK_CUDA_CASES] if cuda else list(B.CPU_CASES.values())
        dtypes = ["bf16"] if cuda else ["fp32"]
        reps = (3, 5, 2) if cuda else (1, 1, 2)
    else:
        cases = list(pool.values())
        dtypes = ["fp32", "bf16"] if cuda else ["fp32"]
        reps = (5, 10, 2) if cuda else (2, 3, 3)
    if args.cases:
        wanted = _comma_list(args.cases)
        cases = [c for c in pool.values() if any(k in c.name for k in wanted)]
        if not cases:
            parser.error(f"--cases {args.cases!r} matches no {args.device} case; expected substrings of: "
                         + _names(pool))
    if args.dtypes:
        dtypes = _comma_list(args.dtypes)
        bad = [d for d in dtypes if d not in ("fp32", "bf16")]
        if bad or not dtypes:
            parser.error(f"--dtypes {args.dtypes!r}: expected a comma list of fp32, bf16")
    providers = _comma_list(args.providers) if args.providers else (
        list(B.PROVIDERS) if cuda else ["fused", "fused_keep_b", "torchvision", "torchvision_me"]
        + ([] if args.quick else list(B.COMPILE_BUDGETS)))
    unknown = [p for p in providers if p not in B.PROVIDERS]
    if unknown or not providers:
        parser.error(f"--providers: unknown {_names(unknown) or 'empty list'}; expected a comma list of "
                     + _names(B.PROVIDERS))
    if args.budget_only and (not cuda or args.quick):
        parser.error("--budget-only needs --device cuda and a full run (no --quick): the search caps CUDA memory")
    return {"cases": [] if args.budget_only else cases, "dtypes": dtypes, "providers": providers,
            "warmup": reps[0], "steps": reps[1], "rounds": reps[2],
            "budget": cuda and not args.quick and not args.no_budget}


def _budget_search(device: str) -> list:
    from tqdm import tqdm

    from . import bench as B

    depths = {12: [100, 190, 250, 400, 700, 1000, 1204, 1600], 40: [100, 190, 250, 400, 502, 700]}
    batches = [32, 64, 128, 256, 512, 1024]
    providers = ["fused", "torchvision", "torchvision_me"]
    rows = []
    todo = (sum(len(v) for v in depths.values()) + 2 * len(batches)) * len(providers)
    with tqdm(total=todo, desc="at an 8 GB budget", unit="step") as bar:
        for growth, ds in depths.items():
            rows += B.depth_at_budget(device, 8.0, growth, providers, ds, progress=bar)
        for name in ("densenet121_n64", "densenet_bc100_k12_block1_n64"):
            rows += B.batch_at_budget(device, 8.0, B.CASES[name], providers, batches, progress=bar)
    return rows


def bench(args, parser: Parser) -> int:
    from tqdm import tqdm

    from . import bench as B

    plan = _bench_plan(args, parser)
    env = B.environment(args.device)
    rows = []
    todo = [(c, d) for c in plan["cases"] for d in plan["dtypes"]]
    for case, dtype in tqdm(todo, desc="bench", unit="case"):
        rows += B.run_case(case, plan["providers"], args.device, dtype, plan["warmup"], plan["steps"], plan["rounds"])
    budget = _budget_search(args.device) if plan["budget"] else []
    print(B.report(rows, env))
    os.makedirs(args.out, exist_ok=True)
    name = ("quick_" + args.device if args.quick else args.device) + (f"_{args.tag}" if args.tag else "")
    path = os.path.join(args.out, name + ".json")
    B.write_json(path, env, rows, budget)
    written = B.plot(rows, budget, os.path.join(args.out, name), env)
    print("wrote", path, *written)
    return 0


# ---- cost -------------------------------------------------------------------------------------

HOST_PROCESSES, HOST_STEPS = 3, 20


def _cost_description() -> str:
    from . import cost as C

    cases = "\n".join(
        f"  {n:<22} {c.layers} layers, {c.c0}->{c.c0 + c.layers * c.growth} channels, k={c.growth}, "
        f"{c.hw}x{c.hw}, N={c.batch}" for n, c in C.CASES.items())
    return f"""\
The GPU cost of one training step (forward and backward) of a dense block on its CUDA code
path, at the case's real sizes, on any machine (no GPU needed). Three reports:

  (default)   kernel launches and bytes read and written, per layer and per step, counted on
              fake CUDA tensors (bf16 autocast, channels-last); the last line compares the
              step's bytes with the design's floor
  --kernels   compiles every Triton kernel configuration the autotuners can pick, for sm_90a
              (or --arch 80: sm_80), and reports registers, spilled bytes and shared memory
              (needs TRITON_INTERPRET unset)
  --host      measures the host (CPU) time of the CUDA code path: the block runs on meta
              tensors with the Triton kernels compiled for sm_90a and only the driver's launch
              call stubbed, against torchvision's _DenseBlock in the same harness; --processes
              processes interleaved, --steps timed steps each, medians; the last line is
              "host per step: fused X ms, torchvision Y ms, ratio R" (below 1 favours fused)

cases:
{cases}
  {C.EDGES:<22} with --kernels only: the transition, head and stem kernels
  {'all':<22} every case above (with --kernels, {C.EDGES} too)

These counts predict; on a GPU the profiler has the last word."""


def _add_cost(sub) -> Parser:
    p = sub.add_parser("cost", help="GPU launches, bytes, kernel resources or host time of a training step, "
                       "on any machine", description=_cost_description())
    p.add_argument("--case", default="densenet121_block3", help="one of the cases above, or all")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--kernels", action="store_true",
                      help="compile every Triton kernel configuration: registers, spills, shared memory")
    mode.add_argument("--host", action="store_true", help="measure the host time of a step against torchvision")
    p.add_argument("--arch", type=int, default=None, choices=[80, 90],
                   help="with --kernels: compile for sm_90a (90) or sm_80 (80) (default: 90)")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help=f"with --host: processes, interleaved (default: {HOST_PROCESSES})")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help=f"with --host: timed steps per process and implementation (default: {HOST_STEPS})")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="with --host: also write the results rows there (JSON; default: none)")
    return p


def cost(args, parser: Parser) -> int:
    from . import cost as C

    cases = list(C.CASES) + [C.EDGES, "all"]
    if args.case not in cases:
        parser.error(f"--case {args.case!r}: expected one of {_names(cases)}")
    if args.case == C.EDGES and not args.kernels:
        parser.error(f"--case {C.EDGES} needs --kernels (it compiles the transition, head and stem kernels)")
    if args.arch is not None and not args.kernels:
        parser.error("--arch applies to --kernels only")
    for name in ("processes", "steps", "out"):
        value = getattr(args, name)
        if value is not None and not args.host:
            parser.error(f"--{name} applies to --host only")
        if name != "out" and value is not None and value < 1:
            parser.error(f"--{name} {value}: expected a positive integer")
    if args.host:
        return C.main(case=args.case, kernels=False, arch=90, host=True,
                      processes=args.processes or HOST_PROCESSES, steps=args.steps or HOST_STEPS, out=args.out or "")
    return C.main(case=args.case, kernels=args.kernels, arch=args.arch or 90)


# ---- train ------------------------------------------------------------------------------------

def _add_train(sub) -> Parser:
    p_train = sub.add_parser("train", help="train a DenseNet on a CIFAR root or an ImageFolder (train/, val/)")
    from .train.config import add_arguments as add_train_arguments
    add_train_arguments(p_train)
    return p_train


# ---- the command ------------------------------------------------------------------------------

def build_parser() -> Parser:
    parser = Parser(prog="densenet-fused", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    parser.commands = {"demo": _add_demo(sub), "bench": _add_bench(sub), "train": _add_train(sub),
                       "cost": _add_cost(sub)}
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser.commands[args.cmd]
    if args.cmd == "cost":
        return cost(args, sub)
    if args.cmd == "demo":
        _check_device(sub, args.device)
        from .demo import demo
        return demo(args.device)
    if args.cmd == "bench":
        return bench(args, sub)
    from .train import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
