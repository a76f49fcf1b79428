"""The dense block as one autograd node over a shared NHWC feature buffer (docs/design.md sections 2-3).

Forward writes every layer's k new channels into one preallocated (N*H*W, C_total) buffer
and computes each channel's batch statistics once, when it is written.  Backward sweeps
the layers in reverse with one fp32 gradient buffer G and per-channel scalars P, Q:
the input gradient of every channel c is ``G_c - P_c - (x_c - mean_c) * Q_c`` once all
layers reading it are done.  Saved for backward: the buffer (which is the output), the
per-channel statistics, per-layer BN2 statistics, dropout seeds and the parameters.
"""
import contextlib
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..ops import BlockOps, bn_grad_finish, block_ops, channel_stats, running_stats_update
from ..ops._common import acc_dtype, autocast_off, device_guard
from ..ops.options import Accumulate, Dropout, FoldBN, GradFinish, StatsOut
from ..ops.bnrelu_conv3x3 import conv3x3_impl
from ..ops.launch import mark
from ..ops.plan import Recorder, alloc, next_layer, recording as plan_recording, root
from .planned import PlanUse, block_plan
from .distributed import StatsGroup

PARAMS_PER_LAYER = 6  # norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight


@dataclass
class BlockSpec:
    """What the autograd node needs besides tensors: the layer modules and the mode."""
    layers: Sequence[torch.nn.Module]  # FusedDenseLayer-like: norm1, conv1, norm2, conv2, drop_rate
    num_input_features: int
    growth_rate: int
    training: bool       # batch statistics (True) or running statistics (False)
    dtype: torch.dtype   # buffer / compute dtype
    keep_bottleneck: bool = False  # save each layer's B (M x bn_size*k) instead of recomputing it
    conv3x3_impl: str = ""         # "aten" / "triton" on CUDA; "": the default (ops.using_conv3x3; the
                                   # modules settle it when they make the spec, so backward runs the same)
    sync: Optional[StatsGroup] = None  # batch statistics over this process group (SyncBatchNorm norms)
    with_stats: bool = False  # the autograd node also outputs the batch (mean, var) of the output channels
    ops: Optional[BlockOps] = None  # the op implementations (ops.block_ops); None: the device's


def _ops(spec: BlockSpec, dev) -> BlockOps:
    return spec.ops if spec.ops is not None else block_ops(dev, dtype=spec.dtype, conv3x3=spec.conv3x3_impl)


def _layer_params(params, l):
    return params[PARAMS_PER_LAYER * l:PARAMS_PER_LAYER * (l + 1)]


def _affine(K: BlockOps, bn, gamma, beta, batch, acc):
    """(mean, rstd, scale, shift) of a BatchNorm with batch statistics ``batch = (mean, var)``, or
    with its running statistics when ``batch`` is None."""
    mean, var = batch if batch is not None else (bn.running_mean.to(acc), bn.running_var.to(acc))
    scale, shift, rstd = K.bn_scale_shift(gamma, beta, mean, var, bn.eps)
    return mean, rstd, scale, shift


def _dropout_seeds(num_layers, device):
    """One dropout seed per layer, drawn on the device in one launch (no host synchronization, CUDA-graph
    capturable); the conv3x3 ops regenerate a layer's Philox mask from its seed in the forward and the
    backward (ops.bnrelu_conv3x3.dropout_mask)."""
    return torch.randint(0, 2 ** 62, (num_layers,), dtype=torch.int64, device=device)


class LayerSaved(NamedTuple):
    """What backward needs of one layer, folded in the forward: BN1's map (scale, shift) and rstd, BN2's
    statistics (mean, rstd) and map (scale, shift).  Saved as consecutive tensors (``flat``)."""
    scale1: torch.Tensor
    shift1: torch.Tensor
    rstd1: torch.Tensor
    mean2: torch.Tensor
    rstd2: torch.Tensor
    scale2: torch.Tensor
    shift2: torch.Tensor

    @classmethod
    def unflatten(cls, tensors: Sequence[torch.Tensor]) -> List["LayerSaved"]:
        n = len(cls._fields)
        return [cls(*tensors[i:i + n]) for i in range(0, len(tensors), n)]


