"""A block's training step from a recorded launch plan (ops/plan.py; docs/design.md section 8).

The first training forward with a given step signature runs the sweep as always and records it, and its
backward records the reverse sweep (inheriting the forward's kept allocations: the saved statistics and
folded maps); later steps replay both with integer pointers.  A replayed forward saves two tensors for
its backward (the batch mean and the forward's kept workspace, plus the dropout seeds) instead of seven
per layer; its backward materializes only the parameter gradients, as views of its own kept workspace.
On by default wherever it applies (``block_plan``); ``planning(False)`` turns it off within (the unplanned
sweep is the same launches with the same arguments: tests/autograd/test_planned.py).
"""
import contextlib
import contextvars
import weakref
from typing import List, Optional, Sequence

import torch

from ..ops.launch import observer_active
from ..ops.plan import Plan, Recorder, Ref, Views

_enabled: contextvars.ContextVar = contextvars.ContextVar("densenet_fused_planning", default=True)
# first layer module -> {step signature: BlockPlan}; not on the module, which deepcopy (EMA copies) and
# pickling (torch.save of a model) must not see
_plans: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
MAX_PLANS = 8  # per block: the step signatures whose plans are kept


@contextlib.contextmanager
def planning(enabled: bool = True):
    """Within, blocks plan their training steps, or with ``enabled=False`` do not (restored on exit)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"planning: expected enabled to be a bool, got {type(enabled).__name__}")
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)


class BlockPlan:
    """A recorded forward, its backward, and the references of what each hands on."""

    def __init__(self):
        self.fwd: Optional[Plan] = None
        self.bwd: Optional[Plan] = None
        self.bn2: List[tuple] = []        # per layer: BN2's batch (mean, var) (the running-statistics update)
        self.grads: List[Ref] = []        # the backward's parameter gradients
        self.refused: Optional[str] = None  # why this signature's steps run unplanned (``refuse``)

    def replayable(self, save: bool) -> bool:
        """A forward replays once recorded, and, when it saves for a backward, once that is recorded too."""
        return self.fwd is not None and (self.bwd is not None or not save)

    def record_forward(self, rec: Recorder, bn2_stats) -> None:
        self.bn2 = [(rec.ref(a), rec.ref(b)) for a, b in bn2_stats]
        self.fwd, self.bwd = rec.plan, None  # (a backward recorded against an earlier forward recording is void)
        rec.drop_roots()

    def refuse(self, why: str) -> None:
        """This signature's steps run unplanned from now on (docs/design.md section 8 lists why)."""
        self.refused, self.fwd, self.bwd = why, None, None

    def replay_forward(self, roots: Sequence[torch.Tensor]):
        """(the kept workspace, BN2's statistics per layer as views of it)."""
        ws = self.fwd.new_workspaces(roots[0].device)
        self.fwd.run(roots, ws)
        views = Views(roots, ws)
        return ws[0], [(views(a), views(b)) for a, b in self.bn2]

    def record_backward(self, rec: Recorder, grads) -> None:
        if not rec.plan.launches:  # (its launches did not pass the seam: a replay would compute nothing)
            self.refuse("its backward launched no kernel through the seam")
            return
        self.grads = [rec.ref(g) for g in grads]
        self.bwd = rec.plan


