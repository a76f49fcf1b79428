"""GPU cost of a block's training step, counted without a GPU (docs/design.md section 8).

``densenet-fused cost [--case NAME]`` runs one training forward and backward of a dense
block along its CUDA code path on *fake* CUDA tensors (``FakeTensorMode``: shapes, dtypes
and strides, no memory, no kernel runs), at the case's real shapes.  Every kernel launch of
that path is recorded with the bytes it reads and writes:

- Triton kernels: each launch is observed at the launch seam (``ops.launch.recording``) instead of
  run; bytes are the logical sizes of its tensor arguments (each distinct tensor once), read,
  written or both according to the ``TRITON_WRITES`` declared in its op file.  Re-reads of a tile
  by several programs are assumed to hit L2, so this is a lower bound of the DRAM traffic of a
  GEMM-shaped kernel.
- densenet_fused C++/CUDA ops (csrc/cuda): launches and bytes from their kernels' structure
  (``_extension_cost``).
- ATen ops: one launch per op that computes (views, allocations and metadata ops launch
  nothing), bytes = tensor inputs read + outputs (or written arguments) written.
  ``convolution_backward`` (cuDNN) counts one launch per requested gradient: a lower bound.
Launches are attributed to layers by the block's ``ops.launch.mark`` calls.  The run needs no GPU and no
Triton compiler; it predicts, a GPU profiler has the last word.

The floor (``floor_bytes``) is the traffic this design cannot avoid, in docs/design.md section 8
terms, per layer l (M rows, C_l input channels, cb = bn_size*k, s = bytes of the compute
dtype): forward reads the buffer slice once (M*C_l*s), writes B and reads it once
(2*M*cb*s) and writes its k new channels (M*k*s); backward reads the slice twice
(recomputing B, and the 1x1 backward: 2*M*C_l*s), reads and writes G once in fp32
(8*M*C_l) and makes four bottleneck-sized passes (B recomputed and read by the 3x3
backward, dB written and read by the 1x1 backward: 4*M*cb*s).  Per block: x read and
copied into the buffer (2*M*C_0*s), grad_out read once (M*C_total*s) and dx written once
(M*C_0*s).  For DenseNet-121 block 3 (N=128, bf16) the per-layer terms are docs/design.md's 6.2 GB (section 8)
and the whole floor 6.31 GB.
"""
import contextlib
import math
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .cases import CASES, CostCase  # noqa: F401  (cost.CASES, cost.CostCase: the cases of the report)

GB = 1e9
MB = 1e6


# The tensor arguments each Triton kernel writes are declared beside it, in its op file's TRITON_WRITES
# (what it writes "w", reads and writes "rw"; every other tensor argument is read).  A kernel without an
# entry there is an error: declare it when adding one.
# ATen ops that launch no kernel (allocation, views, metadata).
_FREE_ATEN = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
              "is_same_size", "_has_compatible_shallow_copy_type", "_unsafe_view"}


@dataclass
class Launch:
    phase: str            # "forward" / "backward"
    layer: int            # -1: block-level work
    kernel: str
    read: float           # bytes
    written: float
    launches: int = 1


@dataclass
class Recording:
    launches: List[Launch] = field(default_factory=list)
    phase: str = "forward"
    layer: int = -1
    triton_calls: list = field(default_factory=list)  # (kernel object, args, kwargs) of every Triton launch

    def add(self, kernel, read, written, launches=1):
        self.launches.append(Launch(self.phase, self.layer, kernel, float(read), float(written), launches))

    def mark(self, phase, layer):
        self.phase, self.layer = phase, layer


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)


