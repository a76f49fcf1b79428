"""The dense block as one autograd node over a shared NHWC feature buffer (docs/design.md sections 2-3).

Forward writes every layer's k new channels into one preallocated (N*H*W, C_total) buffer
and computes each channel's batch statistics once, when it is written.  Backward sweeps
the layers in reverse with one fp32 gradient buffer G and per-channel scalars P, Q:
the input gradient of every channel c is ``G_c - P_c - (x_c - mean_c) * Q_c`` once all
layers reading it are done.  Saved for backward: the buffer (which is the output), the
per-channel statistics, per-layer BN2 statistics, dropout seeds and the parameters.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .ops import (bn_grad_finish, bn_scale_shift, bnrelu_conv1x1_bwd, bnrelu_conv1x1_fwd, bnrelu_conv3x3_bwd,
                  bnrelu_conv3x3_fwd, channel_stats, running_stats_update)
from .ops._common import acc_dtype
from .distributed import StatsGroup

PARAMS_PER_LAYER = 6  # norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight

# Optional observer of the sweeps: called as trace(phase, layer) when a layer starts
# ("forward"/"backward", layer index) and trace(phase, -1) when its block-level work starts.
# `densenet-fused cost` uses it to attribute the counted launches to layers.
trace = None


@dataclass
class BlockSpec:
    """What the autograd node needs besides tensors: the layer modules and the mode."""
    layers: Sequence[torch.nn.Module]  # FusedDenseLayer-like: norm1, conv1, norm2, conv2, drop_rate
    num_input_features: int
    growth_rate: int
    training: bool       # batch statistics (True) or running statistics (False)
    dtype: torch.dtype   # buffer / compute dtype
    keep_bottleneck: bool = False  # save each layer's B (M x bn_size*k) instead of recomputing it
    conv3x3_impl: str = ""         # "aten" / "triton" on CUDA; "" follows ops.set_conv3x3_impl
    sync: Optional[StatsGroup] = None  # batch statistics over this process group (SyncBatchNorm norms)
    with_stats: bool = False  # the autograd node also outputs the batch (mean, var) of the output channels


def _layer_params(params, l):
    return params[PARAMS_PER_LAYER * l:PARAMS_PER_LAYER * (l + 1)]


def _affine(bn, gamma, beta, batch, acc):
    """(mean, rstd, scale, shift) of a BatchNorm with batch statistics ``batch = (mean, var)``, or
    with its running statistics when ``batch`` is None."""
    mean, var = batch if batch is not None else (bn.running_mean.to(acc), bn.running_var.to(acc))
    scale, shift, rstd = bn_scale_shift(gamma, beta, mean, var, bn.eps)
    return mean, rstd, scale, shift


def _dropout_seeds(num_layers, device):
    """One dropout seed per layer, drawn on the device in one launch (no host synchronization, CUDA-graph
    capturable); the conv3x3 ops regenerate a layer's Philox mask from its seed in the forward and the
    backward (ops.bnrelu_conv3x3.dropout_mask)."""
    return torch.randint(0, 2 ** 62, (num_layers,), dtype=torch.int64, device=device)


PER_LAYER_SAVED = 7  # scale1, shift1, rstd1, mean2, rstd2, scale2, shift2


def _compute_weights(spec: BlockSpec, params) -> Optional[torch.Tensor]:
    """Every layer's W1 and W2 in the compute dtype, cast in one pass per step into one flat tensor
    that backward reuses; None when the parameters are already in the compute dtype."""
    ws = [params[PARAMS_PER_LAYER * l + i] for i in (2, 5) for l in range(len(spec.layers))]
    if all(w.dtype == spec.dtype for w in ws):
        return None
    return torch.cat([w.reshape(-1) for w in ws]).to(spec.dtype)  # one batched copy, one cast


def _weights(spec: BlockSpec, params, flat: Optional[torch.Tensor], l: int):
    """(W1 as (cb, C_l), W2) of layer l in the compute dtype (views of ``flat`` when cast)."""
    w1, w2 = params[PARAMS_PER_LAYER * l + 2], params[PARAMS_PER_LAYER * l + 5]
    cb = w1.shape[0]
    c_l = spec.num_input_features + l * spec.growth_rate
    if flat is None:
        return w1.view(cb, c_l), w2
    k = spec.growth_rate
    w1_end = cb * (len(spec.layers) * spec.num_input_features + k * len(spec.layers) * (len(spec.layers) - 1) // 2)
    o1 = cb * (l * spec.num_input_features + k * l * (l - 1) // 2)
    o2 = w1_end + l * w2.numel()
    return flat[o1:o1 + cb * c_l].view(cb, c_l), flat[o2:o2 + w2.numel()].view(w2.shape)


def block_forward(spec: BlockSpec, x: Optional[torch.Tensor], params: Sequence[torch.Tensor], save: bool,
                  extra: bool = False, buf: Optional[torch.Tensor] = None):
    """Run the block.  Returns (output, saved) where saved = (tensors, seeds, kept) holds what
    backward needs (None when ``save`` is False): tensors = [batch mean (None in eval), the cast
    weights (None when not cast)] + PER_LAYER_SAVED folded-BN vectors per layer, so backward
    recomputes no scale/shift and casts no weight.  With ``extra``, returns (output, saved,
    (count, mean, var)): the number of values per channel of the batch statistics (global with
    ``spec.sync``; backward needs it) and the batch mean and biased variance of all output channels
    (None in eval), for the modules that read the output with a BatchNorm of their own.

    With ``spec.sync`` every channel set's statistics are merged over the process group right
    after they are computed (block input, each layer's bottleneck, each layer's k new channels)
    and the BatchNorm maps folded from the merged ones.

    ``buf``: the block's (N, H, W, C_total) buffer with the input already written into its first
    C_0 channels (by a transition: transition_block.py); x is then not read (None)."""
    if buf is not None:
        n, h, w, _ = buf.shape
        c0 = spec.num_input_features
    else:
        n, c0, h, w = x.shape
    m = n * h * w
    k = spec.growth_rate
    num_layers = len(spec.layers)
    c_total = c0 + num_layers * k
    dtype, acc = spec.dtype, acc_dtype(spec.dtype)
    dev = (x if buf is None else buf).device
    sync = spec.sync if spec.training else None
    count = m
    if trace is not None:
        trace("forward", -1)

    if buf is None:
        buf = torch.empty((n, h, w, c_total), dtype=dtype, device=dev)
        buf[..., :c0].copy_(x.permute(0, 2, 3, 1))
    elif buf.shape != (n, h, w, c_total) or buf.dtype != dtype or not buf.is_contiguous():
        raise ValueError(f"block_forward: expected a contiguous ({n}, {h}, {w}, {c_total}) {dtype} buffer, got "
                         f"{tuple(buf.shape)} {buf.dtype}")
    buf2 = buf.view(m, c_total)
    flat_w = _compute_weights(spec, params)
    mean = var = None
    bn2_stats: List[Tuple[torch.Tensor, torch.Tensor]] = []
    if spec.training:
        mean = torch.empty(c_total, dtype=acc, device=dev)
        var = torch.empty(c_total, dtype=acc, device=dev)
        eps0 = spec.layers[0].norm1.eps if num_layers else 1e-5
        mu, v, _ = channel_stats(buf2[:, :c0], eps0)
        if sync is not None:
            count, mu, v = sync.merge_moments(m, mu, v, want_count=True)
        mean[:c0], var[:c0] = mu, v
    seeds: List[Optional[torch.Tensor]] = []  # per layer: its dropout seed (a 1-element device tensor)
    kept: List[torch.Tensor] = []
    per_layer: List[torch.Tensor] = []
    cb = spec.layers[0].conv1.out_channels if num_layers else 0
    aff1: Optional[torch.Tensor] = None  # (scale1, shift1, rstd1) of the next layer, when already folded
    for l, layer in enumerate(spec.layers):
        if trace is not None:
            trace("forward", l)
        c_l = c0 + l * k
        g1, b1, _, g2, b2, _ = _layer_params(params, l)
        w1c, w2c = _weights(spec, params, flat_w, l)
        if aff1 is not None:  # folded by the previous layer's statistics merge
            scale1, shift1, r1 = aff1.unbind(0)
        else:
            batch1 = (mean[:c_l], var[:c_l]) if spec.training else None
            _, r1, scale1, shift1 = _affine(layer.norm1, g1, b1, batch1, acc)
        aff1 = None
        if spec.training:  # B, its statistics and BN2's folded map from them, written by the same op
            aff2 = torch.empty((3, cb), dtype=acc, device=dev)
            bott, m2, bv = bnrelu_conv1x1_fwd(buf2[:, :c_l], scale1, shift1, w1c, True, aff2, g2, b2,
                                              layer.norm2.eps)
            if sync is not None:  # the op folded local statistics: fold again from the merged ones
                _, m2, bv = sync.merge_moments(m, m2, bv)
                scale2, shift2, r2 = bn_scale_shift(g2, b2, m2, bv, layer.norm2.eps)
            else:
                scale2, shift2, r2 = aff2.unbind(0)
            bn2_stats.append((m2, bv))
        else:
            bott = bnrelu_conv1x1_fwd(buf2[:, :c_l], scale1, shift1, w1c, False)[0]
            m2, r2, scale2, shift2 = _affine(layer.norm2, g2, b2, None, acc)
        if save and spec.keep_bottleneck:
            kept.append(bott)
        per_layer += [scale1, shift1, r1, m2, r2, scale2, shift2]
        p = float(layer.drop_rate)
        new_slice = buf2[:, c_l:c_l + k]
        drop = {}
        if p > 0 and layer.training:  # the mask applied by the conv3x3 op, before the statistics
            if all(s is None for s in seeds):  # the step's first dropout layer draws every layer's seed
                step_seeds = _dropout_seeds(num_layers, dev)
            seed = step_seeds[l:l + 1]
            seeds.append(seed)
            drop = dict(drop_p=p, drop_seed=seed)
        else:
            seeds.append(None)
        if spec.training:  # the new channels' statistics written in place, and the next layer's BN1 map
            nxt = spec.layers[l + 1].norm1 if l + 1 < num_layers else None
            bn = ()
            if nxt is not None and sync is None:
                aff1 = torch.empty((3, c_l + k), dtype=acc, device=dev)
                bn = (aff1, nxt.weight, nxt.bias, nxt.eps)
            bnrelu_conv3x3_fwd(bott, scale2, shift2, w2c, [n, h, w], new_slice, True, spec.conv3x3_impl,
                               mean[:c_l + k], var[:c_l + k], *bn, **drop)
            if sync is not None:  # merged statistics; the next layer folds its map from them
                sl = slice(c_l, c_l + k)
                _, mean[sl], var[sl] = sync.merge_moments(m, mean[sl], var[sl])
        else:
            bnrelu_conv3x3_fwd(bott, scale2, shift2, w2c, [n, h, w], new_slice, False, spec.conv3x3_impl, **drop)

    if trace is not None:
        trace("forward", -1)
    if spec.training:
        bn1s = [layer.norm1 for layer in spec.layers]
        bn2s = [layer.norm2 for layer in spec.layers]
        running_stats_update(
            bn1s + bn2s,
            [mean[:c0 + l * k] for l in range(num_layers)] + [s[0] for s in bn2_stats],
            [var[:c0 + l * k] for l in range(num_layers)] + [s[1] for s in bn2_stats],
            count=count)
    out = buf.permute(0, 3, 1, 2)  # (N, C_total, H, W), channels-last strides
    saved = ([mean, flat_w] + per_layer, seeds, kept) if save else None
    return (out, saved, (count, mean, var)) if extra else (out, saved)


def block_backward(spec: BlockSpec, out, grad_out, params, stats, seeds, kept, x_meta, needs_input_grad,
                   count: int = 0):
    """Reverse sweep; returns (dx or None, [grad per param]).  ``count``: values per channel of the
    batch statistics (block_forward's; 0: the local N*H*W)."""
    n, c_total, h, w = out.shape
    m = n * h * w
    k = spec.growth_rate
    c0 = spec.num_input_features
    acc = acc_dtype(spec.dtype)
    dev = out.device
    sync = spec.sync if spec.training else None
    count = (count or m) if spec.training else 0  # values per channel of the batch statistics
    if trace is not None:
        trace("backward", -1)
    buf2 = out.permute(0, 2, 3, 1).reshape(m, c_total)  # a view: the buffer is NHWC
    mean, flat_w, per_layer = stats[0], stats[1], stats[2:]
    if not spec.training:
        mean = torch.zeros(c_total, dtype=acc, device=dev)
    G = torch.empty((n, h, w, c_total), dtype=acc, device=dev)
    G.copy_(grad_out.permute(0, 2, 3, 1))
    G = G.view(m, c_total)
    PQ = torch.zeros((2, c_total), dtype=acc, device=dev)  # one fill
    P, Q = PQ.unbind(0)
    grads: List[Optional[torch.Tensor]] = [None] * len(params)
    for l in reversed(range(len(spec.layers))):
        if trace is not None:
            trace("backward", l)
        layer = spec.layers[l]
        c_l = c0 + l * k
        g1, b1, w1, g2, b2, w2 = _layer_params(params, l)
        scale1, shift1, r1, m2, r2, scale2, shift2 = per_layer[PER_LAYER_SAVED * l:PER_LAYER_SAVED * (l + 1)]
        m1 = mean[:c_l] if spec.training else layer.norm1.running_mean.to(acc)
        w1c, w2c = _weights(spec, params, flat_w, l)

        # 1. the gradient of this layer's k output channels is complete: finish it.
        # (without dropout the conv3x3 backward finishes it on the fly from G, P, Q)
        sl = slice(c_l, c_l + k)
        if sync is not None and l + 1 < len(spec.layers):  # P, Q of these channels summed over the group
            PQ[:, sl] = sync.sum_(PQ[:, sl].contiguous())   # (the last layer's are zeros everywhere)
        if seeds[l] is not None:  # and through the forward's dropout mask, regenerated from its seed
            dnew, finish = G[:, sl], (buf2[:, sl], mean[sl], P[sl], Q[sl], float(layer.drop_rate), seeds[l])
        else:
            dnew, finish = G[:, sl], (buf2[:, sl], mean[sl], P[sl], Q[sl])
        # 2. the bottleneck (recomputed, or kept from the forward).
        if kept:
            bott = kept[l]
        else:
            bott = bnrelu_conv1x1_fwd(buf2[:, :c_l], scale1, shift1, w1c, False)[0]
        # 3. conv3x3 backward through BN2-ReLU: g2 and BN2's input-gradient scalars (zeros in eval).
        g2v, dw2, dgamma2, dbeta2, p2, q2 = bnrelu_conv3x3_bwd(dnew, bott, scale2, shift2, w2c, [n, h, w], m2, r2,
                                                               spec.conv3x3_impl, count, *finish)
        if sync is not None:  # BN2's input-gradient scalars over the group
            p2, q2 = sync.sum_(torch.stack((p2, q2))).unbind(0)
        # 4. one pass over the buffer: dB = scale2 * (g2 - mean(g2) - xhat2 * mean(g2 * xhat2)) formed
        # tile by tile from g2 (in the compute dtype, as bn_grad_finish writes it), G += scale1*g,
        # per-channel sums, dW1.  (training: also P[:c_l] += scale1*dbeta1/M and Q[:c_l] += scale1*rstd1*dgamma1/M)
        pq = (P[:c_l], Q[:c_l], count) if spec.training else (None, None, 0)
        dw1, dgamma1, dbeta1 = bnrelu_conv1x1_bwd(g2v, buf2[:, :c_l], scale1, shift1, w1c, m1, r1, G[:, :c_l], *pq,
                                                  bott, m2, p2, q2, scale2)
        base = PARAMS_PER_LAYER * l
        grads[base + 0] = dgamma1.to(g1.dtype)
        grads[base + 1] = dbeta1.to(b1.dtype)
        grads[base + 2] = dw1.view_as(w1).to(w1.dtype)
        grads[base + 3] = dgamma2.to(g2.dtype)
        grads[base + 4] = dbeta2.to(b2.dtype)
        grads[base + 5] = dw2.to(w2.dtype)

    if trace is not None:
        trace("backward", -1)
    dx = None
    if needs_input_grad:
        if sync is not None:
            PQ[:, :c0] = sync.sum_(PQ[:, :c0].contiguous())
        x_dtype, x_channels_last = x_meta
        if x_channels_last:
            dx = bn_grad_finish(G[:, :c0], buf2[:, :c0], mean[:c0], P[:c0], Q[:c0], x_dtype)
            dx = dx.view(n, h, w, c0).permute(0, 3, 1, 2)
        else:
            dx = bn_grad_finish(G[:, :c0], buf2[:, :c0], mean[:c0], P[:c0], Q[:c0], x_dtype, h * w)
            dx = dx.view(n, c0, h, w)
    return dx, grads


_DOUBLE_BACKWARD = ("FusedDenseBlock supports first-order gradients only: a double backward (a backward through "
                    "gradients computed with create_graph=True, e.g. a gradient penalty) is not supported. Use "
                    "torchvision's _DenseBlock for such models, or a penalty on parameters or outputs only.")


def _first_order_only(backward):
    """Like torch.autograd.function.once_differentiable, with an error naming FusedDenseBlock:
    backward runs without building a graph, and with create_graph=True its gradients get a node
    that raises _DOUBLE_BACKWARD if a backward reaches it."""
    def wrapper(ctx, *grads):
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not create_graph:
            return outputs
        err = torch._C._functions.DelayedError(_DOUBLE_BACKWARD.encode(), len(outputs))

        def marked(t):
            if t is None:
                return None
            t = t.detach()
            t.requires_grad = True
            return t
        return err(*[marked(t) for t in outputs])
    return wrapper


def save_block(ctx, spec: BlockSpec, out, saved, count: int, params, mean, var, before=()):
    """Saves what block_backward needs on an autograd ctx (``before``: tensors of another op of the
    same node, saved first) and returns the node's outputs: out, or (out, mean, var) with
    ``spec.with_stats`` (statistics non-differentiable; None in eval)."""
    stats, seeds, kept = saved
    ctx.spec, ctx.count, ctx.seeds = spec, count, seeds
    ctx.block_sizes = (len(before), len(stats), len(kept))
    ctx.save_for_backward(*before, out, *stats, *kept, *params)
    if not spec.with_stats:
        return out
    if mean is None:
        return out, None, None
    ctx.mark_non_differentiable(mean, var)
    return out, mean, var


def saved_block(ctx):
    """(before, out, stats, kept, params) as save_block saved them."""
    nb, ns, nk = ctx.block_sizes
    saved = ctx.saved_tensors
    rest = saved[nb + 1:]
    return saved[:nb], saved[nb], rest[:ns], rest[ns:ns + nk], rest[ns + nk:]


class FusedDenseBlockFunction(torch.autograd.Function):
    """One autograd node for a whole dense block.  Outputs the block's output; with
    ``spec.with_stats`` (out, mean, var): the batch statistics of out's channels in training
    (non-differentiable: a module reading them differentiates its own BatchNorm through them),
    None in eval mode."""

    @staticmethod
    def forward(ctx, spec: BlockSpec, x: torch.Tensor, *params: torch.Tensor):
        with torch.autocast(x.device.type, enabled=False):
            out, saved, (count, mean, var) = block_forward(spec, x, params, save=True, extra=True)
        ctx.x_meta = (x.dtype, x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                      and not x.is_contiguous())
        return save_block(ctx, spec, out, saved, count, params, mean, var)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out, _grad_mean=None, _grad_var=None):
        _, out, stats, kept, params = saved_block(ctx)
        with torch.autocast(out.device.type, enabled=False):
            dx, grads = block_backward(ctx.spec, out, grad_out, params, stats, ctx.seeds, kept, ctx.x_meta,
                                       ctx.needs_input_grad[1], ctx.count)
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:])]
        return (None, dx, *grads)
