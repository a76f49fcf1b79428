"""Host time of a block's training step on the CUDA code path, measured on any machine.

``densenet-fused cost --host [--case NAME]`` runs the fused block and torchvision's ``_DenseBlock``
side by side, each in its own processes (interleaved: fused, torchvision, torchvision, fused, ...),
and reports the process CPU time of a training step (forward + backward, one preallocated output
gradient) and its ratio.  The GPU is replaced, nothing above it:

- every tensor is a meta tensor (shapes, dtypes and strides; no memory, no kernel runs);
- the fused block takes its CUDA code path (``ops.launch.routing("meta")``): autograd/block.py, the autograd
  engine, the launchers, the launch seam and, on the first step with a given signature, Triton's
  binder, autotuner and compiler.  The Triton kernels are really compiled for sm_90a (H100) under a
  stand-in Triton driver whose only stubs are the GPU itself: loading a binary and the launch call
  (``utils.launch``); Triton's launcher Python (``CudaLauncher.__call__``) runs.  The autotuner's
  benchmark is stubbed too (it would time kernels): the first config that fits is taken, and its
  choices are cached in a private Triton cache directory, never the user's;
- the package's C++ CUDA ops (channel statistics, BN-gradient finish, running statistics) dispatch to
  their fake (meta) implementations: their host cost is the dispatcher's and the fake's, about what
  their real host side costs (argument checks, allocation, one launch);
- torchvision's block runs on CPU tensors of its real channel counts at the smallest spatial size
  (N=2, 2x2 pixels, float32, one thread): the same modules, autograd engine and ATen dispatch, with
  CPU kernels about as cheap as a CUDA launch's host side.  (On meta tensors torch runs much of
  torchvision's step through Python decompositions, BatchNorm's backward among them: a baseline far
  slower than its real host time, that would flatter the fused block.)  The calibration of this
  baseline against a GPU host: benchmarks/results/host_cost_calibration.md.
The fused block runs as the GPU benchmark runs it: float32 parameters and input under bf16 autocast
(CUDA's autocast state, which ``routing`` makes the modules read for meta tensors: the block computes in
bf16, casts its weights once per step and returns float32 gradients), channels-last, training mode.  The real driver's launch (``cuLaunchKernel``) is
absent from the fused side.  These numbers predict; on a GPU, the profiler has the last word.
"""
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List

HOST_CASES = ("densenet121_block3", "densenet121_block1", "densenet_bc100_k12")
PROVIDERS = ("fused", "torchvision")


# ----------------------------------------------------------------------------- the stand-in Triton driver
class _StandInUtils:
    """The part of Triton's CUDA utilities a launch reaches, with the GPU stubbed out."""

    def __init__(self, props: Dict[str, int]):
        self.props = props

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 128, 0, 1024  # module, function, registers, spills, max threads per block

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return dict(self.props)

    def launch(self, *args):  # the stub: the one call that would reach the GPU
        pass


def stand_in_driver(arch: int = 90):
    """A Triton driver for a GPU of compute capability ``arch`` that is not there (see the module
    docstring); ``triton.runtime.driver.set_active`` it, ``reset_active`` after."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia.driver import CudaLauncher

    from ..ops._triton_common import SMEM_PER_BLOCK, SMS

    utils = _StandInUtils(dict(max_shared_mem=SMEM_PER_BLOCK[arch], multiprocessor_count=SMS[arch],
                               max_num_regs=65536, warpSize=32, sm_clock_rate=1980000, mem_clock_rate=2619000,
                               mem_bus_width=5120))

    class StandInLauncher(CudaLauncher):
        """Triton's CUDA launcher (its ``__call__`` runs as is) without the C signature metadata."""

        def __init__(self, src, metadata):  # noqa: D401  (the attributes CudaLauncher.__call__ reads)
            self.gsan_enabled = False
            self.num_ctas = getattr(metadata, "num_ctas", 1)
            self.launch = utils.launch
            self.arg_annotations = self.kernel_signature = None
            self.global_scratch_size = metadata.global_scratch_size
            self.global_scratch_align = metadata.global_scratch_align
            self.profile_scratch_size = metadata.profile_scratch_size
            self.profile_scratch_align = metadata.profile_scratch_align
            self.launch_cooperative_grid = metadata.launch_cooperative_grid
            self.launch_pdl = metadata.launch_pdl

    class StandInDriver(DriverBase):
        launcher_cls = StandInLauncher

        def __init__(self):
            self.utils = utils

        @staticmethod
        def is_active():
            return True

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_device_capability(self, device=0):
            return divmod(arch, 10)

        def get_active_torch_device(self):
            import torch
            return torch.device("meta")

        def get_device_interface(self):
            raise RuntimeError("cost --host: no device interface under the stand-in driver")

        def get_benchmarker(self):
            def do_bench(kernel_call, quantiles=None, **kwargs):  # the autotuner's timing: first config wins
                return [1.0, 1.0, 1.0] if quantiles else 1.0
            return do_bench

        def get_empty_cache_for_benchmark(self):
            raise RuntimeError("cost --host: nothing to benchmark under the stand-in driver")

        def map_python_to_cpp_type(self, ty):
            raise RuntimeError("cost --host: no C launcher under the stand-in driver")

    return StandInDriver()