# ----------------------------------------------------------------------------- extension ops
def _extension_cost(name: str, args, kwargs) -> List[Tuple[str, int, int]]:
    """(kernel, read, written) of each CUDA launch of a densenet_fused C++ op (csrc/cuda)."""
    if name == "channel_stats":
        x = args[0]
        m, c = x.shape
        acc = 8 if x.dtype == torch.float64 else 4
        splits = min(512, max(1, math.ceil(m / 64)))  # channel_stats.cu: kMaxSplits, kMinRowsPerSplit
        part = 3 * splits * c * acc
        return [("channel_stats.partial_kernel", _nbytes(x), part),
                ("channel_stats.finish_kernel", part, 3 * c * acc)]
    if name == "bn_grad_finish":
        G, x, mean, P, Q, dtype = args[:6]
        g_scale = args[7] if len(args) > 7 else kwargs.get("G_scale")
        m, c = x.shape
        vec = sum(_nbytes(t) for t in (mean, P, Q) + ((g_scale,) if g_scale is not None else ()))
        out = m * c * torch.empty((), dtype=dtype, device="meta").element_size()
        return [("bn_grad_finish.finish_kernel", _nbytes(G) + _nbytes(x) + vec, out)]
    if name == "running_stats_update":
        rm, rv, nbt, mean, var = args[:5]
        stats = sum(_nbytes(t) for t in rm + rv + nbt)
        return [("running_stats_update.update_kernel", stats + sum(_nbytes(t) for t in mean + var), stats)] * \
            math.ceil(len(rm) / 32)  # kPerLaunch
    raise RuntimeError(f"cost: no launch model for densenet_fused::{name}; add one to _extension_cost")


# ----------------------------------------------------------------------------- ATen ops
def _aten_cost(func, args, kwargs, out) -> Optional[Tuple[str, int, int, int]]:
    """(kernel, read, written, launches) of an ATen op on CUDA, or None when it launches nothing."""
    schema = func._schema
    name = schema.name.split("::")[-1]
    if name in _FREE_ATEN or func.is_view:
        return None
    if not any(t.is_cuda for t in list(_tensors(list(args) + list(kwargs.values()))) + list(_tensors(out))):
        return None  # host-side (a wrapped Python scalar): no GPU launch
    read = written = 0
    bound = list(zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]))
    for arg, value in bound:
        is_write = arg.alias_info is not None and arg.alias_info.is_write
        for t in _tensors(value):
            if is_write:
                written += _nbytes(t)
                if arg.name == "self" and name not in ("copy_", "zero_", "fill_", "bernoulli_", "uniform_",
                                                       "normal_", "random_"):
                    read += _nbytes(t)  # in place: self is also an operand
            else:
                read += _nbytes(t)
    for ret, value in zip(schema.returns, out if isinstance(out, (tuple, list)) else (out,)):
        if ret.alias_info is None:
            written += sum(_nbytes(t) for t in _tensors(value))
    launches = 1
    if name == "convolution_backward":
        launches = max(1, sum(bool(b) for b in args[-1]))  # dgrad, wgrad (cuDNN: at least one kernel each)
    return f"aten.{name}", read, written, launches


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, rec: Recording):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ns = func.namespace
        if ns == "densenet_fused":
            for kernel, read, written in _extension_cost(func._schema.name.split("::")[-1], args, kwargs):
                self.rec.add(kernel, read, written)
        elif ns == "prim":  # metadata (prim::device, ...)
            pass
        elif ns in ("aten", "prims"):
            cost = _aten_cost(func, args, kwargs, out)
            if cost is not None:
                self.rec.add(cost[0], cost[1], cost[2], cost[3])
        else:
            raise RuntimeError(f"cost: no launch model for {func}")
        return out


# ----------------------------------------------------------------------------- Triton launches
def _triton_name(fn) -> str:
    inner = getattr(fn, "fn", fn)  # Autotuner -> JITFunction -> python function
    inner = getattr(inner, "fn", inner)
    return f"{inner.__module__.rsplit('.', 1)[-1]}.{inner.__name__}"


def _record_triton(rec: Recording, fn, args, kwargs):
    name = _triton_name(fn)
    rec.triton_calls.append((fn, args, kwargs))
    module, kernel = name.split(".")
    declared = getattr(sys.modules.get(f"densenet_fused.ops.{module}"), "TRITON_WRITES", {})
    if kernel not in declared:
        raise RuntimeError(f"cost: Triton kernel {name} has no entry in its op file's TRITON_WRITES")
    writes = declared[kernel]
    arg_names = list(getattr(fn, "arg_names", None) or fn.fn.arg_names)
    bound = dict(zip(arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in arg_names})
    seen = {}
    for arg, value in bound.items():
        if isinstance(value, torch.Tensor):
            mode = writes.get(arg, "r")
            prev = seen.get(id(value))
            seen[id(value)] = (value, mode if prev is None or prev[1] == mode else "rw")
    read = sum(_nbytes(t) for t, mode in seen.values() if "r" in mode)
    written = sum(_nbytes(t) for t, mode in seen.values() if mode in ("w", "rw"))
    rec.add(name, read, written)