def new_buffer(n: int, c_total: int, h: int, w: int, dtype, device) -> torch.Tensor:
    """A block's feature buffer: (N, C_total, H, W) with channels-last strides, i.e. the (N*H*W, C_total)
    row-major matrix the kernels read, and a plain tensor (not a view) for its users."""
    return torch.empty((n, c_total, h, w), dtype=dtype, device=device, memory_format=torch.channels_last)


def _compute_weights(spec: BlockSpec, params, dev) -> Tuple[torch.Tensor, ...]:
    """Every layer's W1 and W2 in the compute dtype, cast in one copy per step: (one flat tensor: the W1s, then
    the W2s, all channels-last when every W2 parameter is, else all contiguous), or () when the parameters
    are already in the compute dtype.  ``_weight_views`` gives the per-layer weights; backward keeps this
    tensor (save_for_backward) and the forward's views of it (``CastWeights``)."""
    num = len(spec.layers)
    w1s = [params[PARAMS_PER_LAYER * l + 2] for l in range(num)]
    w2s = [params[PARAMS_PER_LAYER * l + 5] for l in range(num)]
    if not num or all(w.dtype == spec.dtype for w in w1s + w2s):
        return ()
    cl = _channels_last(w2s)
    parts = [w.reshape(-1) for w in w1s] + [w.permute(0, 2, 3, 1).reshape(-1) if cl else w.reshape(-1) for w in w2s]
    flat = torch.empty(sum(p.numel() for p in parts), dtype=spec.dtype, device=dev)
    torch.cat(parts, out=flat)  # views of the weights (a copy only for a W2 neither contiguous nor channels-last)
    return (flat,)


def _channels_last(w2s) -> bool:
    return all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in w2s)


def _weight_views(spec: BlockSpec, params, flats) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Every layer's (W1 as a (cb, C_l) matrix, W2) in the compute dtype, in the layout the kernels read:
    views of ``_compute_weights``' tensor, or of the parameters themselves when ``flats`` is ()."""
    num = len(spec.layers)
    w1s = [params[PARAMS_PER_LAYER * l + 2] for l in range(num)]
    w2s = [params[PARAMS_PER_LAYER * l + 5] for l in range(num)]
    if not flats:
        return [w.view(w.shape[0], -1) for w in w1s], w2s
    flat, = flats
    w1c, o = [], 0
    for w in w1s:
        w1c.append(flat[o:o + w.numel()].view(w.shape[0], -1))
        o += w.numel()
    w2c = []
    cl = _channels_last(w2s)
    for w in w2s:
        k, cb = w.shape[:2]
        v = flat[o:o + w.numel()]
        w2c.append(v.view(k, 3, 3, cb).permute(0, 3, 1, 2) if cl else v.view(k, cb, 3, 3))
        o += w.numel()
    return w1c, w2c


class BlockSaved(NamedTuple):
    """What block_forward saves for block_backward: ``stats`` (the batch mean, then every layer's LayerSaved;
    a replayed plan: the mean, the plan's kept workspace and the step's dropout seeds), ``seeds`` (per
    layer, None where it drops nothing), ``kept`` (bottlenecks, with ``keep_bottleneck``), ``weights``
    (``CastWeights``) and ``plan`` (``planned.PlanUse``, or None: an unplanned step)."""
    stats: List[Optional[torch.Tensor]]
    seeds: List[Optional[torch.Tensor]]
    kept: List[torch.Tensor]
    weights: "CastWeights"
    plan: Optional[PlanUse] = None


class CastWeights(NamedTuple):
    """The block's weights as the kernels read them: ``flats`` (``_compute_weights``: () or the one cast tensor,
    saved for backward) and every layer's W1 (``w1``) and W2 (``w2``) views of it (or of the parameters): taken
    once in the forward, kept on the autograd ctx for the backward (views of a saved tensor, not saved again)."""
    flats: Tuple[torch.Tensor, ...]
    w1: List[torch.Tensor]
    w2: List[torch.Tensor]


@dataclass
class _Sweep:
    """The step-wide values of a forward sweep (one per block call)."""
    spec: BlockSpec
    ops: BlockOps
    impl: str                      # the conv3x3 implementation
    params: Sequence[torch.Tensor]
    buf2: torch.Tensor             # the buffer as an (N*H*W, C_total) matrix
    nhw: List[int]
    mean: Optional[torch.Tensor]   # batch statistics of every channel (training), filled as they are written
    var: Optional[torch.Tensor]
    acc: torch.dtype
    sync: Optional[StatsGroup]
    step_seeds: Optional[torch.Tensor] = None  # every layer's dropout seed, drawn at the first dropout layer


