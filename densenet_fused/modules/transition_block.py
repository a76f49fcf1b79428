"""``transition_into_block``: a FusedTransition and the FusedDenseBlock after it, checked as the two
modules, run as one autograd node (autograd/transition_block.py): the transition writes its output
straight into the block's buffer.  Used by features.FusedFeatures for every ``transitionI,
denseblockI+1`` pair without hooks."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..autograd.transition_block import TransitionBlockFunction, transition_block_forward
from .dense import FusedDenseBlock, fused_block_setup
from .transition import FusedTransition, begin_transition, prepare_transition


def transition_into_block(transition: FusedTransition, block: FusedDenseBlock, x: Tensor,
                          stats: Optional[Tuple[Tensor, Tensor]] = None, with_stats: bool = False):
    """``block(transition(x, stats))`` with the transition's output written into the block's buffer;
    ``(out, mean, var)`` as ``block.forward_with_stats`` with ``with_stats``.  Every check of both
    modules runs before any state changes.  The modules must have no hooks (the caller calls hooked
    modules one by one)."""
    prep = prepare_transition(transition, x, stats)
    n, c, ho, wo = prep.out_shape
    # the block's checks on what the transition will output (shape, dtype, device): a stand-in of one element
    standin = torch.empty((), dtype=prep.dtype, device=x.device).expand(n, c, ho, wo)
    bspec, bparams = fused_block_setup(block, standin, with_stats)
    tspec, tparams, t_mean, t_var = begin_transition(prep)
    xin = prep.x
    if torch.is_grad_enabled() and (xin.requires_grad or any(p.requires_grad for p in (*tparams, *bparams))):
        return TransitionBlockFunction.apply(tspec, bspec, xin, *tparams, t_mean, t_var, *bparams)
    with torch.autocast(x.device.type, enabled=False):
        out, _, _, (_, mean, var) = transition_block_forward(tspec, bspec, xin, tparams, t_mean, t_var, bparams,
                                                             save=False)
    return (out, mean, var) if with_stats else out