def _observer(rec: Recording):
    """The launch seam's observer (ops.launch.recording): records each Triton launch instead of running it."""
    def observe(kernel, args, constexprs):
        _record_triton(rec, kernel, args, constexprs)
    return observe


def _relayout(module, dtype) -> None:
    """``module.to(dtype, memory_format=channels_last)`` for a module of fake tensors (Module.to swaps
    fake parameters, which FakeTensorMode refuses): floating parameters and buffers replaced in place."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                t = p.detach().to(dtype)
                if t.dim() == 4:
                    t = t.contiguous(memory_format=torch.channels_last)
                mod._parameters[name] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point():
                mod._buffers[name] = b.to(dtype)


def _obeys_layout(grad: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether autograd's gradient accumulation keeps ``grad`` as it is (strides equal where the size is
    not 1); otherwise it copies it into the parameter's layout: one more launch."""
    return all(g == p for g, p, n in zip(grad.stride(), param.stride(), param.shape) if n != 1)


def _on_gpu(arch: int):
    """Triton's stand-in driver for the reference GPU of sm_<arch> (host_cost.py) active within: the
    launchers size their shape-dependent grids (``_triton_common.device_target``) for that GPU."""
    import triton

    from .host_cost import stand_in
    return stand_in(triton.runtime.driver, arch)


def record_step(case: CostCase, arch: int = 90) -> Recording:
    """Launches of one training step of the case's block on the CUDA path of the reference GPU of
    sm_<arch> (``_triton_common.SMS``), channels-last as the benchmark
    and a channels-last model run it, 16-bit cases as under autocast (float32 parameters, the case's dtype
    for the compute): the block's forward and backward (called directly: autograd's engine needs a CUDA
    driver even for fake tensors) and the gradient accumulation's copies where a gradient does not have
    its parameter's layout."""
    import dataclasses

    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..autograd.block import block_backward, block_forward
    from ..modules.dense import FusedDenseBlock, fused_block_setup
    from ..ops.launch import recording

    rec = Recording()
    with _on_gpu(arch), FakeTensorMode(allow_non_fake_inputs=False) as mode:
        with torch.device("cuda"):
            blk = FusedDenseBlock(case.layers, case.c0, case.bn_size, case.growth).train()
        half = case.dtype in (torch.bfloat16, torch.float16)
        _relayout(blk, torch.float32 if half else case.dtype)
        shape = (case.batch, case.c0, case.hw, case.hw)
        x = torch.empty(shape, dtype=case.dtype, device="cuda").to(memory_format=torch.channels_last)
        c_total = case.c0 + case.layers * case.growth
        grad = torch.empty((case.batch, c_total, case.hw, case.hw), dtype=case.dtype, device="cuda").to(
            memory_format=torch.channels_last)
        with recording(_observer(rec), on_mark=rec.mark), _Recorder(rec), torch.no_grad():
            spec, params = fused_block_setup(blk, x.to(blk.denselayer1.conv1.weight.dtype))
            spec = dataclasses.replace(spec, dtype=case.dtype)  # what autocast would choose
            out, (stats, seeds, kept, weights, _) = block_forward(spec, x, params, save=True)
            rec.mark("backward", -1)
            _, grads = block_backward(spec, out, grad, params, stats, seeds, kept, weights, (x.dtype, True), True)
            for p, g in zip(params, grads):
                if not _obeys_layout(g, p):
                    rec.add("aten.copy_ (gradient accumulation: layout)", _nbytes(g), _nbytes(p))
    del mode
    return rec


# ----------------------------------------------------------------------------- floor and report
def floor_bytes(case: CostCase) -> float:
    """Bytes per training step this design cannot avoid (module docstring; docs/design.md section 8)."""
    m, s, k, cb = case.rows, torch.empty((), dtype=case.dtype).element_size(), case.growth, case.bn_size * case.growth
    total = 0
    for l in range(case.layers):
        c_l = case.c0 + l * k
        total += m * c_l * s + 2 * m * cb * s + m * k * s      # forward
        total += 2 * m * c_l * s + 8 * m * c_l + 4 * m * cb * s  # backward
    c_total = case.c0 + case.layers * k
    total += 2 * m * case.c0 * s + m * c_total * s + m * case.c0 * s  # x in, grad_out in, dx out
    return float(total)


