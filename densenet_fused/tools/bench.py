"""Benchmark harness: fused block/model against torchvision (plain, memory_efficient=True,
torch.compile), side by side in one run.

Time: median of per-step timings (CUDA events on a GPU, perf_counter on the CPU) after
warm-up, providers interleaved (A B A B ...) over several rounds, so ratios come from one
run.  Memory (CUDA): peak allocated during one training step minus the allocation before
it, with a preallocated grad_output (no loss transients).  Saved bytes: the distinct
storages autograd keeps for backward (``saved_tensors_hooks``), parameters included.
Out-of-memory is a result ("oom"), not a crash.

Graphed providers: ``fused_graphed`` is the fused module with its training step captured as CUDA
graphs by ``torch.cuda.make_graphed_callables`` (a forward graph and a backward graph, captured once
after three warm-up steps that also run Triton's autotuning, then replayed); ``torchvision_graphed``
is ``torch.compile(mode="reduce-overhead")`` of torchvision's module (Inductor's CUDA graphs, recorded
by its first calls).  Their memory is the bytes of the graphs' private memory pools plus the step's
peak outside them; autograd saves nothing a hook can see for them (saved MB is not reported).  On a
device without CUDA they are not run: their rows say "skipped" and why, and run_case prints it.
"""
import datetime
import json
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional

import torch

from ..modules.models import CONFIGS, densenet_bc_config
from .baseline import torchvision_densenet

PROVIDERS = ("fused", "fused_graphed", "fused_keep_b", "fused_aten3x3", "fused_unplanned", "torchvision",
             "torchvision_me",
             "torchvision_compile", "torchvision_graphed", "torchvision_compile_budget0.3",
             "torchvision_compile_budget0.05")
# the training step replayed from CUDA graphs (see the module docstring); CUDA devices only
GRAPHED = ("fused_graphed", "torchvision_graphed")
_FUSED = ("fused", "fused_graphed", "fused_keep_b", "fused_aten3x3", "fused_unplanned")
COMPILED = ("torchvision_compile", "torchvision_graphed", "torchvision_compile_budget0.3",
            "torchvision_compile_budget0.05")
# torch.compile with min-cut recomputation under an activation memory budget
# (torch._functorch.config.activation_memory_budget): the strongest memory alternative in torch
COMPILE_BUDGETS = {"torchvision_compile_budget0.3": 0.3, "torchvision_compile_budget0.05": 0.05}


def unavailable(provider: str, device) -> str:
    """Why ``provider`` cannot run on ``device`` ("" when it can)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    if provider in GRAPHED and torch.device(device).type != "cuda":
        return f"{provider} replays CUDA graphs: needs a CUDA device, not {torch.device(device).type}"
    return ""


class _UnderMemoryBudget(torch.nn.Module):
    """A compiled module whose every call (so its compilation, and any recompilation) runs
    under its own activation memory budget."""

    def __init__(self, module: torch.nn.Module, budget: float):
        super().__init__()
        self.module, self.budget = module, budget

    def forward(self, x):
        import torch._functorch.config as functorch_config
        with functorch_config.patch(activation_memory_budget=self.budget):
            return self.module(x)


class _Unplanned(torch.nn.Module):
    """A fused module whose training forwards run unplanned (``densenet_fused.planning(False)``; their
    backwards follow their forwards): every step through the launchers' Python, as before the step plan."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        from ..modules import planning
        with planning(False):
            return self.module(x)


@dataclass(frozen=True)
class Case:
    name: str
    kind: str                 # "block" or "model"
    batch: int
    hw: int                   # input height = width
    layers: int = 0           # block: number of layers
    c0: int = 0               # block: input channels
    growth: int = 32
    bn_size: int = 4
    arch: str = ""            # model: densenet121 / densenet201 / densenet264


def densenet121_block(i, n):
    """Block i of densenet121 on 224x224 images: its layers, input channels and size from the configuration
    (the stem takes 224 to 56; each transition halves channels and size)."""
    growth, blocks, c0 = CONFIGS["densenet121"]
    hw = 56
    for layers in blocks[:i - 1]:
        c0, hw = (c0 + layers * growth) // 2, hw // 2
    return Case(f"densenet121_block{i}_n{n}", "block", n, hw, blocks[i - 1], c0, growth)


