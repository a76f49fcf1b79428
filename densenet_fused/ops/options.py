"""The named options of the GEMM-shaped ops (bnrelu_conv1x1, bnrelu_conv3x3): what an op does besides its
main product, as small typed values passed by keyword (``fold=FoldBN(...)``, ``dropout=Dropout(...)``).

They are NamedTuples: cheap to build on the block's hot path, and their fields unpack in the order the
launchers take them.  The registered ops' schemas (csrc/ops.cpp) carry them as short tensor lists
(``Tensor[] fold``, ...); each op file's Python wrapper does that lowering, in one place."""
from typing import NamedTuple, Optional

from torch import Tensor


class FoldBN(NamedTuple):
    """Also write the folded map of the BatchNorm that reads the op's output channels, from the batch
    statistics the op computes: ``out`` (3, C) float32 rows scale = gamma*rstd, shift = beta - mean*scale,
    rstd = 1/sqrt(var + eps), as ``bn_scale_shift`` computes them (one launch less per layer)."""
    out: Tensor
    gamma: Tensor
    beta: Tensor
    eps: float


class StatsOut(NamedTuple):
    """Write the batch mean and biased variance of the op's k output channels into the last k entries of
    these contiguous C + k float32 vectors (the block's statistics of every channel so far)."""
    mean: Tensor
    var: Tensor


class Dropout(NamedTuple):
    """Dropout of the output with probability ``p`` and the Philox mask of ``seed`` (int64, one element,
    on the device): the forward and the backward regenerate the same mask from it."""
    p: float
    seed: Tensor


class Accumulate(NamedTuple):
    """Also accumulate the block's per-channel BatchNorm-gradient scalars in place:
    P += scale*dbeta/count and Q += scale*rstd*dgamma/count (``count``: values per channel)."""
    P: Tensor
    Q: Tensor
    count: int


class GradFinish(NamedTuple):
    """The op's incoming gradient is formed tile by tile from a BatchNorm's pieces instead of read
    (``bn_grad_finish``'s formula): ``scale*g - p - (x - mean)*q`` rounded to x's dtype, where g is the tensor
    passed as the gradient (without ``scale``: ``g - p - (x - mean)*q``, g being the block's fp32 sum G)."""
    x: Tensor
    mean: Tensor
    p: Tensor
    q: Tensor
    scale: Optional[Tensor] = None


def lowered(op: str, name: str, tensors, fields, optional: bool = False) -> tuple:
    """A schema list argument (``Tensor[] name``) as the tuple of its ``fields``; None or an empty list is a
    tuple of Nones where the option is ``optional`` (``Tensor[]? name=None``).  Any other length is refused with one line naming the fields."""
    if optional and not tensors:  # None (the schema's default) or []
        return (None,) * len(fields)
    if len(tensors) == len(fields):
        return tuple(tensors)
    raise RuntimeError(f"{op}: expected {name} = {'[] or ' if optional else ''}[{', '.join(fields)}], got "
                       f"{len(tensors)} tensors")
