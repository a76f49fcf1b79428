"""densenet-fused demo: the headline on whatever device is there, measured side by side.

1. Memory and time of one training step of a DenseNet-BC (k=12) dense block: the fused block
   against torchvision's _DenseBlock (plain and memory_efficient=True), providers interleaved:
   bytes saved for backward (any device), peak memory (GPU), step time; the result as a sentence.
2. Accuracy by the project's tolerance rule (docs/design.md section 6): in float64 the fused block
   equals torchvision's to rounding (the algorithm is exact); in float32 the fused error against a
   float64 reference may be at most 2x torchvision's own float32 error plus a small floor. A ReLU
   input within float32 rounding of 0 can land on either side of 0 in any float32 implementation
   (its mask "flips"), which moves that pixel's gradients; the fused BN form (x*scale + shift)
   rounds differently from torchvision's, so its flips fall elsewhere. Those inputs are counted, and
   what flipping all of their masks does to the float64 gradients is added to the bound.
"""
from typing import Dict, List

import torch

from . import bench as B

PROVIDERS = ("fused", "torchvision", "torchvision_me")
NAMES = {"fused": "fused (densenet_fused)", "torchvision": "torchvision _DenseBlock",
         "torchvision_me": "torchvision memory_efficient=True"}
FLOAT64_TOLERANCE = 1e-10
FLOAT32_FLOOR = 1e-5      # the float32 floor of the tolerance rule, as in the tests
NEAR_ZERO = 2.0 ** -23    # float32 rounding, relative to the largest magnitude of a ReLU's input
QUANTITIES = ("output", "input grad", "worst param grad")


def _case(device: torch.device) -> "B.Case":
    n = 64 if device.type == "cuda" else 8
    return B.densenet_bc_block1(100, 12, n)


def _step(block, x, grad):
    """Output, input gradient and parameter gradients of one training step, as float64 copies."""
    block.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    y = block(xi)
    y.backward(grad)
    return (y.detach().double(), xi.grad.double(),
            {n: p.grad.detach().clone().double() for n, p in block.named_parameters()})


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _errors(got, ref) -> List[float]:
    y, dx, g = got
    y_r, dx_r, g_r = ref
    return [_rel(y, y_r), _rel(dx, dx_r), max(_rel(g[n], g_r[n]) for n in g_r)]


class _FlippedMaskReLU(torch.autograd.Function):
    """ReLU whose backward flips the mask of every input within float32 rounding of 0."""

    @staticmethod
    def forward(ctx, x, counter):
        near = x.abs() <= x.abs().amax() * NEAR_ZERO
        counter[0] += int(near.sum())
        ctx.save_for_backward((x > 0) ^ near)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask, None


class _FlipReLU(torch.nn.Module):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def forward(self, x):
        return _FlippedMaskReLU.apply(x, self.counter)


def _flipped_masks_step(block, x, grad):
    """``_step`` of ``block`` (float64) with every near-zero ReLU mask flipped in backward; the
    ReLU modules are put back after.  Returns the step and the number of near-zero inputs."""
    counter = [0]
    relus = [(parent, name, child) for parent in block.modules() for name, child in parent.named_children()
             if isinstance(child, torch.nn.ReLU)]
    for parent, name, _ in relus:
        setattr(parent, name, _FlipReLU(counter))
    try:
        out = _step(block, x, grad)
    finally:
        for parent, name, child in relus:
            setattr(parent, name, child)
    return out, counter[0]


def accuracy(device: torch.device, case) -> Dict[str, object]:
    """Relative errors (norm) of output, input gradient and worst parameter gradient, and the bound."""
    from torchvision.models.densenet import _DenseBlock

    from ..modules import FusedDenseBlock

    torch.manual_seed(0)
    args = (case.layers, case.c0, case.bn_size, case.growth)
    tv = _DenseBlock(*args, drop_rate=0.0).to(device).train()
    fused = FusedDenseBlock(*args).to(device).train()
    fused.load_state_dict(tv.state_dict())
    state = {k: v.clone() for k, v in tv.state_dict().items()}
    c_out = case.c0 + case.layers * case.growth
    x = torch.randn(case.batch, case.c0, case.hw, case.hw, device=device).to(memory_format=torch.channels_last)
    grad = torch.randn(case.batch, c_out, case.hw, case.hw, device=device)
    tv64 = _DenseBlock(*args, drop_rate=0.0).to(device, torch.float64).train()
    fused64 = FusedDenseBlock(*args).to(device, torch.float64).train()
    tv64.load_state_dict(state)
    fused64.load_state_dict(state)
    ref64 = _step(tv64, x.double(), grad.double())
    tv64.load_state_dict(state)  # undo the running-statistics update of that step
    flipped64, near = _flipped_masks_step(tv64, x.double(), grad.double())
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32
    try:
        errors = {
            "fused float64 vs torchvision float64": _errors(_step(fused64, x.double(), grad.double()), ref64),
            "torchvision float32 vs float64": _errors(_step(tv, x, grad), ref64),
            "fused float32 vs float64": _errors(_step(fused, x, grad), ref64),
        }
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    flips = _errors(flipped64, ref64)
    errors["float64 with every near-0 mask flipped"] = flips
    bound = [2 * t + FLOAT32_FLOOR + f for t, f in zip(errors["torchvision float32 vs float64"], flips)]
    return {"errors": errors, "bound": bound, "near_zero": near}


