"""torch.profiler view of one training step of a block case, per provider (GPU).

    python benchmarks/profile_step.py OUTDIR [--case densenet121_block3_n128] [--providers a,b] [--dry-run]

Writes OUTDIR/profile_<case>.txt: per provider, the top kernels by GPU time, the number of
kernel launches, the GPU busy time (sum of kernel times), the step's wall time and the
CPU-side gap (wall - busy: time the GPU waited on the host).
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from densenet_fused.tools.bench import CASES, PROVIDERS, Runner


def _kernel_events(prof):
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def profile_provider(case, provider, steps=5):
    r = Runner(case, provider, "cuda", "bf16")
    for _ in range(3):
        r.step(record=False)
    torch.cuda.synchronize()
    if r.status != "ok":
        return f"{provider}: {r.status} {r.error}\n"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            r.step(record=False)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    kernels = _kernel_events(prof)
    busy = sum(e.device_time for e in kernels) / 1e3 / steps  # us -> ms
    by_name = {}
    for e in kernels:
        t, c = by_name.get(e.name, (0.0, 0))
        by_name[e.name] = (t + e.device_time, c + 1)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    lines = [f"== {provider}: {len(kernels) / steps:.0f} kernel launches per step, GPU busy {busy:.2f} ms, "
             f"wall {wall:.2f} ms per step (profiled), host-bound gap {wall - busy:.2f} ms"]
    lines.append(f"{'GPU ms/step':>11} {'calls/step':>10}  kernel")
    for name, (t, c) in top:
        lines.append(f"{t / 1e3 / steps:11.3f} {c / steps:10.1f}  {name[:150]}")
    r.release()
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--case", default="densenet121_block3_n128")
    ap.add_argument("--providers", default="fused,fused_aten3x3,torchvision")
    ap.add_argument("--dry-run", action="store_true", help="check the case and providers, profile nothing")
    args = ap.parse_args(argv)
    providers = args.providers.split(",")
    if args.case not in CASES or any(p not in PROVIDERS for p in providers):
        raise SystemExit(f"unknown case {args.case!r} or provider in {providers}; cases: {', '.join(CASES)}; "
                         f"providers: {', '.join(PROVIDERS)}")
    if args.dry_run:
        print(f"would profile {args.case} (bf16, 5 steps after 3): {', '.join(providers)}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    case = CASES[args.case]
    head = (f"{torch.cuda.get_device_name()} | torch {torch.__version__} | case {case.name} | bf16 autocast, "
            f"channels-last, training step = forward + backward with a preallocated grad_output\n")
    text = head + "".join(profile_provider(case, p) for p in providers)
    path = os.path.join(args.out, f"profile_{case.name}.txt")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print("wrote", path)


if __name__ == "__main__":
    sys.exit(main())