@contextlib.contextmanager
def stand_in(config, arch: int = 90):
    """``stand_in_driver(arch)`` active in Triton's driver ``config`` (triton.runtime.driver) within; the
    previous driver after (none on a machine without a GPU: Triton makes one when next asked)."""
    try:
        prev = config.active
    except RuntimeError:  # no GPU, no driver
        prev = None
    config.set_active(stand_in_driver(arch))
    try:
        yield
    finally:
        if prev is not None:
            config.set_active(prev)
        else:
            try:
                config.reset_active()
            except RuntimeError:
                pass


# ----------------------------------------------------------------------------- one process
@dataclass
class StepTimes:
    forward_ms: float
    backward_ms: float
    launches_forward: int   # Triton launches (fused; 0 for torchvision)
    launches_backward: int

    @property
    def step_ms(self) -> float:
        return self.forward_ms + self.backward_ms


def _setup(case, provider):
    """(block, input, output gradient) of a provider: the fused block on meta tensors at the case's shapes,
    torchvision's on small CPU tensors (module docstring)."""
    import torch

    if provider == "fused":  # float32 parameters and input, bf16 under CUDA's autocast (_cuda_autocast)
        from ..modules import FusedDenseBlock
        blk = FusedDenseBlock(case.layers, case.c0, case.bn_size, case.growth)
        dev, dtype, n, hw = "meta", torch.float32, case.batch, case.hw
    else:
        from torchvision.models.densenet import _DenseBlock
        blk = _DenseBlock(case.layers, case.c0, case.bn_size, case.growth, drop_rate=0.0, memory_efficient=False)
        dev, dtype, n, hw = "cpu", torch.float32, 2, 2
        torch.set_num_threads(1)
    blk = blk.to(device=dev, dtype=dtype, memory_format=torch.channels_last).train()
    x = torch.randn if dev == "cpu" else torch.empty
    inp = x((n, case.c0, hw, hw), device=dev, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
    c_total = case.c0 + case.layers * case.growth
    out_dtype = torch.bfloat16 if provider == "fused" else dtype  # the fused output: the autocast dtype
    grad = x((n, c_total, hw, hw), device=dev, dtype=out_dtype).to(memory_format=torch.channels_last)
    return blk, inp, grad


@contextlib.contextmanager
def _cuda_autocast(dtype):
    """CUDA's autocast state on (``dtype``) on a machine that may have no GPU (``torch.autocast("cuda")``
    disables itself there), restored on exit: with ``launch.routing("meta")`` the fused modules choose their
    compute dtype by it, as a model on the GPU under ``torch.autocast`` does."""
    import torch
    enabled, old = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", old)


def _step(blk, x, grad):
    import torch
    for p in blk.parameters():
        p.grad = None
    t0 = time.process_time_ns()
    out = blk(x)
    t1 = time.process_time_ns()
    torch.autograd.backward(out, grad)
    t2 = time.process_time_ns()
    return (t1 - t0) / 1e6, (t2 - t1) / 1e6


def _count_launches(blk, x, grad):
    """Triton launches of one forward and one backward through the launch seam (run, and counted)."""
    import torch

    from ..ops.launch import recording
    counts = [0]
    with recording(lambda *a: counts.__setitem__(0, counts[0] + 1), execute=True):
        out = blk(x)
        fwd = counts[0]
        torch.autograd.backward(out, grad)
    return fwd, counts[0] - fwd


def measure(case, provider: str, steps: int, warmup: int = 2) -> StepTimes:
    """Median host time of ``steps`` training steps of the case's block (a name of cases.CASES, or a
    CostCase) by ``provider`` in this process (the fused provider needs TRITON_INTERPRET unset)."""
    import torch

    from .cases import CASES
    if provider not in PROVIDERS:
        raise ValueError(f"cost --host: unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    blk, x, grad = _setup(CASES[case] if isinstance(case, str) else case, provider)
    with contextlib.ExitStack() as stack:
        if provider == "fused":
            import triton

            from ..ops.launch import routing
            stack.enter_context(stand_in(triton.runtime.driver))
            stack.enter_context(routing("meta"))
            stack.enter_context(_cuda_autocast(torch.bfloat16))
        for _ in range(warmup):
            _step(blk, x, grad)
        fwd, bwd = zip(*(_step(blk, x, grad) for _ in range(steps)))
        lf, lb = _count_launches(blk, x, grad) if provider == "fused" else (0, 0)
    return StepTimes(statistics.median(fwd), statistics.median(bwd), lf, lb)


# ----------------------------------------------------------------------------- several processes
def _worker_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the kernels are compiled, not interpreted
    cache = os.path.join(os.path.expanduser("~"), ".cache", "densenet_fused", "host_cost_triton")
    env["TRITON_CACHE_DIR"] = cache  # the stand-in autotuner's choices never reach the user's Triton cache
    return env


def run_process(case_name: str, provider: str, steps: int) -> StepTimes:
    cmd = [sys.executable, "-m", "densenet_fused.tools.host_cost", case_name, provider, str(steps)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env(), timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"cost --host: the {provider} process failed:\n{res.stderr[-3000:]}")
    return StepTimes(**json.loads(res.stdout.strip().splitlines()[-1]))


def compare(case_name: str, processes: int = 3, steps: int = 20, progress: bool = True) -> Dict[str, List[StepTimes]]:
    """Per provider, one StepTimes per process, the providers interleaved (A B B A A B ...)."""
    from tqdm import tqdm
    runs: Dict[str, List[StepTimes]] = {p: [] for p in PROVIDERS}
    order = [p for i in range(processes) for p in (PROVIDERS if i % 2 == 0 else PROVIDERS[::-1])]
    for provider in tqdm(order, desc=f"cost --host {case_name}", unit="process", disable=not progress):
        runs[provider].append(run_process(case_name, provider, steps))
    return runs


def report(case_name: str, runs: Dict[str, List[StepTimes]]) -> str:
    from .cases import CASES
    case = CASES[case_name]
    n = case.layers
    med = {p: StepTimes(*(statistics.median(getattr(r, f) for r in rs) for f in
                          ("forward_ms", "backward_ms", "launches_forward", "launches_backward")))
           for p, rs in runs.items()}
    lines = [f"{case.name}: {case.layers} layers, C0={case.c0}, k={case.growth}, N={case.batch}, "
             f"{case.hw}x{case.hw}, bf16, channels-last; host (CPU) time of a training step on meta tensors, "
             f"medians of {len(runs['fused'])} processes each",
             f"    {'provider':<12} {'step ms':>8} {'min-max':>13} {'fwd us/layer':>13} {'bwd us/layer':>13} "
             f"{'Triton launches/layer (fwd+bwd)':>32}"]
    for p in PROVIDERS:
        steps = [r.step_ms for r in runs[p]]
        m = med[p]
        launches = (f"{m.launches_forward / n:.1f} + {m.launches_backward / n:.1f}" if p == "fused" else "-")
        lines.append(f"    {p:<12} {statistics.median(steps):8.2f} {min(steps):6.2f}-{max(steps):<6.2f} "
                     f"{1000 * m.forward_ms / n:13.0f} {1000 * m.backward_ms / n:13.0f} {launches:>32}")
    f, t = (statistics.median(r.step_ms for r in runs[p]) for p in PROVIDERS)
    lines.append(f"host per step: fused {f:.2f} ms, torchvision {t:.2f} ms, ratio {f / t:.3f}")
    return "\n".join(lines)


def result_row(case_name: str, runs: Dict[str, List[StepTimes]]) -> dict:
    """The case's measurement as a results row (benchmarks/results/*_host_cost.json)."""
    import datetime
    import platform

    import torch
    import triton

    from .cases import CASES
    layers = CASES[case_name].layers
    row = dict(case=case_name, date=datetime.date.today().isoformat(), host=platform.processor() or platform.machine(),
               cpus=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
               triton=triton.__version__, processes=len(runs["fused"]))
    for p in PROVIDERS:
        rs = runs[p]
        row[f"{p}_step_ms"] = statistics.median(r.step_ms for r in rs)
        row[f"{p}_fwd_us_per_layer"] = 1000 * statistics.median(r.forward_ms for r in rs) / layers
        row[f"{p}_bwd_us_per_layer"] = 1000 * statistics.median(r.backward_ms for r in rs) / layers
    row["fused_triton_launches_per_layer"] = statistics.median(
        r.launches_forward + r.launches_backward for r in runs["fused"]) / layers
    row["ratio"] = row["fused_step_ms"] / row["torchvision_step_ms"]
    return row


def main(case: str = "densenet121_block3", processes: int = 3, steps: int = 20, out: str = "") -> int:
    """Print the report of a case (or of every case with "all"); with ``out``, also write the rows there
    (JSON)."""
    names = list(HOST_CASES) if case == "all" else [case]
    unknown = [n for n in names if n not in HOST_CASES]
    if unknown:
        raise ValueError(f"cost --host: unknown case {unknown[0]!r}; expected one of {', '.join(HOST_CASES)} or all")
    rows = []
    for i, name in enumerate(names):
        if i:
            print()
        runs = compare(name, processes, steps)
        rows.append(result_row(name, runs))
        print(report(name, runs), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":  # one measuring process: python -m densenet_fused.tools.host_cost CASE PROVIDER STEPS
    from dataclasses import asdict
    times = measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    print(json.dumps(asdict(times)))
