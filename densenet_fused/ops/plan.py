"""A per-shape launch plan (docs/design.md section 8; the block's use of it: autograd/planned.py).

A sweep's launches are recorded once, on the first step with a given signature, and later steps replay
them straight into the compiled kernels' launchers with integer pointers: no launcher Python, no views, no
per-launch allocations, no signature look-up.  What a replay needs of each launch:

- the compiled kernel, its resolved grid and its constexpr tail (the seam's cache entry);
- each tensor argument as a *reference*: a root allocation (an index into the roots the caller passes at
  replay: the block's buffer, G, the parameters, ...) or one of the plan's two workspaces, plus a byte
  offset;
- every other argument as it was.

Tensors the launchers allocate are allocated through ``alloc``: while a ``Recorder`` is active each one is
given a place in one of two workspaces (bump allocators): the *transient* one, whose region the next layer
reuses (partial buffers, a bottleneck consumed within the layer), or, with ``keep=True``, the *kept* one,
never reused within the sweep (what escapes the layer: statistics, gradients).  The replay allocates the
two workspaces once per sweep and every such tensor is a pointer into them.  A tensor argument that is
neither a root nor a live recorded allocation is refused: the recording raises, never a plan that would
point at memory a later step does not have.  A recording can inherit an earlier one's kept allocations as
parts of one root (a backward, its forward's kept workspace).

Replay: ``Plan.run(roots, workspaces)``.  Under Triton's interpreter, under `cost`'s observer and under a
profiler's launch hooks the replay materializes each reference as a view (``Views``) and launches through
the seam, so the CPU tests check the plan's offsets against the unplanned sweep, bit for bit.
"""
import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import launch as _seam

_ALIGN = 256  # bytes: each transient starts on a 256-byte boundary, as the CUDA caching allocator's blocks do

_recorder: contextvars.ContextVar = contextvars.ContextVar("densenet_fused_plan_recorder", default=None)
_poison = [False]  # (a list, not a context variable: autograd's device threads must see it too)


@contextlib.contextmanager
def poisoned():
    """Within, a replay's workspaces start filled with 0xFF bytes (NaN in every float dtype), so that a test
    finds a replay that reads what no recorded launch wrote (work done outside the seam: a fill, a copy).
    For tests; restored on exit."""
    old, _poison[0] = _poison[0], True
    try:
        yield
    finally:
        _poison[0] = old


def alloc(shape, dtype: torch.dtype, device, keep: bool = False,
          memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``torch.empty(shape, dtype, device, memory_format)``; while a Recorder is active, also given its place in
    the plan's workspaces (``keep``: it outlives the current layer: an output the caller keeps, not a partial
    buffer)."""
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    rec = _recorder.get()
    if rec is not None:
        rec.place(t, keep)
    return t


@dataclass(frozen=True)
class Ref:
    """A tensor argument of a planned launch: ``root`` (an index into the replay's roots, or TRANSIENT /
    KEPT: a workspace) plus ``offset`` bytes, with the view's shape, strides and dtype (to materialize it)."""
    root: int
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: torch.dtype


@dataclass
class PlannedLaunch:
    kernel: Any                 # what the seam launched (to launch materialized views through it)
    grid: Tuple[int, int, int]  # resolved
    args: Tuple[Any, ...]       # Ref for a tensor, the value otherwise
    constexprs: Dict[str, Any]
    entry: Any                  # the seam's compiled entry (compiled kernel, tail, config, kernel)


TRANSIENT, KEPT = -1, -2  # Ref.root of the two workspaces