def _forward_layer(sw: _Sweep, l: int, w1c, w2c, aff1: Optional[torch.Tensor]):
    """Layer l of the forward: B = bnrelu_conv1x1 (with BN2's statistics and folded map), its k new
    channels by bnrelu_conv3x3 (with their statistics and the next layer's BN1 map: returned as aff1).
    Returns (LayerSaved, BN2 batch (mean, var) or None, B, the layer's dropout seed or None, next aff1)."""
    spec, K, acc = sw.spec, sw.ops, sw.acc
    layer = spec.layers[l]
    norm1, norm2 = layer._modules["norm1"], layer._modules["norm2"]  # (not nn.Module.__getattr__: host time)
    k, m = spec.growth_rate, sw.buf2.shape[0]
    c_l = spec.num_input_features + l * k
    g1, b1, _, g2, b2, _ = _layer_params(sw.params, l)
    if aff1 is not None:  # folded by the previous layer's statistics merge
        scale1, shift1, r1 = aff1.unbind(0)
    else:
        batch1 = (sw.mean[:c_l], sw.var[:c_l]) if spec.training else None
        _, r1, scale1, shift1 = _affine(K, norm1, g1, b1, batch1, acc)
    bn2 = None
    if spec.training:  # B, its statistics and BN2's folded map from them, written by the same op
        cb = w1c.shape[0]
        aff2 = alloc((3, cb), acc, sw.buf2.device, keep=True)
        bott, m2, bv = K.bnrelu_conv1x1_fwd(sw.buf2[:, :c_l], scale1, shift1, w1c, True,
                                            fold=FoldBN(aff2, g2, b2, norm2.eps))
        if sw.sync is not None:  # the op folded local statistics: fold again from the merged ones
            _, m2, bv = sw.sync.merge_moments(m, m2, bv)
            scale2, shift2, r2 = K.bn_scale_shift(g2, b2, m2, bv, norm2.eps)
        else:
            scale2, shift2, r2 = aff2.unbind(0)
        bn2 = (m2, bv)
    else:
        bott = K.bnrelu_conv1x1_fwd(sw.buf2[:, :c_l], scale1, shift1, w1c, False)[0]
        m2, r2, scale2, shift2 = _affine(K, norm2, g2, b2, None, acc)
    new_slice = sw.buf2[:, c_l:c_l + k]
    dropout = seed = None
    p = float(layer.drop_rate)
    if p > 0 and layer.training:  # the mask applied by the conv3x3 op, before the statistics
        seed = sw.step_seeds[l:l + 1]  # (every layer's, drawn by block_forward before the sweep)
        dropout = Dropout(p, seed)
    aff1 = fold = None
    if spec.training:  # the new channels' statistics written in place, and the next layer's BN1 map
        if l + 1 < len(spec.layers) and sw.sync is None:  # the next layer's norm1: its weight, bias and eps
            aff1 = alloc((3, c_l + k), acc, sw.buf2.device, keep=True)
            g1n, b1n = _layer_params(sw.params, l + 1)[:2]
            fold = FoldBN(aff1, g1n, b1n, spec.layers[l + 1]._modules["norm1"].eps)
        K.bnrelu_conv3x3_fwd(bott, scale2, shift2, w2c, sw.nhw, new_slice, impl=sw.impl,
                             stats=StatsOut(sw.mean[:c_l + k], sw.var[:c_l + k]), fold=fold, dropout=dropout)
        if sw.sync is not None:  # merged statistics; the next layer folds its map from them
            sl = slice(c_l, c_l + k)
            _, sw.mean[sl], sw.var[sl] = sw.sync.merge_moments(m, sw.mean[sl], sw.var[sl])
    else:
        K.bnrelu_conv3x3_fwd(bott, scale2, shift2, w2c, sw.nhw, new_slice, impl=sw.impl, dropout=dropout)
    return LayerSaved(scale1, shift1, r1, m2, r2, scale2, shift2), bn2, bott, seed, aff1