def densenet_bc_block1(depth, growth, n):
    """Block 1 of DenseNet-BC (depth, growth) on 32x32 images."""
    config = densenet_bc_config(depth, growth)
    return Case(f"densenet_bc{depth}_k{growth}_block1_n{n}", "block", n, 32, config.block_config[0],
                config.num_init_features, growth)


CASES: Dict[str, Case] = {c.name: c for c in (
    [densenet121_block(i, n) for i in (1, 2, 3, 4) for n in (64, 128)]
    + [densenet_bc_block1(100, 12, 64), densenet_bc_block1(190, 40, 64),
       Case("densenet121_n64", "model", 64, 224, arch="densenet121"),
       Case("densenet121_n128", "model", 128, 224, arch="densenet121"),  # a whole model at the batch of the block cases
       Case("densenet201_n64", "model", 64, 224, arch="densenet201"),
       Case("densenet264_n64", "model", 64, 224, arch="densenet264")])}

# A few seconds on a CPU: what `bench --quick --device cpu` and the CI harness tests run.
CPU_CASES: Dict[str, Case] = {c.name: c for c in (
    densenet_bc_block1(100, 12, 4),
    densenet121_block(3, 2),
)}


def build(case: Case, provider: str, device) -> torch.nn.Module:
    """The module a provider trains for a case (fresh weights, training mode)."""
    from torchvision.models.densenet import _DenseBlock

    from ..modules import models
    from ..modules import FusedDenseBlock

    reason = unavailable(provider, device)
    if reason:
        raise RuntimeError(reason)
    fused = provider in _FUSED
    me = provider == "torchvision_me"
    if case.kind == "block":
        cls = FusedDenseBlock if fused else _DenseBlock
        m = cls(case.layers, case.c0, case.bn_size, case.growth, 0.0, memory_efficient=me)
    else:
        if fused:
            m = getattr(models, case.arch)()
        else:
            m = torchvision_densenet(CONFIGS[case.arch], memory_efficient=me)
    for block in m.modules():
        if isinstance(block, FusedDenseBlock):
            # the memory mode that keeps each layer's bottleneck output
            block.keep_bottleneck = provider == "fused_keep_b"
            # cuDNN on a transient relu(bn2(B)) instead of the default Triton 3x3 kernels (CUDA only)
            block.conv3x3_impl = "aten" if provider == "fused_aten3x3" else ""
    m = m.to(device).to(memory_format=torch.channels_last).train()
    if provider == "fused_unplanned":
        m = _Unplanned(m)
    elif provider == "torchvision_compile":
        m = torch.compile(m)
    elif provider == "torchvision_graphed":
        m = torch.compile(m, mode="reduce-overhead")
    elif provider in COMPILE_BUDGETS:
        torch._dynamo.reset()  # nothing compiled under another budget is reused
        m = _UnderMemoryBudget(torch.compile(m), COMPILE_BUDGETS[provider])
    return m


def _inputs(case: Case, device, dtype):
    c_in = case.c0 if case.kind == "block" else 3
    x = torch.randn(case.batch, c_in, case.hw, case.hw, device=device).to(memory_format=torch.channels_last)
    return x


def _autocast(device, dtype, cache_enabled=True):
    if dtype == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return nullcontext()


def _graph_pool_bytes() -> int:
    """Bytes of every CUDA-graph (non-default) memory pool of the caching allocator."""
    return sum(s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) != (0, 0))