class PlanUse:
    """What a planned forward hands its backward (on the autograd ctx): the block's plan and, when the forward
    recorded, its recording (``recorder``; None once the backward has recorded) and the tensors it saved
    (``stats``: statistics, parameters, cast weights; the backward records only if it gets these very
    tensors back, as the recording knows them and the weight views it hands on are views of them)."""
    __slots__ = ("block", "recorder", "replayed", "stats")

    def __init__(self, block: BlockPlan, recorder: Optional[Recorder] = None, stats: Sequence = ()):
        self.block, self.recorder, self.stats = block, recorder, list(stats)
        # a replayed forward's backward: the plan recorded for it (whatever the block records later)
        self.replayed = (block.bwd, block.grads) if recorder is None else None

    def replay_backward(self, roots: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The parameter gradients (``roots``: the backward's, then the forward's kept workspace)."""
        bwd, grads = self.replayed
        ws = bwd.new_workspaces(roots[0].device)
        bwd.run(roots, ws)
        views = Views(roots, ws)
        return [views(r) for r in grads]

    def traced(self) -> None:
        """The backward is being traced (compiled autograd): it runs unplanned and this signature is refused
        (a traced backward's launches never reach the seam as pointers).  After a replayed forward, which saved
        its statistics only in its plan's workspace, the backward cannot run unplanned: that raises."""
        self.recorder, self.stats = None, []
        self.block.refuse("its backward is traced (compiled autograd)")
        if self.replayed is not None:
            raise RuntimeError("FusedDenseBlock: this step's forward replayed a recorded launch plan, and its backward "
                               "is being traced (compiled autograd), which a plan cannot be: run the forwards of "
                               "steps whose backward is compiled under `with densenet_fused.planning(False):`.")

    def backward_recorder(self, stats, roots) -> Optional[Recorder]:
        """A Recorder for the backward of a recorded forward (None: run it unplanned).  ``roots``: the
        backward's; the forward's kept workspace is the next root.  The backward must get the forward's own
        saved tensors back: a saved-tensor hook (``save_on_cpu``) or a recomputing checkpoint hands new
        ones, whose places the recording does not know, and this signature is then refused."""
        rec, self.recorder, saved, self.stats = self.recorder, None, self.stats, []
        if rec is None or rec.plan is not self.block.fwd:  # (another recording of the forward superseded it)
            return None
        if len(stats) != len(saved) or any(a is not b for a, b in zip(stats, saved)):
            self.block.refuse("the backward got its saved tensors back as new tensors (a saved-tensor hook or "
                              "a recomputing checkpoint)")
            return None
        placeholder = torch.empty(0, device=roots[0].device)  # (its allocations are inherited)
        return Recorder(list(roots) + [placeholder], inherit=(rec, len(roots)))


def block_plan(spec, x, params, fed: bool) -> Optional[BlockPlan]:
    """The plan of this step (recorded or to record), or None where the step is not planned: eval,
    SyncBatchNorm, kept bottlenecks, a buffer written by a transition, an empty batch, ops other than the
    Triton ones, parameters other than float32 (their gradients would be cast outside the plan), within
    ``planning(False)``, and under an observer that does not run the launches."""
    from ..ops.table import TRITON_DIRECT, block_ops
    if (x is None or fed or not spec.training or spec.sync is not None or spec.keep_bottleneck or x.numel() == 0
            or torch.is_inference_mode_enabled()):  # (inference tensors' views do not name their base)
        return None
    ops = spec.ops if spec.ops is not None else block_ops(x.device, dtype=spec.dtype, conv3x3=spec.conv3x3_impl)
    if ops is not TRITON_DIRECT or not _enabled.get() or any(p.dtype != torch.float32 for p in params):
        return None
    observer = observer_active()
    if observer is not None and not observer[1]:  # `cost` counting launches it does not run: nothing to record
        return None
    layers = spec.layers
    key = (x.device, tuple(x.shape), x.stride(), x.dtype, spec.dtype, spec.conv3x3_impl,
           torch.backends.cuda.matmul.allow_tf32,
           tuple((float(l.drop_rate), l.training, l._modules["norm1"].eps, l._modules["norm2"].eps) for l in layers),
           tuple((p.dtype, tuple(p.shape), p.stride(), p.data_ptr() & 15) for p in params))
    plans = _plans.setdefault(layers[0], {})
    plan = plans.pop(key, None)  # (re-inserted: the dict is in order of last use)
    if plan is None:
        if len(plans) >= MAX_PLANS:  # (varying shapes: the least recently used signature's plan goes)
            del plans[next(iter(plans))]
        plan = BlockPlan()
    plans[key] = plan
    return None if plan.refused else plan