def _update_running_stats(spec: BlockSpec, mean, var, bn2_stats, count: int) -> None:
    """Every BatchNorm's running statistics, as nn.BatchNorm2d updates them, in one op."""
    c0, k, num = spec.num_input_features, spec.growth_rate, len(spec.layers)
    running_stats_update(
        [layer._modules["norm1"] for layer in spec.layers] + [layer._modules["norm2"] for layer in spec.layers],
        [mean[:c0 + l * k] for l in range(num)] + [s[0] for s in bn2_stats],
        [var[:c0 + l * k] for l in range(num)] + [s[1] for s in bn2_stats],
        count=count)


def block_forward(spec: BlockSpec, x: Optional[torch.Tensor], params: Sequence[torch.Tensor], save: bool,
                  extra: bool = False, buf: Optional[torch.Tensor] = None):
    """Run the block.  Returns (output, saved) where saved (``BlockSaved``) holds what backward needs (None
    when ``save`` is False): the batch mean and every layer's LayerSaved, so backward recomputes no
    scale/shift; the weights as the kernels read them (``CastWeights``), so it casts none and takes no views.
    A training step on the Triton kernels is recorded once per step signature and replayed after
    (autograd/planned.py; ``densenet_fused.planning(False)`` turns it off).  With ``extra``, returns (output, saved, (count, mean, var)): the number of values per channel
    of the batch statistics (global with ``spec.sync``; backward needs it) and the batch mean and biased
    variance of all output channels (None in eval), for the modules that read the output with a
    BatchNorm of their own.

    With ``spec.sync`` every channel set's statistics are merged over the process group right
    after they are computed (block input, each layer's bottleneck, each layer's k new channels)
    and the BatchNorm maps folded from the merged ones.

    ``buf``: the block's (N, C_total, H, W) channels-last buffer (``new_buffer``) with the input already
    written into its first C_0 channels (by a transition: transition_block.py); x is then not read (None).
    The output is the buffer itself, not a view: in-place ops on it work as on torch.cat's result."""
    fed = buf is not None  # the input already written into the buffer (by a transition)
    if fed:
        n, _, h, w = buf.shape
        c0 = spec.num_input_features
    else:
        n, c0, h, w = x.shape
    m = n * h * w
    num_layers = len(spec.layers)
    c_total = c0 + num_layers * spec.growth_rate
    dtype, acc = spec.dtype, acc_dtype(spec.dtype)
    dev = (x if buf is None else buf).device
    sync = spec.sync if spec.training else None
    count = m
    mark("forward", -1)

    if buf is None:
        buf = new_buffer(n, c_total, h, w, dtype, dev)
        buf[:, :c0].copy_(x)
    elif buf.shape != (n, c_total, h, w) or buf.dtype != dtype or \
            not buf.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"block_forward: expected a channels-last ({n}, {c_total}, {h}, {w}) {dtype} buffer, got "
                         f"{tuple(buf.shape)} {buf.dtype} strides {buf.stride()}")
    buf2 = buf.permute(0, 2, 3, 1).view(m, c_total)  # rows = pixels: the GEMM operand
    flats = _compute_weights(spec, params, dev)
    planned = block_plan(spec, x, params, fed) if spec.training else None
    replay = planned is not None and planned.replayable(save)
    weights = CastWeights(flats, [], []) if replay else CastWeights(flats, *_weight_views(spec, params, flats))
    mean = var = None
    if spec.training:
        mean = torch.empty(c_total, dtype=acc, device=dev)
        var = torch.empty(c_total, dtype=acc, device=dev)
        eps0 = spec.layers[0].norm1.eps if num_layers else 1e-5
        mu, v, _ = channel_stats(buf2[:, :c0], eps0)
        if sync is not None:
            count, mu, v = sync.merge_moments(m, mu, v, want_count=True)
        mean[:c0], var[:c0] = mu, v
    sw = _Sweep(spec, _ops(spec, dev), spec.conv3x3_impl or conv3x3_impl(), params, buf2, [n, h, w], mean, var, acc,
                sync)
    if any(float(layer.drop_rate) > 0 and layer.training for layer in spec.layers):
        sw.step_seeds = _dropout_seeds(num_layers, dev)
    roots = [root(t) for t in (buf, *params, *flats, mean, var, sw.step_seeds) if t is not None]  # (an outer recording's too)
    if replay:  # the recorded sweep (the replay needs no weight views: its launches hold the pointers)
        with device_guard(dev):
            ws_kept, bn2_stats = planned.replay_forward(roots)
        stats = [mean, ws_kept] + ([sw.step_seeds] if sw.step_seeds is not None else [])
        saved = BlockSaved(stats, [], [], weights, PlanUse(planned)) if save else None
    else:
        rec = Recorder(roots) if planned is not None else None
        with (plan_recording(rec) if rec is not None else contextlib.nullcontext()):
            saved_layers, seeds, bn2_stats, kept = _sweep_layers(sw, spec, weights.w1, weights.w2, save)
        if rec is not None:
            planned.record_forward(rec, bn2_stats)
        stats = [mean] + saved_layers
        use = PlanUse(planned, rec, [*stats, *params, *flats]) if rec is not None else None
        saved = BlockSaved(stats, seeds, kept, weights, use) if save else None
    mark("forward", -1)
    if spec.training:
        _update_running_stats(spec, mean, var, bn2_stats, count)
    return (buf, saved, (count, mean, var)) if extra else (buf, saved)