class SavedBytes:
    """Context manager: bytes of the distinct storages autograd saves for backward."""

    def __init__(self):
        self.storages = {}

    def pack(self, t):
        s = t.untyped_storage()
        self.storages[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Runner:
    """One provider on one case: warm-up, timed steps, memory, saved bytes."""

    def __init__(self, case: Case, provider: str, device: str, dtype: str, builder: Callable = build):
        self.case, self.provider, self.device, self.dtype = case, provider, device, dtype
        self.cuda = torch.device(device).type == "cuda"
        self.status = "ok"
        self.error = ""
        self.times = {"forward": [], "backward": [], "step": []}
        self.peak_bytes: Optional[int] = None
        self.saved_bytes: Optional[int] = None
        self.graph_pool_bytes: Optional[int] = None  # graphed providers: their graphs' memory pools
        self.module = self.x = self.grad = None
        reason = unavailable(provider, device)
        if reason:
            self.status, self.error = "skipped", reason
            return
        try:
            self.module = builder(case, provider, device)
            self.x = _inputs(case, device, dtype).requires_grad_()
            self._first_steps()
        except Exception as exc:  # noqa: BLE001 - recorded as a result
            self._fail(exc)

    def _first_steps(self):
        """The first step (compilation, Triton autotuning; it draws the grad_output) and, for a graphed
        provider, its graphs and their pools' bytes: make_graphed_callables captures fused_graphed after
        three warm-up steps of its own; reduce-overhead warms up on its first call and records on the second."""
        pools = _graph_pool_bytes() if self.provider in GRAPHED else 0
        if self.provider == "fused_graphed":
            with _autocast(self.device, self.dtype, cache_enabled=False):  # autocast's cast cache is not capturable
                self.module = torch.cuda.make_graphed_callables(self.module, (self.x,))
        with _autocast(self.device, self.dtype):
            y = self.module(self.x)
        self.grad = torch.randn_like(y)  # preallocated grad_output
        y.backward(self.grad)
        del y
        if self.provider in GRAPHED:
            for _ in range(2):
                self.step(record=False)
            if self.status == "ok":
                self._sync()
                self.graph_pool_bytes = _graph_pool_bytes() - pools

    def _fail(self, exc):
        self.status = "oom" if _is_oom(exc) else "error"
        self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        self.module = self.x = self.grad = None
        if self.cuda:
            torch.cuda.empty_cache()

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _zero_grad(self):
        self.x.grad = None
        for p in self.module.parameters():
            p.grad = None
        if self.provider == "torchvision_graphed":
            torch.compiler.cudagraph_mark_step_begin()  # a new training step: the last one's outputs are dead

    def untimed_steps(self, count: int) -> None:
        """``count`` training steps back to back, no events, one synchronize at the end (host time)."""
        if self.status != "ok":
            return
        try:
            for _ in range(count):
                self._zero_grad()
                with _autocast(self.device, self.dtype):
                    y = self.module(self.x)
                y.backward(self.grad)
                del y
            self._sync()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def step(self, record=True):
        """One training step: forward + backward with the preallocated grad_output."""
        if self.status != "ok":
            return
        try:
            self._zero_grad()
            if self.cuda:
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                ev[0].record()
                with _autocast(self.device, self.dtype):
                    y = self.module(self.x)
                ev[1].record()
                y.backward(self.grad)
                ev[2].record()
                ev[2].synchronize()
                t_f, t_b = ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
            else:
                t0 = time.perf_counter()
                with _autocast(self.device, self.dtype):
                    y = self.module(self.x)
                t1 = time.perf_counter()
                y.backward(self.grad)
                t2 = time.perf_counter()
                t_f, t_b = (t1 - t0) * 1e3, (t2 - t1) * 1e3
            del y
            if record:
                self.times["forward"].append(t_f)
                self.times["backward"].append(t_b)
                self.times["step"].append(t_f + t_b)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def measure_memory(self):
        if self.status != "ok":
            return
        try:
            if self.provider not in GRAPHED:  # a graph's activations live in its pool, not in autograd
                with SavedBytes() as saved, _autocast(self.device, self.dtype):
                    y = self.module(self.x)
                self.saved_bytes = saved.total
                del y, saved
            if self.cuda:
                self._sync()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                self.step(record=False)
                self._sync()
                self.peak_bytes = torch.cuda.max_memory_allocated() - before + (self.graph_pool_bytes or 0)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def release(self):
        self.module = self.x = self.grad = None
        if self.cuda:
            torch.cuda.empty_cache()


def _cpu_name() -> str:
    import os
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def environment(device: str) -> dict:
    import triton

    from .. import __version__
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {"device": dev.type, "device_name": name, "torch": torch.__version__, "triton": triton.__version__,
            "densenet_fused": __version__, "date": datetime.date.today().isoformat(),
            "python": platform.python_version()}


def run_case(case: Case, providers, device: str, dtype: str, warmup: int, steps: int, rounds: int,
             builder: Callable = build) -> List[dict]:
    """Rows for every (provider, mode) of one case, providers interleaved round by round.  A provider
    that cannot run on ``device`` (``unavailable``) gives rows with status "skipped" and the reason, and
    the reason is printed."""
    from tqdm import tqdm

    runners = {}
    if any(p in COMPILED for p in providers):
        torch._dynamo.reset()  # each case compiles afresh (dynamo's recompile limit counts across cases)
    # build one at a time (an OOM of one provider frees its memory), the compile-under-a-budget ones
    # first: their torch._dynamo.reset() would drop the compiled code and CUDA graphs of those before them
    for p in sorted(providers, key=lambda p: p not in COMPILE_BUDGETS):
        runners[p] = Runner(case, p, device, dtype, builder)
        if runners[p].status == "skipped":
            tqdm.write(f"{case.name}: provider {p} skipped: {runners[p].error}")
        for _ in range(warmup):
            runners[p].step(record=False)
    if sum(p in COMPILE_BUDGETS for p in providers) > 1:
        for p in COMPILE_BUDGETS:  # the second budget's torch._dynamo.reset() made the first recompile
            if p in runners:
                runners[p].step(record=False)
    for _ in range(rounds):
        for p in providers:
            for _ in range(steps):
                runners[p].step()
    for p in providers:
        runners[p].measure_memory()
    rows = []
    env = environment(device)
    tags = {k: env[k] for k in ("device", "device_name", "torch", "triton")}
    for p in providers:
        r = runners[p]
        for mode in ("forward", "backward", "step"):
            ts = r.times[mode]
            rows.append({
                "case": case.name, "kind": case.kind, "batch": case.batch, "provider": p, "mode": mode,
                "dtype": dtype, "status": r.status, "error": r.error, **tags,
                "time_ms": statistics.median(ts) if ts and r.status == "ok" else None,
                "time_samples": len(ts),
                "peak_mb": r.peak_bytes / 2 ** 20 if r.peak_bytes is not None else None,
                "saved_mb": r.saved_bytes / 2 ** 20 if r.saved_bytes is not None else None,
                "config": asdict(case)})
        r.release()
    add_ratios(rows)
    return rows


def add_ratios(rows: List[dict]) -> None:
    """fused/provider time and memory ratios, for rows of the same case, mode and dtype."""
    fused = {(r["case"], r["mode"], r["dtype"]): r for r in rows if r["provider"] == "fused"}
    for r in rows:
        f = fused.get((r["case"], r["mode"], r["dtype"]))
        for key, out in (("time_ms", "time_ratio_fused"), ("peak_mb", "peak_ratio_fused"),
                         ("saved_mb", "saved_ratio_fused")):
            ok = f is not None and f.get(key) and r.get(key) and f["status"] == r["status"] == "ok"
            r[out] = f[key] / r[key] if ok else None


def host_time(case: Case, providers, device: str, dtype: str, steps: int = 20, rounds: int = 3, warmup: int = 3,
              builder: Callable = build) -> List[dict]:
    """Host time of a training step: ``steps`` steps issued back to back with one synchronize at the end,
    wall time and this process's CPU time per step, providers interleaved over ``rounds`` (medians).  At
    a small batch the GPU idles and the wall time per step is the time the host needs to issue it."""
    from tqdm import tqdm

    runners = {p: Runner(case, p, device, dtype, builder) for p in providers}
    for p, r in runners.items():
        if r.status == "skipped":
            tqdm.write(f"{case.name}: provider {p} skipped: {r.error}")
        r.untimed_steps(warmup)
    wall = {p: [] for p in providers}
    cpu = {p: [] for p in providers}
    for _ in range(rounds):
        for p, r in runners.items():
            w0, c0 = time.perf_counter(), time.process_time()
            r.untimed_steps(steps)
            wall[p].append((time.perf_counter() - w0) * 1e3 / steps)
            cpu[p].append((time.process_time() - c0) * 1e3 / steps)
    env = environment(device)
    rows = []
    for p, r in runners.items():
        ok = r.status == "ok"
        rows.append({"case": case.name, "batch": case.batch, "provider": p, "dtype": dtype, "status": r.status,
                     "error": r.error, "steps": steps * rounds,
                     "wall_ms": statistics.median(wall[p]) if ok else None,
                     "cpu_ms": statistics.median(cpu[p]) if ok else None,
                     **{k: env[k] for k in ("device", "device_name", "torch", "triton")}, "config": asdict(case)})
        r.release()
    return rows


class MemoryCap:
    """torch.cuda.set_per_process_memory_fraction for a budget in GB, undone on exit."""

    def __init__(self, device: str, budget_gb: float):
        self.dev = torch.device(device)
        if self.dev.type != "cuda":
            raise RuntimeError("a memory budget needs a CUDA device (a per-process memory cap)")
        total = torch.cuda.get_device_properties(self.dev).total_memory
        self.fraction = min(1.0, budget_gb * 2 ** 30 / total)

    def __enter__(self):
        torch.cuda.set_per_process_memory_fraction(self.fraction, self.dev)

    def __exit__(self, *exc):
        torch.cuda.set_per_process_memory_fraction(1.0, self.dev)


BUDGET_PROVIDERS = ("fused", "torchvision", "torchvision_me")  # what the depth-at-a-budget search builds


def _bc_builder(depth, growth):
    """DenseNet-BC of a depth for 32x32 inputs, fused or torchvision (with the CIFAR stem)."""
    from ..modules import models

    config = densenet_bc_config(depth, growth)

    def builder(case, provider, device):
        if provider not in BUDGET_PROVIDERS:
            raise ValueError(f"the depth search builds {', '.join(BUDGET_PROVIDERS)}, not {provider!r}")
        if provider == "fused":
            m = models.densenet_bc(depth, growth, 10)
        else:
            m = torchvision_densenet(config, num_classes=10, small_inputs=True,
                                     memory_efficient=provider == "torchvision_me")
        return m.to(device).to(memory_format=torch.channels_last).train()

    return builder


def one_step(case, provider, device, dtype, builder) -> dict:
    """One training step of ``builder(case, provider, device)``: {"status", "params", "peak_mb"} (the
    step's peak above what was allocated before it; status "oom" when it did not fit, "error" on another
    failure)."""
    r = Runner(case, provider, device, dtype, builder)
    r.step(record=False)
    r.measure_memory()
    params = sum(q.numel() for q in r.module.parameters()) if r.module is not None else None
    row = {"status": r.status, "error": r.error, "params": params,
           "peak_mb": r.peak_bytes / 2 ** 20 if r.peak_bytes is not None else None}
    r.release()
    return row


def _under_cap(device: str, budget_gb: float, providers, values, row_of, progress) -> List[dict]:
    """``row_of(provider, value)`` for each provider and the ascending ``values`` under a memory cap, up to
    the first whose status is not "ok" (its row included)."""
    rows = []
    with MemoryCap(device, budget_gb):
        for p in providers:
            for value in values:
                rows.append(row_of(p, value))
                if progress is not None:
                    progress.update(1)
                if rows[-1]["status"] != "ok":
                    break
    return rows


def depth_at_budget(device: str, budget_gb: float, growth: int, providers, depths, batch=64, dtype="bf16",
                    progress=None) -> List[dict]:
    """Deepest DenseNet-BC (3 blocks, 32x32) each provider trains one step of under a memory cap."""
    def row_of(p, depth):
        case = Case(f"densenet_bc{depth}_k{growth}", "model", batch, 32, c0=3)
        return {"search": "depth", "provider": p, "depth": depth, "growth": growth, "batch": batch, "dtype": dtype,
                "budget_gb": budget_gb, **one_step(case, p, device, dtype, _bc_builder(depth, growth))}

    return _under_cap(device, budget_gb, providers, depths, row_of, progress)


def batch_at_budget(device: str, budget_gb: float, case: Case, providers, batches, dtype="bf16",
                    progress=None) -> List[dict]:
    """Largest batch of ``case`` each provider trains one step of under a memory cap."""
    def row_of(p, batch):
        return {"search": "batch", "case": case.name, "provider": p, "batch": batch, "dtype": dtype,
                "budget_gb": budget_gb, **one_step(replace(case, batch=batch), p, device, dtype, build)}

    return _under_cap(device, budget_gb, providers, batches, row_of, progress)


def write_json(path, env: dict, rows: List[dict], budget_rows: Optional[List[dict]] = None) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "results": rows, "depth_at_budget": budget_rows or []}, f, indent=1)