@dataclass
class Summary:
    forward: float   # launches per layer
    backward: float
    total: float
    bytes: float     # per step
    floor: float
    ratio: float

    def line(self) -> str:
        return (f"launches per layer: {self.forward:.1f} forward + {self.backward:.1f} backward = {self.total:.1f}; "
                f"bytes per step: {self.bytes / GB:.2f} GB, floor {self.floor / GB:.2f} GB, ratio {self.ratio:.2f}")


def summarize(case: CostCase, rec: Recording) -> Summary:
    fwd = sum(l.launches for l in rec.launches if l.phase == "forward")
    bwd = sum(l.launches for l in rec.launches if l.phase == "backward")
    total_bytes = sum((l.read + l.written) * l.launches for l in rec.launches)
    floor = floor_bytes(case)
    n = case.layers
    return Summary(fwd / n, bwd / n, (fwd + bwd) / n, total_bytes, floor, total_bytes / floor)


def report(case: CostCase, rec: Recording, layer: Optional[int] = None) -> str:
    from ..ops.bnrelu_conv3x3 import conv3x3_impl
    layer = case.layers // 2 if layer is None else layer
    lines = [f"{case.name}: {case.layers} layers, C0={case.c0}, k={case.growth}, bn_size={case.bn_size}, "
             f"N={case.batch}, {case.hw}x{case.hw}, {str(case.dtype).replace('torch.', '')}, conv3x3 "
             f"{conv3x3_impl()}; training step on the CUDA code path, counted on fake CUDA tensors"]
    for phase in ("forward", "backward"):
        for where, title in ((layer, f"layer {layer} (C_l={case.c0 + layer * case.growth})"),
                             (-1, "block level (outside the layers)")):
            rows = [l for l in rec.launches if l.phase == phase and l.layer == where]
            lines.append(f"{phase}, {title}: {sum(r.launches for r in rows)} launches")
            lines.append(f"    {'kernel':<44} {'read MB':>9} {'written MB':>10}")
            for r in rows:
                times = f" x{r.launches}" if r.launches > 1 else ""
                lines.append(f"    {r.kernel + times:<44} {r.read / MB:9.2f} {r.written / MB:10.2f}")
    by_kernel: Dict[str, Tuple[int, float]] = {}
    for l in rec.launches:
        n, b = by_kernel.get(l.kernel, (0, 0.0))
        by_kernel[l.kernel] = (n + l.launches, b + (l.read + l.written) * l.launches)
    lines.append("whole step, by kernel:")
    lines.append(f"    {'kernel':<44} {'launches':>9} {'GB':>8}")
    for name, (n, b) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"    {name:<44} {n:9d} {b / GB:8.3f}")
    lines.append(summarize(case, rec).line())
    return "\n".join(lines)


# ----------------------------------------------------------------------------- kernel resources
_TL_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
             torch.int64: "i64", torch.int32: "i32", torch.int8: "i8"}

# The dtypes and TF32 settings `cost --kernels` runs each CUDA code path under: the Triton launches
# each one makes (none where the path runs cuBLAS / cuDNN / ATen: float64, float32 without TF32
# for the GEMM-shaped block ops, ``_triton_common.cuda_gemm_impl``) are what it compiles, so every
# (dtype, dot precision) pair the CUDA path launches Triton with is covered and no other.
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_TF32 = (True, False)