def memory_and_time(dev: torch.device, case) -> bool:
    """Prints the step table and the headline sentence; False when a provider failed."""
    env = B.environment(str(dev))
    cuda = dev.type == "cuda"
    dtype = "bf16" if cuda else "fp32"
    warmup, steps, rounds = (3, 10, 2) if cuda else (1, 2, 2)
    rows = B.run_case(case, PROVIDERS, str(dev), dtype, warmup, steps, rounds)
    by = {r["provider"]: r for r in rows if r["mode"] == "step"}
    print(f"\n  {'provider':<34} {'step ms':>9} {'saved for backward MB':>22}" + (f" {'peak MB':>9}" if cuda else ""))
    for p in PROVIDERS:
        r = by[p]
        if r["status"] != "ok":
            print(f"  {NAMES[p]:<34} {r['status']}: {r['error']}")
            continue
        print(f"  {NAMES[p]:<34} {r['time_ms']:9.1f} {r['saved_mb']:22.1f}" + (f" {r['peak_mb']:9.1f}" if cuda else ""))
    print("\n  step ms: median time of a training step (forward + backward), providers interleaved; lower is better\n"
          "  saved for backward MB: what autograd keeps from forward for backward (parameters included)"
          + ("\n  peak MB: the step's peak memory above what was allocated before it" if cuda else ""))
    ok = all(by[p]["status"] == "ok" for p in PROVIDERS)
    if ok:
        mem = "peak memory" if cuda else "saved-for-backward memory"
        key = "peak_ratio_fused" if cuda else "saved_ratio_fused"
        parts = [f"{by[p][key]:.2f}x the {mem} and {by[p]['time_ratio_fused']:.2f}x the step time of {NAMES[p]}"
                 for p in ("torchvision", "torchvision_me")]
        print(f"\n  On {env['device_name']}, the fused block takes\n    " + ",\n    ".join(parts)
              + "\n  (below 1 favours fused).")
    if not cuda:
        print("  (On a CPU a step is GEMM-bound: the bottleneck GEMM the fused block recomputes in backward shows\n"
              "   in its time; the memory is the point.)")
    return ok


def print_accuracy(acc: Dict[str, object]) -> bool:
    """Prints the error table and the two verdicts; True when both hold."""
    errors, bound = acc["errors"], acc["bound"]
    print(f"\n  relative error, |a - b| / |b| (norms)        {QUANTITIES[0]:>10} {QUANTITIES[1]:>11} {QUANTITIES[2]:>17}")
    for name, e in list(errors.items()) + [("float32 bound for fused (below)", bound)]:
        print(f"  {name:<44} {e[0]:10.2e} {e[1]:11.2e} {e[2]:17.2e}")
    ok64 = max(errors["fused float64 vs torchvision float64"]) <= FLOAT64_TOLERANCE
    fused32 = errors["fused float32 vs float64"]
    ok32 = all(f <= b for f, b in zip(fused32, bound))
    print(f"\n  float64: the fused algorithm equals torchvision's to rounding (<= {FLOAT64_TOLERANCE:g}): "
          f"{'OK' if ok64 else 'MISMATCH'}")
    print(f"  float32, the tolerance rule: fused error <= 2 x torchvision's float32 error + {FLOAT32_FLOOR:g}\n"
          f"  + what flipping ReLU masks moves. {acc['near_zero']} ReLU inputs of the float64 step lie within\n"
          f"  float32 rounding of 0 (2^-23 of that ReLU's largest input); their mask can flip in any float32\n"
          f"  implementation. Flipping all of their masks moves the float64 gradients by the row \"every near-0\n"
          f"  mask flipped\", which the bound adds.\n"
          f"  fused float32 within the bound for output, input grad and every param grad: {'OK' if ok32 else 'MISMATCH'}")
    return ok64 and ok32


def demo(device: str) -> int:
    dev = torch.device(device)
    case = _case(dev)
    env = B.environment(device)
    print(f"densenet_fused demo on {env['device_name']} (torch {env['torch']}, {env['date']}): DenseNet-BC k=12 "
          f"dense block, {case.layers} layers, {case.c0}->{case.c0 + case.layers * case.growth} channels, "
          f"N={case.batch}, {case.hw}x{case.hw}, {'bf16 autocast' if dev.type == 'cuda' else 'float32'}, training step")
    ran = memory_and_time(dev, case)
    accurate = print_accuracy(accuracy(dev, case))
    return 0 if ran and accurate else 1