# What each provider is, printed once under the tables and in `bench --help`.
PROVIDER_NOTES = {
    "fused": "densenet_fused: FusedDenseBlock, or the fused DenseNet for a whole model",
    "fused_graphed": "fused, its whole training step captured once as a CUDA graph (make_graphed_callables) and replayed",
    "fused_keep_b": "fused with keep_bottleneck=True: keeps each bottleneck for backward instead of recomputing it",
    "fused_aten3x3": "fused with its 3x3 convolution on cuDNN (block.conv3x3_impl='aten'), not the Triton kernels",
    "fused_unplanned": "fused without the step plan (densenet_fused.planning(False)): every launch through the "
                       "launchers' Python",
    "torchvision": "torchvision's _DenseBlock / DenseNet, memory_efficient=False (the default)",
    "torchvision_me": "torchvision with memory_efficient=True (checkpointing: recomputes each concatenation)",
    "torchvision_compile": "torch.compile(torchvision)",
    "torchvision_graphed": "torch.compile(torchvision, mode='reduce-overhead'): torchvision's step as CUDA graphs",
    "torchvision_compile_budget0.3": "torch.compile(torchvision) at activation_memory_budget 0.3 (min-cut recomputation)",
    "torchvision_compile_budget0.05": "torch.compile(torchvision) at activation_memory_budget 0.05",
}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bf16 autocast"}