@dataclass
class Plan:
    launches: List[PlannedLaunch] = field(default_factory=list)
    transient_bytes: int = 0
    kept_bytes: int = 0
    _calls: Optional[list] = field(default=None, repr=False)  # _direct's

    def new_workspaces(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the kept workspace, the transient one) of one replay."""
        if _poison[0]:
            return tuple(torch.full((max(n, 1),), 255, dtype=torch.uint8, device=device)
                         for n in (self.kept_bytes, self.transient_bytes))
        return tuple(torch.empty(max(n, 1), dtype=torch.uint8, device=device)
                     for n in (self.kept_bytes, self.transient_bytes))

    def run(self, roots: Sequence[torch.Tensor], workspaces: Tuple[torch.Tensor, torch.Tensor]) -> None:
        """Every recorded launch, in order, on ``roots`` and ``workspaces`` (``new_workspaces``): straight into
        the compiled launchers with integer pointers, or through the seam on materialized views under the
        interpreter, an observer, or a profiler's launch hooks (which the seam calls)."""
        rt = _seam.knobs.runtime
        if (_seam.INTERPRET or _seam.observer_active() is not None or _seam._hook(rt.launch_enter_hook) is not None
                or _seam._hook(rt.launch_exit_hook) is not None):
            self._run_views(roots, workspaces)
            return
        bases = [r.data_ptr() for r in roots] + [w.data_ptr() for w in workspaces]  # [-2]: kept, [-1]: transient
        drv = _seam.driver.active
        stream = drv.get_current_stream(drv.get_current_device())
        for run, args, slots in self._direct():
            args = args.copy()
            args[3] = stream
            for i, r, o in slots:
                args[i] = bases[r] + o
            run(*args)

    def _direct(self):
        """Per launch: (the compiled launcher, its argument list with the stream and the pointers left to fill,
        (position, root, offset) of each pointer), built once."""
        if self._calls is None:
            calls = []
            for pl in self.launches:
                compiled, tail = pl.entry[0], pl.entry[1]
                head = [*pl.grid, None, compiled.function, compiled.packed_metadata, None, None, None]
                args = head + [None if type(a) is Ref else a for a in pl.args] + list(tail)
                slots = tuple((len(head) + i, a.root, a.offset) for i, a in enumerate(pl.args) if type(a) is Ref)
                calls.append((compiled.run, args, slots))
            self._calls = calls
        return self._calls

    def _run_views(self, roots, workspaces) -> None:
        views = Views(roots, workspaces)
        for pl in self.launches:
            args = [views(a) if type(a) is Ref else a for a in pl.args]
            _seam.launch(pl.kernel, pl.grid, args, **pl.constexprs)