def _sweep_layers(sw: "_Sweep", spec: BlockSpec, w1cs, w2cs, save: bool):
    """The forward's layer loop: (every layer's LayerSaved tensors, seeds, BN2 statistics, kept bottlenecks)."""
    num_layers = len(spec.layers)
    seeds: List[Optional[torch.Tensor]] = []  # per layer: its dropout seed (a 1-element device tensor)
    kept: List[torch.Tensor] = []
    saved_layers: List[torch.Tensor] = []
    bn2_stats: List[Tuple[torch.Tensor, torch.Tensor]] = []
    aff1: Optional[torch.Tensor] = None  # (scale1, shift1, rstd1) of the next layer, when already folded
    with device_guard(sw.buf2.device):  # the direct ops hold none of their own (ops.table)
        for l in range(num_layers):
            mark("forward", l)
            next_layer()  # (a recorded plan: the previous layer's transients are dead)
            lsaved, bn2, bott, seed, aff1 = _forward_layer(sw, l, w1cs[l], w2cs[l], aff1)
            saved_layers += lsaved
            seeds.append(seed)
            if bn2 is not None:
                bn2_stats.append(bn2)
            if save and spec.keep_bottleneck:
                kept.append(bott)
    return saved_layers, seeds, bn2_stats, kept


@dataclass
class _BackSweep:
    """The step-wide values of a backward sweep."""
    spec: BlockSpec
    ops: BlockOps
    impl: str             # the conv3x3 implementation (the forward's)
    params: Sequence[torch.Tensor]
    buf2: torch.Tensor    # the buffer (the output) as an (N*H*W, C_total) matrix
    nhw: List[int]
    mean: torch.Tensor    # batch statistics' means (zeros in eval)
    G: torch.Tensor       # (N*H*W, C_total) fp32: grad_out plus every layer's scale1 * g
    PQ: torch.Tensor      # (2, C_total) fp32: the per-channel scalars P, Q (rows: views P, Q)
    P: torch.Tensor
    Q: torch.Tensor
    count: int            # values per channel of the batch statistics (0 in eval)
    sync: Optional[StatsGroup]


