"""The non-finite stop of ``densenet-fused train``: each step's loss and gradient norm are kept on
the device and checked every few steps (one host synchronization per check, none per step); the
first step whose loss or gradient norm is NaN or Inf stops the run before its epoch is saved."""
import math
from typing import Iterable

import torch

from .config import TrainStopped

CHECK_EVERY = 10  # steps between two checks (the progress bar's pace)
_NONE = 2 ** 62   # "no bad step" in the cross-process minimum


class NonFinite(TrainStopped):
    def __init__(self, epoch: int, step: int, steps: int, loss: float, grad_norm: float):
        self.step, self.steps, self.loss, self.grad_norm = step, steps, loss, grad_norm
        what = "gradient norm" if math.isfinite(loss) else "training loss"
        super().__init__(f"non-finite {what} at epoch {epoch}, step {step} of {steps} (loss {loss:g}, "
                         f"gradient norm {grad_norm:g})", epoch)


class NonFiniteWatch:
    """Records step ``i``'s loss and total gradient norm (device tensors, no synchronization) and
    raises :class:`NonFinite` at :meth:`check` naming the first step (1-based) with either non-finite;
    across processes (``world`` > 1) every process raises at the same check."""

    def __init__(self, steps: int, device: torch.device, world: int = 1):
        self.steps, self.world = steps, world
        self.loss = torch.zeros(steps, dtype=torch.float32, device=device)
        self.grad_norm = torch.zeros(steps, dtype=torch.float32, device=device)
        self.checked = 0

    def record(self, step: int, loss: torch.Tensor, params: Iterable[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self.loss.select(0, step).copy_(loss.detach())
        self.grad_norm.select(0, step).copy_(norm)

    def due(self, step: int) -> bool:
        return (step + 1) % CHECK_EVERY == 0 or step + 1 == self.steps

    def check(self, epoch: int, upto: int) -> None:
        """Steps ``checked .. upto - 1`` (0-based); ``epoch`` is 1-based, for the message."""
        if upto <= self.checked:
            return
        part = slice(self.checked, upto)
        bad = ~(torch.isfinite(self.loss[part]) & torch.isfinite(self.grad_norm[part]))
        first = torch.where(bad.any(), bad.int().argmax() + self.checked, _NONE)
        if self.world > 1:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        first = int(first.item())
        self.checked = upto
        if first != _NONE:
            raise NonFinite(epoch, first + 1, self.steps, self.loss[first].item(), self.grad_norm[first].item())
