"""A transition and the dense block after it as one autograd node (docs/design.md section 9): the
transition writes its output straight into the first C_0 channels of the block's buffer, so the
block copies nothing in, and the block computes those channels' statistics there, once.

Used by features.FusedFeatures for every ``transitionI, denseblockI+1`` pair without hooks.  It
saves what the two nodes would save apart (the transition's input, which is the previous block's
buffer, and the block's own), and backward runs the block's reverse sweep, then the transition's
backward on the gradient of the block input.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .block import _first_order_only, block_backward, block_forward, new_buffer, save_block, saved_block
from .modules import FusedDenseBlock, fused_block_setup
from .transition import (FusedTransition, _transition_forward, begin_transition, prepare_transition,
                         transition_backward)


def _forward(tspec, bspec, x, tparams, t_mean, t_var, bparams, save: bool):
    n, _, h, w = x.shape
    ho, wo = h // 2, w // 2
    c0 = bspec.num_input_features
    c_total = c0 + len(bspec.layers) * bspec.growth_rate
    buf = new_buffer(n, c_total, ho, wo, bspec.dtype, x.device)
    _, tsaved = _transition_forward(tspec, x, *tparams, t_mean, t_var,
                                    out=buf.permute(0, 2, 3, 1).view(-1, c_total)[:, :c0])
    out, bsaved, extra = block_forward(bspec, None, bparams, save=save, extra=True, buf=buf)
    return out, tsaved, bsaved, extra


class TransitionBlockFunction(torch.autograd.Function):
    """One autograd node: a FusedTransition's op writing into a FusedDenseBlock's buffer, then the
    block.  Outputs as FusedDenseBlockFunction: out, or (out, mean, var) with ``bspec.with_stats``."""

    @staticmethod
    def forward(ctx, tspec, bspec, x: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor, t_mean: Tensor,
                t_var: Tensor, *bparams: Tensor):
        with torch.autocast(x.device.type, enabled=False):
            out, tsaved, bsaved, (count, mean, var) = _forward(tspec, bspec, x, (gamma, beta, weight), t_mean, t_var,
                                                               bparams, save=True)
        ctx.tspec = tspec
        ctx.param_dtypes = (gamma.dtype, beta.dtype, weight.dtype)
        return save_block(ctx, bspec, out, bsaved, count, bparams, mean, var, before=(x, *tsaved))

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out, _grad_mean=None, _grad_var=None):
        (x, *tsaved), out, stats, kept, weights, bparams = saved_block(ctx)
        need_t = any(ctx.needs_input_grad[2:6])  # x, the transition's gamma, beta, weight
        with torch.autocast(out.device.type, enabled=False):
            dxb, grads = block_backward(ctx.spec, out, grad_out, bparams, stats, ctx.seeds, kept, weights,
                                        (ctx.spec.dtype, True), need_t, ctx.count)
            tgrads = (None,) * 4
            if need_t:
                tgrads = transition_backward(ctx.tspec, x, tsaved, dxb, ctx.param_dtypes)
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[8:])]
        return (None, None, *tgrads, None, None, *grads)


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
        out, _, _, (_, mean, var) = _forward(tspec, bspec, xin, tparams, t_mean, t_var, bparams, save=False)
    return (out, mean, var) if with_stats else out