def _memory_key(rows: List[dict]):
    """("peak_mb", ...) where CUDA measured a peak, else the bytes saved for backward."""
    if any(r.get("peak_mb") for r in rows):
        return "peak_mb", "peak_ratio_fused", "peak MB", "peak memory"
    return "saved_mb", "saved_ratio_fused", "saved MB", "saved-for-backward memory"


def _find(rows, case, dtype, mode, provider):
    return next((r for r in rows if (r["case"], r["dtype"], r["mode"], r["provider"]) == (case, dtype, mode, provider)),
                None)


def headline(rows: List[dict], env: dict, against: str = "torchvision") -> str:
    """The result as sentences: per case, fused's memory and time as multiples of ``against``'s."""
    steps = [r for r in rows if r["mode"] == "step"]
    mem, ratio, _, mem_words = _memory_key(steps)
    lines = []
    for case, dtype in sorted({(r["case"], r["dtype"]) for r in steps}):
        r = _find(steps, case, dtype, "step", against)
        if r is None or r["status"] != "ok" or not r.get("time_ratio_fused") or not r.get(ratio):
            why = (r or {}).get("status", "not run")
            lines.append(f"{case} ({DTYPE_NAMES.get(dtype, dtype)}): no comparison with {against} ({why}).")
            continue
        lines.append(f"{case} ({DTYPE_NAMES.get(dtype, dtype)}): a fused training step needs {r[ratio]:.2f}x "
                     f"{against}'s {mem_words} and {r['time_ratio_fused']:.2f}x its time.")
    head = f"On {env['device_name']} ({env['date']}; below 1 favours fused):"
    return "\n".join([head] + ["  " + line for line in lines])