@contextlib.contextmanager
def _allow_tf32(on: bool):
    """torch.backends.cuda.matmul.allow_tf32 set to ``on`` (the flag dot_precision and cuda_gemm_impl
    read), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _precision_label(dtype, tf32: bool) -> str:
    """The compute dtype of a recorded path, with the dot precision for float32: "bf16", "fp16",
    "fp32/tf32", "fp32/ieee", "fp64"."""
    name = _TL_TYPES[dtype]
    return f"{name}/{'tf32' if tf32 else 'ieee'}" if dtype == torch.float32 else name


# Shapes of the transition, head and stem launches `cost --kernels` compiles (the kernels specialize
# on pointer alignment and on which integers are multiples of 16, so the shapes differ in those):
# DenseNet-121 (N=128, 224 px), DenseNet-BC-100 k=12 (N=64, CIFAR) and DenseNet-121 at 232 px, whose
# second transition reads 29 x 29 pixels (odd: the floored pixels' kernel runs).
# transition: (name, N, H, W, C, Cout, row stride of its output: the next block's channels)
TRANSITIONS = (("densenet121_t1", 128, 56, 56, 256, 128, 512), ("densenet121_t2", 128, 28, 28, 512, 256, 1024),
               ("densenet121_t3", 128, 14, 14, 1024, 512, 1024), ("densenet_bc100_t1", 64, 32, 32, 216, 108, 300),
               ("densenet_bc100_t2", 64, 16, 16, 300, 150, 342), ("densenet121_232px_t2", 128, 29, 29, 512, 256, 1024))
HEADS = (("densenet121", 128, 7, 7, 1024), ("densenet_bc100", 64, 8, 8, 342))  # (name, N, H, W, C)
STEMS = (("densenet121", 128, 112, 112, 64), ("densenet161", 128, 112, 112, 96))  # conv0's output


def record_edges(dtype, arch: int = 90) -> Recording:
    """Triton launches of the transition, head and stem ops' CUDA code paths (forward, backward with
    batch statistics and without: eval, or statistics synchronized across processes) at the shapes
    above in ``dtype``, on fake CUDA tensors of the reference GPU of sm_<arch> (TF32 as
    torch.backends.cuda.matmul.allow_tf32 says)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import importlib

    from ..ops.launch import recording
    trans, head, stem = (importlib.import_module(f"densenet_fused.ops.{m}")
                         for m in ("bnrelu_avgpool_conv1x1", "bnrelu_global_avgpool", "bnrelu_maxpool"))
    rec = Recording()
    with _on_gpu(arch), FakeTensorMode(allow_non_fake_inputs=False) as mode, recording(_observer(rec)), \
            torch.no_grad(), torch.device("cuda"):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        vec = lambda c: torch.empty(c, dtype=acc)  # noqa: E731
        for _, n, h, w, c, cout, ldo in TRANSITIONS:
            x, wt = torch.empty((n * h * w, c), dtype=dtype), torch.empty((cout, c), dtype=dtype)
            mo = n * (h // 2) * (w // 2)
            out = torch.empty((mo, ldo), dtype=dtype)[:, :cout]
            trans.cuda_fwd(x, vec(c), vec(c), wt, [n, h, w], out)
            for batch in (True, False):
                trans.cuda_bwd(torch.empty((mo, cout), dtype=dtype), x, vec(c), vec(c), wt, [n, h, w], vec(c),
                                vec(c), batch)
        for _, n, h, w, c in HEADS:
            x = torch.empty((n * h * w, c), dtype=dtype)
            head.cuda_fwd(x, vec(c), vec(c), [n, h, w])
            for batch in (True, False):
                head.cuda_bwd(torch.empty((n, c), dtype=dtype), x, vec(c), vec(c), [n, h, w], vec(c), vec(c), batch)
        for _, n, h, w, c in STEMS:
            y = torch.empty((n * h * w, c), dtype=dtype)
            out, index = stem.triton_fwd(y, vec(c), vec(c), [n, h, w])
            stem.triton_bwd(torch.empty_like(out), index, y, vec(c), vec(c), vec(c), vec(c), [n, h, w], n * h * w)
    del mode
    return rec


def precision_recordings(record, runs_triton=None) -> List[Tuple[str, Recording]]:
    """(label, recording) of ``record(dtype)`` under every dtype of _DTYPES and TF32 setting of _TF32
    that launches Triton kernels (a path with no Triton launch, e.g. cuBLAS, is left out), one per
    label ("bf16", "fp16", "fp32/tf32", "fp32/ieee", "fp64"; the TF32 flag only matters for float32).
    ``runs_triton(dtype)``: when given, only the settings where it holds are recorded."""
    out, seen = [], set()
    for dtype in _DTYPES:
        for tf32 in _TF32:
            label = _precision_label(dtype, tf32)
            if label in seen:
                continue
            seen.add(label)
            with _allow_tf32(tf32):
                if runs_triton is not None and not runs_triton(dtype):
                    continue
                rec = record(dtype)
            if rec.triton_calls:
                out.append((label, rec))
    return out


def kernel_variants(rec: Recording, arch: int = 90) -> Dict[tuple, tuple]:
    """Every distinct compilation a recorded step needs, with every config an autotuner can pick on
    sm_<arch> (its ``early_config_prune`` applied for that architecture):
    key -> (jit function, signature, constexprs, attrs, options).  Pointer and integer arguments
    get the tt.divisibility 16 attribute where the real launch satisfies it (a 16-byte aligned
    address assuming 16-byte aligned allocations; a multiple of 16), as Triton specializes them."""
    import triton.runtime.autotuner as autotuner

    from ..ops._triton_common import cost_target
    out: Dict[tuple, tuple] = {}
    for obj, args, kwargs in rec.triton_calls:
        configs = obj.configs if isinstance(obj, autotuner.Autotuner) else [None]
        fn = obj.fn if isinstance(obj, autotuner.Autotuner) else obj
        names = list(fn.arg_names)
        fits = getattr(getattr(obj, "early_config_prune", None), "fits", None)
        if fits is not None:
            launch = {**dict(zip(names, args)), **kwargs}
            configs = [c for c in configs if fits(c, launch, cost_target(arch))]
        for cfg in configs:
            values = dict(zip(names, args))
            values.update({k: v for k, v in kwargs.items() if k in names})
            options = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
            if cfg is not None:
                values.update(cfg.kwargs)
                options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            sig, constexprs, attrs = {}, {}, {}
            for i, (name, param) in enumerate(zip(names, fn.params)):
                v = values[name]
                if param.is_constexpr:
                    sig[name] = "constexpr"
                    constexprs[(i,)] = v
                elif isinstance(v, torch.Tensor):
                    sig[name] = "*" + _TL_TYPES[v.dtype]
                    if (v.storage_offset() * v.element_size()) % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
                elif isinstance(v, bool):
                    sig[name] = "i1"
                elif isinstance(v, int):
                    sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                    if v % 16 == 0 and v != 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
                elif isinstance(v, float):
                    sig[name] = "fp32"
                else:
                    raise RuntimeError(f"cost --kernels: argument {name}={v!r} of {_triton_name(fn)} has no type")
            key = (_triton_name(fn), tuple(sig.items()), tuple(sorted((k[0], repr(v)) for k, v in constexprs.items())),
                   tuple(sorted(attrs)), tuple(sorted(options.items())))
            out.setdefault(key, (fn, sig, constexprs, attrs, options))
    return out


def compile_kernel(fn, sig, constexprs, attrs, options, arch: int = 90) -> dict:
    """AOT-compile one variant for sm_<arch> (no GPU needed) and read its resources with ptxas -v."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options=options)
    ptx = k.asm["ptx"]
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr[-500:]}")
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill_st = re.search(r"(\d+) bytes spill stores", res.stderr)
    spill_ld = re.search(r"(\d+) bytes spill loads", res.stderr)
    return dict(regs=int(regs.group(1)) if regs else -1,
                spills=(int(spill_st.group(1)) if spill_st else 0) + (int(spill_ld.group(1)) if spill_ld else 0),
                shared=int(k.metadata.shared), wgmma="wgmma" in ptx, cp_async="cp.async" in ptx)


def _config_label(fn, constexprs, options) -> str:
    names = fn.arg_names
    cfg = ",".join(f"{names[i]}={v}" for (i,), v in constexprs.items()
                   if names[i].startswith(("BLOCK", "KPAD", "COUT_PAD", "PASS", "BATCH", "FINISH")))
    return cfg + f",w{options['num_warps']}s{options['num_stages']}"


def compile_rows(recordings: List[Tuple[str, Recording]], arch: int = 90) -> List[dict]:
    """Every distinct variant of the labelled recordings (``precision_recordings``), every autotuner
    config, compiled for sm_<arch>: one dict per variant with kernel, dtype (the label), config and
    ``compile_kernel``'s resources, or ``error`` (a failed compile, or shared memory over the
    architecture's limit per block: it compiles but cannot load)."""
    from ..ops._triton_common import SMEM_PER_BLOCK
    rows, seen = [], set()
    for label, rec in recordings:
        for key, (fn, sig, constexprs, attrs, options) in kernel_variants(rec, arch).items():
            if key in seen:  # the same compilation under another label (e.g. an fp32 statistics merge)
                continue
            seen.add(key)
            if "PRECISION" not in fn.arg_names:  # no product: the dot precision does not apply
                label = label.split("/")[0]
            row = dict(kernel=key[0], dtype=label, config=_config_label(fn, constexprs, options))
            try:
                row.update(compile_kernel(fn, sig, constexprs, attrs, options, arch))
            except Exception as e:  # reported and counted, never hidden
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            else:
                if row["shared"] > SMEM_PER_BLOCK[arch]:
                    row["error"] = f"shared memory over {SMEM_PER_BLOCK[arch]} B"
            rows.append(row)
    return rows


def _rows_report(title: str, rows: List[dict], arch: int) -> str:
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    lines = [f"{title}, compiled for {gpu}",
             f"    {'kernel':<36} {'dtype':<9} {'config':<52} {'regs':>5} {'spill B':>8} {'smem KB':>8} wgmma cp.async"]
    for r in rows:
        head = f"    {r['kernel']:<36} {r['dtype']:<9} {r['config']:<52}"
        if "regs" not in r:
            lines.append(f"{head} ERROR {r['error']}")
            continue
        lines.append(f"{head} {r['regs']:5d} {r['spills']:8d} {r['shared'] / 1024:8.1f} "
                     f"{'yes' if r['wgmma'] else 'no':>5} {'yes' if r['cp_async'] else 'no':>8}"
                     + (f"  ERROR {r['error']}" if "error" in r else ""))
    n = sum("regs" in r for r in rows)
    spilled = sum(r.get("spills", 0) > 0 for r in rows)
    errors = sum("error" in r for r in rows)
    lines.append(f"kernels: {n} compiled for {gpu}, {spilled} with spills, {errors} errors")
    return "\n".join(lines)


def _refuse_interpreter():
    import os
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("cost --kernels: unset TRITON_INTERPRET (the kernels are compiled, not interpreted)")


def block_recordings(case: CostCase, arch: int = 90) -> List[Tuple[str, Recording]]:
    """The case's training step recorded in every dtype / TF32 setting whose GEMM-shaped ops run
    Triton (``_triton_common.cuda_gemm_impl``, what their launchers decide by): bf16, fp16 and fp32
    with TF32.  fp32 without TF32 and fp64 run cuBLAS / cuDNN for the GEMMs (their launch costs are
    not modelled here); the small Triton kernels they may still launch (BN scale/shift, statistics
    merges on fp32 vectors) take the same fp32 arguments in every dtype."""
    import dataclasses

    from ..ops._triton_common import cuda_gemm_impl
    return precision_recordings(lambda dtype: record_step(dataclasses.replace(case, dtype=dtype), arch),
                                lambda dtype: cuda_gemm_impl(dtype) == "triton")


def kernels_report(case: CostCase, arch: int = 90) -> str:
    """Every Triton kernel variant of the case's step in every (dtype, dot precision) its CUDA path
    launches Triton with, every autotuner config it can pick there, compiled for sm_<arch>; a kernel
    using more shared memory than the architecture has per block counts as an error (it compiles but
    cannot load)."""
    _refuse_interpreter()
    return _rows_report(f"{case.name}: Triton kernels of a training step, every dtype and autotuner config",
                        compile_rows(block_recordings(case, arch), arch), arch)


EDGES = "transition_head_stem"


def edges_report(arch: int = 90) -> str:
    """The transition, head and stem kernels (``record_edges``) in every dtype / dot precision their
    CUDA paths launch Triton with, compiled for sm_<arch>."""
    _refuse_interpreter()
    return _rows_report(f"{EDGES}: Triton kernels of the transitions, head and stem (fixed tiles), every dtype",
                        compile_rows(precision_recordings(lambda dtype: record_edges(dtype, arch)), arch), arch)


def main(case: str = "densenet121_block3", kernels: bool = False, arch: int = 90, host: bool = False,
         processes: int = 3, steps: int = 20, out: str = "") -> int:
    """Print the report of one case (or of every case with "all"): the last line is the summary.
    ``arch``: the compute capability --kernels compiles for (90: sm_90a, 80: sm_80).  With
    ``kernels``, the case ``transition_head_stem`` (also in "all") compiles the transition, head and
    stem kernels.  With ``host``, the host time of a training step against torchvision's block
    (host_cost.py: ``processes`` processes per provider, ``steps`` timed steps each)."""
    if host:
        from .host_cost import main as host_main
        return host_main(case, processes=processes, steps=steps, out=out)
    names = list(CASES) + ([EDGES] if kernels else []) if case == "all" else [case]
    for i, name in enumerate(names):
        if name == EDGES and kernels:
            text = edges_report(arch)
        elif name not in CASES:
            extra = f", {EDGES} (with --kernels)" if name != EDGES or not kernels else ""
            raise SystemExit(f"cost: unknown case {name!r}; expected one of {', '.join(CASES)}{extra} or all")
        else:
            text = kernels_report(CASES[name], arch) if kernels else report(CASES[name], record_step(CASES[name]))
        if i:
            print()
        print(text)
    return 0
