"""The one launch seam: every Triton kernel of the package is launched through ``launch``.

On the hot path a Triton launch through ``kernel[grid](...)`` costs tens of microseconds of host time
(the binder, the cache key, the autotuner, the launcher's Python; benchmarks/results/host_overheads.md).
``launch`` does that work once per *signature* (the kernel, the dtypes and 16-byte alignment of its
pointer arguments, the exact values of its integer arguments and constexprs) and afterwards calls the
compiled kernel's launcher directly: the autotuner's choice, the grid and the constexpr tail of the
argument list are kept.
The signature is computed exactly as Triton specializes (a different alignment or integer is a
different entry), so the cache can only make a launch cheaper, never different.

The seam is also where `densenet-fused cost` observes: ``recording(observer, execute=False)``
hands every launch to ``observer(kernel, args, constexprs)`` (and skips it), instead of patching
Triton.  ``routing(device_type)`` (defined in ``densenet_fused._route``, below every layer; re-exported here)
makes the block's ops take their CUDA implementations, and the modules CUDA's autocast state, for tensors of
another device (meta tensors in `cost --host`).  Both are context managers that restore on exit; nothing
here is a process-wide switch.

Under ``TRITON_INTERPRET=1`` (CPU tests) launches go through Triton's interpreter unchanged.
"""
import contextlib
import contextvars
import os
from typing import Callable, Dict, Optional

import torch
from triton import knobs
from triton.knobs import HookChain as _HookChain
from triton.runtime import driver

from .._route import code_path_device_type, cuda_path, routing  # noqa: F401  (re-exported: launch.routing)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_observer: contextvars.ContextVar = contextvars.ContextVar("densenet_fused_launch_observer", default=None)
# ops.plan.recording: hears every launch made, with its resolved grid and compiled entry (None interpreted)
_plan_hook: contextvars.ContextVar = contextvars.ContextVar("densenet_fused_plan_hook", default=None)


@contextlib.contextmanager
def recording(observer: Callable, execute: bool = False, on_mark: Optional[Callable] = None):
    """Within, every launch calls ``observer(kernel, args, constexprs)``; with ``execute`` False the
    kernel is not run (fake tensors: `densenet-fused cost`).  ``on_mark(phase, layer)`` hears the
    block's ``mark`` calls (where each layer's work starts), to attribute launches to layers."""
    token = _observer.set((observer, execute, on_mark))
    try:
        yield
    finally:
        _observer.reset(token)


def interpreted(t: torch.Tensor) -> bool:
    """Whether a launch on ``t`` runs in Triton's interpreter (TRITON_INTERPRET=1 and a CPU tensor): the
    launchers pick small tiles there, and the GPU's tiles for CUDA (or fake, or meta) tensors."""
    return INTERPRET and t.device.type == "cpu"


# (id(kernel), signature) -> (compiled kernel, tail of constexpr / config values, autotuner config kwargs, kernel)
# (the kernel kept alive with its entry, so that its id is never reused by another)
_compiled: Dict[tuple, tuple] = {}


_Tensor = torch.Tensor
_int, _float = int, float


def _signature(args, constexprs) -> tuple:
    """What Triton specializes a launch on, cheaply: tensors by dtype and 16-byte alignment, floats by type,
    integers by value, every other value by (type, value) (exact values: over-specific, never wrong; the
    type keeps True apart from 1, which Triton types apart: i1, i32).  One comprehension: it runs per launch."""
    return (*[a if type(a) is _int else (a.dtype, not a.data_ptr() & 15) if isinstance(a, _Tensor)
              else _float if type(a) is _float else (type(a), a) for a in args], *constexprs.items())


def _first_launch(kernel, grid, args, constexprs):
    """Triton's own path (binder, autotuner, compile); returns (compiled kernel, tail values, config)."""
    import triton.runtime.autotuner as autotuner
    compiled = kernel[grid](*args, **constexprs)
    if hasattr(compiled, "result"):  # asynchronous compilation (triton 3.6)
        compiled = compiled.result()
    config = kernel.best_config.all_kwargs() if isinstance(kernel, autotuner.Autotuner) else {}
    fn = kernel
    while not hasattr(fn, "params"):
        fn = fn.fn
    values = {**constexprs, **config}
    tail = []
    for p in fn.params[len(args):]:
        if p.name in values:
            tail.append(values[p.name])
        elif p.has_default:
            tail.append(p.default)
        else:
            raise TypeError(f"launch: {fn.__name__} argument {p.name} was not given")
    return compiled, tuple(tail), {**constexprs, **config}, kernel


def _hook(h):
    """A launch hook as Triton's launcher takes it: None when there is nothing to call."""
    return None if h is None or (isinstance(h, _HookChain) and not h.calls) else h


def launch(kernel, grid, args, **constexprs) -> None:
    """``kernel[grid](*args, **constexprs)``, through the per-signature cache (module docstring).
    ``grid``: a tuple, or a function of the chosen config's kwargs (autotuned kernels)."""
    obs = _observer.get()
    if obs is not None:
        obs[0](kernel, args, constexprs)
        if not obs[1]:
            return
    if INTERPRET:
        kernel[grid](*args, **constexprs)
        hook = _plan_hook.get()
        if hook is not None:
            if callable(grid):
                raise RuntimeError("plan: an interpreted launch with a grid function cannot be recorded")
            hook(kernel, grid, args, constexprs, None)
        return
    key = (id(kernel), _signature(args, constexprs))  # id: hashing a JITFunction takes a lock
    entry = _compiled.get(key)
    if entry is None:
        entry = _compiled[key] = _first_launch(kernel, grid, args, constexprs)
        hook = _plan_hook.get()
        if hook is not None:
            hook(kernel, grid(entry[2]) if callable(grid) else grid, args, constexprs, entry)
        return
    compiled, tail, config, _ = entry
    if callable(grid):
        grid = grid(config)
    hook = _plan_hook.get()
    if hook is not None:
        hook(kernel, grid, args, constexprs, entry)
    drv = driver.active
    stream = drv.get_current_stream(drv.get_current_device())
    rt = knobs.runtime
    enter, leave = _hook(rt.launch_enter_hook), _hook(rt.launch_exit_hook)
    meta = None if enter is None else compiled.launch_metadata(grid, stream, *args, *tail)  # profilers (proton)
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, meta, enter, leave, *args, *tail)


def mark(phase: str, layer: int) -> None:
    """The block's sweeps say where each layer's work starts ("forward"/"backward", layer index; -1:
    block-level work) to the observer of ``recording``, if any."""
    if torch.compiler.is_compiling():  # nothing observes a traced graph
        return
    obs = _observer.get()
    if obs is not None and obs[2] is not None:
        obs[2](phase, layer)


def clear_cache() -> None:
    """Forget every compiled launch (tests; a new Triton driver)."""
    _compiled.clear()


def observer_active() -> Optional[tuple]:
    return _observer.get()