def legend(rows: List[dict]) -> str:
    """Every column, ratio and provider of the tables, explained once."""
    _, _, mem_col, _ = _memory_key([r for r in rows if r["mode"] == "step"])
    mem_text = ("peak MB: the peak memory allocated during one training step, above what was allocated before it"
                if mem_col == "peak MB" else
                "saved MB: the memory autograd keeps from forward for backward (distinct storages,\n"
                "    parameters included); no peak is measured on a CPU")
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    return "\n".join(
        ["columns:",
         "  time ms: median over the timed steps (providers interleaved A B A B in one run); lower is better",
         f"  {mem_text}; lower is better",
         "  [fused/x]: the fused value divided by this provider's: below 1 favours fused",
         "  step = forward + backward; oom: did not fit in memory; error: failed (message in the JSON)",
         "providers:"] + [f"  {p:<31} {PROVIDER_NOTES.get(p, '')}" for p in providers])


def format_table(rows: List[dict], mode: str = "step") -> str:
    """A text table for one mode: one line per (case, dtype, provider), ratios fused/provider."""
    sel = [r for r in rows if r["mode"] == mode]
    mem, ratio, mem_col, _ = _memory_key(sel)
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in sel)]
    title = {"step": "training step (forward + backward)", "forward": "forward", "backward": "backward"}[mode]
    lines = [f"{title}:",
             f"  {'case':<32} {'dtype':<5} {'provider':<31} {'time ms':>9} {'[fused/x]':>9} {mem_col:>9} {'[fused/x]':>9}"]
    for case, dtype in sorted({(r["case"], r["dtype"]) for r in sel}):
        first = True
        for p in providers:
            r = _find(sel, case, dtype, mode, p)
            lead = f"  {case if first else '':<32} {dtype if first else '':<5} {p:<31}"
            first = False
            if r is None or r["status"] != "ok":
                lines.append(f"{lead} {(r or {}).get('status', '-'):>9}")
                continue
            t_ratio = f"[{r['time_ratio_fused']:.2f}]" if p != "fused" and r.get("time_ratio_fused") else ""
            m_ratio = f"[{r[ratio]:.2f}]" if p != "fused" and r.get(ratio) else ""
            m = f"{r[mem]:9.4g}" if r.get(mem) is not None else f"{'-':>9}"
            lines.append(f"{lead} {r['time_ms']:9.2f} {t_ratio:>9} {m} {m_ratio:>9}")
    return "\n".join(lines)