def _backward_layer(bw: _BackSweep, l: int, saved: LayerSaved, seed, bott, w1c, w2c) -> List[torch.Tensor]:
    """Layer l of the reverse sweep (docs/design.md section 3, backward steps 1-4); returns the gradients of
    its six parameters, in their dtypes."""
    spec, K, buf2, G, P, Q = bw.spec, bw.ops, bw.buf2, bw.G, bw.P, bw.Q
    layer = spec.layers[l]
    k = spec.growth_rate
    c_l = spec.num_input_features + l * k
    g1, b1, w1, g2, b2, w2 = _layer_params(bw.params, l)
    scale1, shift1, r1, m2, r2, scale2, shift2 = saved
    m1 = bw.mean[:c_l] if spec.training else layer._modules["norm1"].running_mean.to(scale1.dtype)
    # 1. the gradient of this layer's k output channels is complete: the conv3x3 backward finishes it on
    # the fly from G, P, Q (and through the forward's dropout mask, regenerated from its seed)
    sl = slice(c_l, c_l + k)
    if bw.sync is not None and l + 1 < len(spec.layers):  # P, Q of these channels summed over the group
        bw.PQ[:, sl] = bw.sync.sum_(bw.PQ[:, sl].contiguous())   # (the last layer's are zeros everywhere)
    finish = GradFinish(buf2[:, sl], bw.mean[sl], P[sl], Q[sl])
    dropout = Dropout(float(layer.drop_rate), seed) if seed is not None else None
    # 2. the bottleneck (recomputed, or kept from the forward).
    x_l = buf2[:, :c_l]  # the layer's input features
    if bott is None:
        bott = K.bnrelu_conv1x1_fwd(x_l, scale1, shift1, w1c, False)[0]
    # 3. conv3x3 backward through BN2-ReLU: g2 and BN2's input-gradient scalars (zeros in eval).
    g2v, dw2, dgamma2, dbeta2, p2, q2 = K.bnrelu_conv3x3_bwd(G[:, sl], bott, scale2, shift2, w2c, bw.nhw, m2, r2,
                                                           impl=bw.impl, count=bw.count, finish=finish,
                                                           dropout=dropout)
    if bw.sync is not None:  # BN2's input-gradient scalars over the group
        p2, q2 = bw.sync.sum_(torch.stack((p2, q2))).unbind(0)
    # 4. one pass over the buffer: dB = scale2 * (g2 - mean(g2) - xhat2 * mean(g2 * xhat2)) formed
    # tile by tile from g2 (in the compute dtype, as bn_grad_finish writes it), G += scale1*g,
    # per-channel sums, dW1.  (training: also P[:c_l] += scale1*dbeta1/M and Q[:c_l] += scale1*rstd1*dgamma1/M)
    accumulate = Accumulate(P[:c_l], Q[:c_l], bw.count) if spec.training else None
    dw1, dgamma1, dbeta1 = K.bnrelu_conv1x1_bwd(g2v, x_l, scale1, shift1, w1c, m1, r1, G[:, :c_l],
                                                accumulate=accumulate, finish=GradFinish(bott, m2, p2, q2, scale2))
    return [_cast(dgamma1, g1), _cast(dbeta1, b1), _cast(dw1.view_as(w1), w1), _cast(dgamma2, g2), _cast(dbeta2, b2),
            _cast(dw2, w2)]