class Views:
    """The views Refs stand for on one replay's roots and workspaces (``as_strided`` of the base, viewed once
    per dtype)."""

    def __init__(self, roots: Sequence[torch.Tensor], workspaces: Tuple[torch.Tensor, torch.Tensor]):
        self._bases = list(roots) + list(workspaces)  # [-2]: kept, [-1]: transient (Ref.root KEPT, TRANSIENT)
        self._typed: Dict[Tuple[int, torch.dtype], torch.Tensor] = {}

    def __call__(self, ref: Ref) -> torch.Tensor:
        typed = self._typed.get((ref.root, ref.dtype))
        if typed is None:
            base = self._bases[ref.root]
            typed = torch.empty(0, dtype=ref.dtype, device=base.device).set_(base.untyped_storage())
            self._typed[(ref.root, ref.dtype)] = typed
        start = self._bases[ref.root].storage_offset() * self._bases[ref.root].element_size() + ref.offset
        size = typed.element_size()
        if start % size:
            raise ValueError(f"plan: offset {ref.offset} of root {ref.root} is not a multiple of {ref.dtype}'s size")
        return typed.as_strided(ref.shape, ref.stride, start // size)


class Recorder:
    """Records the launches of a sweep into a Plan (``recording``)."""

    def __init__(self, roots: Sequence[torch.Tensor], inherit: Optional[Tuple["Recorder", int]] = None):
        """``inherit = (recorder, index)``: the kept allocations of an earlier recording (a forward's, for its
        backward) are parts of the root at ``index`` (at replay: that recording's kept workspace)."""
        self.plan = Plan()
        self._roots = {id(r): i for i, r in enumerate(roots)}
        self._keep: List[torch.Tensor] = list(roots)  # alive while recording: ids are never reused
        self._kept: List[torch.Tensor] = []  # the kept allocations (what a later recording inherits)
        self._placed: Dict[int, Tuple[int, int]] = {}  # id(tensor) -> (workspace, offset)
        if inherit is not None:
            earlier, index = inherit
            self._kept += earlier._kept
            self._placed.update({i: (index, off) for i, (ws, off) in earlier._placed.items() if ws == KEPT})
        self._cursor = {KEPT: 0, TRANSIENT: 0}
        self._transients: List[torch.Tensor] = []  # the current layer's (held while placed: ids are not reused)

    def place(self, t: torch.Tensor, keep: bool) -> None:
        ws = KEPT if keep else TRANSIENT
        off = self._cursor[ws]
        self._cursor[ws] = _up(off + t.numel() * t.element_size())
        self._placed[id(t)] = (ws, off)
        (self._kept if keep else self._transients).append(t)
        self.plan.kept_bytes = max(self.plan.kept_bytes, self._cursor[KEPT])
        self.plan.transient_bytes = max(self.plan.transient_bytes, self._cursor[TRANSIENT])

    def add_root(self, t: torch.Tensor) -> None:
        if id(t) not in self._roots:
            self._roots[id(t)] = len(self._roots)
            self._keep.append(t)

    def drop_roots(self) -> None:
        """The recording is done: let its roots go (a later recording inherits only the kept allocations; a
        recording held until then must not keep the block's output, and the autograd graph behind it, alive)."""
        self._keep, self._roots = [], {}

    def next_layer(self) -> None:
        """The layer's transients are dead: the next layer reuses their region, and the recording lets them
        go (a later use of one is refused, and its memory is not held past the layer: recording costs no
        memory)."""
        self._cursor[TRANSIENT] = 0
        for t in self._transients:
            del self._placed[id(t)]
        self._transients = []

    def ref(self, t: torch.Tensor) -> Ref:
        root = t if t._base is None else t._base  # (Tensor._base: the view's base, listed in design.md 11)
        offset = t.storage_offset() * t.element_size() - root.storage_offset() * root.element_size()
        meta = (tuple(t.shape), tuple(t.stride()), t.dtype)
        if id(root) in self._roots:
            return Ref(self._roots[id(root)], offset, *meta)
        if id(root) in self._placed:
            ws, base = self._placed[id(root)]
            return Ref(ws, base + offset, *meta)
        raise RuntimeError(f"plan: a launch argument of shape {tuple(t.shape)} is neither a root nor allocated "
                           f"through plan.alloc: it cannot be planned")

    def launched(self, kernel, grid, args, constexprs, entry) -> None:
        refs = tuple(self.ref(a) if isinstance(a, torch.Tensor) else a for a in args)
        self.plan.launches.append(PlannedLaunch(kernel, _grid3(grid), refs, dict(constexprs), entry))


def root(t: torch.Tensor) -> torch.Tensor:
    """``t``; within a recording, also one of the plan's roots (the next index: a replay passes its roots
    in the order they were registered)."""
    rec = _recorder.get()
    if rec is not None:
        rec.add_root(t)
    return t


def next_layer() -> None:
    """A layer's work is done (the block calls it at each layer's start): within a recording, the next
    layer's transients take the place of this one's."""
    rec = _recorder.get()
    if rec is not None:
        rec.next_layer()


def _up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _grid3(grid) -> Tuple[int, int, int]:
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


@contextlib.contextmanager
def recording(recorder: Recorder):
    """Within, ``alloc`` places transients and every launch through the seam is recorded (and run)."""
    token = _recorder.set(recorder)
    token2 = _seam._plan_hook.set(recorder.launched)
    try:
        yield recorder
    finally:
        _seam._plan_hook.reset(token2)
        _recorder.reset(token)
        recorder.next_layer()  # (the last layer's transients)