def report(rows: List[dict], env: dict) -> str:
    """What `densenet-fused bench` prints: the environment, the headline, the tables, the legend."""
    parts = [f"{env['device_name']} | torch {env['torch']} | triton {env['triton']} | {env['date']}",
             headline(rows, env)]
    parts += [format_table(rows, mode) for mode in ("step", "forward", "backward")
              if any(r["mode"] == mode for r in rows)]
    parts.append(legend(rows))
    return "\n\n".join(parts)


def plot_title(rows: List[dict], env: dict) -> str:
    dtypes = sorted({DTYPE_NAMES.get(r["dtype"], r["dtype"]) for r in rows})
    return (f"Training step per provider, {env['device_name']}, {env['date']}, {', '.join(dtypes)} "
            f"(torch {env['torch']}); lower is better")


def plot(rows: List[dict], budget_rows: List[dict], path_prefix: str, env: dict) -> List[str]:
    """PNG plots: step time and memory per case and provider; memory vs depth at a budget; each titled
    with the device, the date and the dtype (``env``: ``environment()``'s dict)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    steps = [r for r in rows if r["mode"] == "step"]
    cases = sorted({(r["case"], r["dtype"]) for r in steps})
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in steps)]
    if cases:
        fig, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(cases) + 2.5))
        mem_key = "peak_mb" if any(r["peak_mb"] for r in steps) else "saved_mb"
        mem_label = "peak memory of a step (MB)" if mem_key == "peak_mb" else "saved for backward (MB)"
        for ax, key, label in ((axes[0], "time_ms", "median step time (ms), lower is better"),
                               (axes[1], mem_key, mem_label + ", lower is better")):
            h = 0.8 / max(1, len(providers))
            for j, p in enumerate(providers):
                vals = []
                for case, dtype in cases:
                    r = next((r for r in steps if (r["case"], r["dtype"], r["provider"]) == (case, dtype, p)), None)
                    vals.append(r[key] if r and r["status"] == "ok" and r[key] else 0.0)
                bars = ax.barh([i + j * h for i in range(len(cases))], vals, height=h, label=p)
                ax.bar_label(bars, labels=[f"{v:.3g}" if v else "oom/-" for v in vals], fontsize=6, padding=2)
            ax.set_yticks([i + 0.4 - h / 2 for i in range(len(cases))])
            ax.set_yticklabels([f"{c} {d}" for c, d in cases], fontsize=7)
            ax.set_xlabel(label)
            ax.margins(x=0.15)
            ax.invert_yaxis()
        handles, labels = axes[0].get_legend_handles_labels()
        fig.suptitle(plot_title(steps, env), fontsize=10)
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=min(len(providers), 5),
                   fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.86))
        fig.savefig(path_prefix + "_steps.png", dpi=110)
        plt.close(fig)
        written.append(path_prefix + "_steps.png")
    budget_rows = [r for r in budget_rows if r.get("search", "depth") == "depth"]
    if budget_rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (p, growth) in sorted({(r["provider"], r["growth"]) for r in budget_rows}):
            pts = [(r["depth"], r["peak_mb"]) for r in budget_rows
                   if r["provider"] == p and r["growth"] == growth and r["status"] == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{p} k={growth}")
        ax.set_xlabel("DenseNet-BC depth")
        ax.set_ylabel("peak memory of one step (MB), lower is better")
        ax.set_title(f"Deepest DenseNet-BC under {budget_rows[0]['budget_gb']:g} GB, {env['device_name']}, "
                     f"{env['date']}, {DTYPE_NAMES.get(budget_rows[0]['dtype'], budget_rows[0]['dtype'])}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path_prefix + "_depth.png", dpi=110)
        plt.close(fig)
        written.append(path_prefix + "_depth.png")
    return written