def _cast(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` in ``param``'s dtype (no call where it already is: the common case, fp32 parameters)."""
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)


def block_backward(spec: BlockSpec, out, grad_out, params, stats, seeds, kept, weights, x_meta, needs_input_grad,
                   count: int = 0, plan: Optional[PlanUse] = None):
    """Reverse sweep; returns (dx or None, [grad per param]).  ``stats``, ``seeds``, ``kept``, ``weights``
    (``CastWeights``), ``plan``: what block_forward saved (``BlockSaved``); ``count``: values per channel of
    the batch statistics (block_forward's; 0: the local N*H*W)."""
    n, c_total, h, w = out.shape
    m = n * h * w
    c0 = spec.num_input_features
    acc = acc_dtype(spec.dtype)
    dev = out.device
    sync = spec.sync if spec.training else None
    mark("backward", -1)
    if plan is not None and torch.compiler.is_compiling():  # (compiled autograd traces this backward)
        plan.traced()  # no pointers to record or replay: raises after a replayed forward
        plan = None
    replay = plan is not None and plan.replayed is not None
    step_seeds = (stats[2] if len(stats) > 2 else None) if replay else \
        next((s._base for s in seeds if s is not None), None)
    for t in (out, *params, *weights.flats, step_seeds):  # (an outer recording's roots)
        if t is not None:
            root(t)
    buf2 = out.permute(0, 2, 3, 1).reshape(m, c_total)  # a view: the buffer is channels-last
    mean = root(stats[0] if spec.training else torch.zeros(c_total, dtype=acc, device=dev))
    G4 = root(torch.empty((n, h, w, c_total), dtype=acc, device=dev))
    G4.copy_(grad_out.permute(0, 2, 3, 1))
    G = G4.view(m, c_total)
    PQ = root(torch.zeros((2, c_total), dtype=acc, device=dev))  # one fill
    P, Q = PQ.unbind(0)
    # a planned step's roots, in the order its forward and backward registered them (forward kept workspace last)
    roots = [t for t in (out, *params, *weights.flats, step_seeds, mean, G4, PQ) if t is not None]
    if replay:
        with device_guard(dev):
            grads = plan.replay_backward(roots + [stats[1]])
    else:
        bw = _BackSweep(spec, _ops(spec, dev), spec.conv3x3_impl or conv3x3_impl(), params, buf2, [n, h, w], mean,
                        G, PQ, P, Q, (count or m) if spec.training else 0, sync)
        # the step that recorded its forward records this (a second backward, retain_graph, runs unplanned)
        rec = plan.backward_recorder([*stats, *params, *weights.flats], roots) if plan is not None else None
        with (plan_recording(rec) if rec is not None else contextlib.nullcontext()):
            grads = _sweep_back(bw, stats, seeds, kept, weights)
        if rec is not None:
            plan.block.record_backward(rec, grads)
    mark("backward", -1)  # (what follows is block-level work, planned step or not)
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


def _sweep_back(bw: "_BackSweep", stats, seeds, kept, weights) -> List[torch.Tensor]:
    """The backward's layer loop: every parameter's gradient."""
    saved_layers = LayerSaved.unflatten(stats[1:])
    grads: List[torch.Tensor] = [None] * (PARAMS_PER_LAYER * len(bw.spec.layers))
    with device_guard(bw.buf2.device):  # the direct ops hold none of their own (ops.table)
        for l in reversed(range(len(bw.spec.layers))):
            mark("backward", l)
            next_layer()
            grads[PARAMS_PER_LAYER * l:PARAMS_PER_LAYER * (l + 1)] = _backward_layer(
                bw, l, saved_layers[l], seeds[l], kept[l] if kept else None, weights.w1[l], weights.w2[l])
    return grads


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
    stats, seeds, kept, weights, ctx.plan = saved
    ctx.spec, ctx.count, ctx.seeds = spec, count, seeds
    ctx.weight_views = (weights.w1, weights.w2)  # views of saved tensors (flats or params): not saved again
    ctx.block_sizes = (len(before), len(stats), len(kept), len(weights.flats))
    ctx.save_for_backward(*before, out, *stats, *kept, *weights.flats, *params)
    if not spec.with_stats:
        return out
    if mean is None:
        return out, None, None
    ctx.mark_non_differentiable(mean, var)
    return out, mean, var


def saved_block(ctx):
    """(before, out, stats, kept, weights, params) as save_block saved them (weights: ``CastWeights``).  The
    forward's weight views are handed over once and dropped from the ctx, so that the graph does not keep
    them (and the cast weights behind them) alive after the backward; a second backward (retain_graph)
    takes them again from the saved tensors."""
    nb, ns, nk, nf = ctx.block_sizes
    saved = ctx.saved_tensors
    rest = saved[nb + 1:]
    flats, params = rest[ns + nk:ns + nk + nf], rest[ns + nk + nf:]
    views, ctx.weight_views = ctx.weight_views, None
    if views is None:
        views = _weight_views(ctx.spec, params, flats)
    return saved[:nb], saved[nb], rest[:ns], rest[ns:ns + nk], CastWeights(flats, *views), params


class FusedDenseBlockFunction(torch.autograd.Function):
    """One autograd node for a whole dense block.  Outputs the block's output; with
    ``spec.with_stats`` (out, mean, var): the batch statistics of out's channels in training
    (non-differentiable: a module reading them differentiates its own BatchNorm through them),
    None in eval mode."""

    @staticmethod
    def forward(ctx, spec: BlockSpec, x: torch.Tensor, *params: torch.Tensor):
        with autocast_off(x.device.type):
            out, saved, (count, mean, var) = block_forward(spec, x, params, save=True, extra=True)
        ctx.x_meta = (x.dtype, x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                      and not x.is_contiguous())
        return save_block(ctx, spec, out, saved, count, params, mean, var)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out, _grad_mean=None, _grad_var=None):
        _, out, stats, kept, weights, params = saved_block(ctx)
        with autocast_off(out.device.type):
            dx, grads = block_backward(ctx.spec, out, grad_out, params, stats, ctx.seeds, kept, weights,
                                       ctx.x_meta, ctx.needs_input_grad[1], ctx.count, plan=ctx.plan)
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:])]
        return (None, dx, *grads)
