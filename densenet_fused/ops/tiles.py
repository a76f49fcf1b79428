"""The tiles of the GEMM-shaped Triton kernels, one strategy for all: the 1x1 forward and backward
(bnrelu_conv1x1), the transition's forward, dW and dx kernels (bnrelu_avgpool_conv1x1) and the 3x3
forward, dgrad and wgrad kernels (bnrelu_conv3x3).

Each kernel declares a ``TileRule``:
- ``candidates``: the configs (``triton.Config``: BLOCK_* constexprs, num_warps, num_stages) a GPU launch
  may use.  A list (the same for every shape): the kernel is autotuned over it (``autotuned``: Triton's
  autotuner, which drops the candidates ``fits`` refuses, once per key).  A function of the shape: the one
  config of each shape, launched as it is.
- ``fits(config, shape, target)``: whether a candidate suits a launch of that shape on the device
  (``Target``: compute capability, shared memory per block, multiprocessors); for an autotuned kernel
  the shape is the launch's named arguments.  Rules with one config per shape have none.
- ``shape_blocks(shape, target)``: constexprs the shape decides on a GPU outside the candidates (the
  1x1 forward's BLOCK_M, which sizes its statistics workspace); ``splits(shape, blocks, target)``: the
  row splits of a split reduction on a GPU (``blocks``: the launch's tile keywords).
- ``interpreter``: the config under ``TRITON_INTERPRET=1`` (small tiles: few values per program, fast on
  CPU), a config or a function of the shape, and ``interpreter_splits(shape, blocks)``.
A launcher asks ``choose(rule, x, **shape)`` for its launch's ``Tiles``; the device is read
(``_triton_common.device_target``) only for a rule that says it sizes by it (``reads_device``) and never
under the interpreter.  `densenet-fused cost --kernels` compiles every config a rule can give for
the cases' shapes (the autotuned kernels' candidates pruned by ``fits`` for sm_90a and sm_80).
The spills and shared memory behind the rules: benchmarks/results/kernel_resources.md.
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import triton

from ._common import cdiv, next_pow2
from ._triton_common import Target, config_pruner, device_target
from .launch import interpreted

Shape = dict


@dataclass(frozen=True, eq=False)  # compared and hashed by identity (a key of the choices)
class TileRule:
    kernel: str  # "op.kernel", for messages
    candidates: Union[Sequence[triton.Config], Callable[[Shape], triton.Config]]
    interpreter: Union[triton.Config, Callable[[Shape], triton.Config]]
    fits: Optional[Callable[[triton.Config, Shape, Target], bool]] = None
    shape_blocks: Optional[Callable[[Shape, Optional[Target]], dict]] = None
    splits: Optional[Callable[[Shape, dict, Optional[Target]], int]] = None
    interpreter_splits: Optional[Callable[[Shape, dict], int]] = None
    reads_device: bool = False  # shape_blocks / splits size by the device (else their target is None)

    @property
    def tuned(self) -> bool:
        return not callable(self.candidates)

    def __post_init__(self):
        if self.tuned and (self.fits is None or len(self.candidates) < 2):
            raise ValueError(f"{self.kernel}: an autotuned rule takes two candidates or more and a fits predicate")
        if (self.splits is None) != (self.interpreter_splits is None):
            raise ValueError(f"{self.kernel}: splits and interpreter_splits go together")


class Tiles(NamedTuple):
    kwargs: dict  # the launch's tile keywords: BLOCK_* constexprs, num_warps, num_stages (autotuned: the shape's)
    splits: int   # row splits (1 where the kernel has none)
    tuned: bool   # the launch autotunes over the rule's candidates (its config is chosen per key)


def _options(cfg: triton.Config) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# (rule, interpreted, target, shape items) -> Tiles: a launch's choice is made once per shape and device
# (a choice costs several microseconds of host time, a look-up well under one); emptied when it grows past
# _CHOSEN_MAX entries (shapes that change from call to call)
_chosen: dict = {}
_CHOSEN_MAX = 4096


def choose(rule: TileRule, x: torch.Tensor, **shape) -> Tiles:
    """The tiles of one launch of ``rule``'s kernel on ``x``'s device, for ``shape`` (the names its rule
    reads).  The returned keywords are shared between launches: read them, never modify them."""
    interp = interpreted(x)
    target = device_target() if rule.reads_device and not interp else None
    key = (rule, interp, target, *shape.items())
    tiles = _chosen.get(key)
    if tiles is None:
        if len(_chosen) >= _CHOSEN_MAX:
            _chosen.clear()
        tiles = _chosen[key] = _choose(rule, interp, target, shape)
    return tiles


def _choose(rule, interp, target, shape) -> Tiles:
    if interp:
        cfg = rule.interpreter if isinstance(rule.interpreter, triton.Config) else rule.interpreter(shape)
        kwargs = _options(cfg)
        return Tiles(kwargs, rule.interpreter_splits(shape, kwargs) if rule.splits is not None else 1, False)
    kwargs = rule.shape_blocks(shape, target) if rule.shape_blocks is not None else {}
    if not rule.tuned:
        kwargs = {**kwargs, **_options(rule.candidates(shape))}
    return Tiles(kwargs, rule.splits(shape, kwargs, target) if rule.splits is not None else 1, rule.tuned)


def autotuned(rule: TileRule, kernel, key, **kwargs):
    """``kernel`` autotuned over the rule's candidates, those ``fits`` refuses on the launch's device pruned
    (``_triton_common.config_pruner``; `cost --kernels` reads the predicate back from it)."""
    if not rule.tuned:
        raise ValueError(f"{rule.kernel}: its rule gives one config per shape; it is not autotuned")
    return triton.autotune(list(rule.candidates), key=key, prune_configs_by=dict(
        early_config_prune=config_pruner(rule.fits, rule.kernel)), **kwargs)(kernel)


# ----------------------------------------------------------------------------- bnrelu_conv1x1
# Autotuned on CUDA (Hopper and Ampere candidates), keyed by the power-of-two bucket of the
# input channels so a block's layers share a few tunings, by the forward's tile height (a config
# tuned at BLOCK_M=64 may not fit at 128) and by the product precision (the tensors' dtypes are
# part of Triton's key); fixed small tiles under the interpreter.  BLOCK_M of the forward is chosen
# from the shape (it sets the statistics workspace), and the backward's split count is a function
# of the shape only.  Tunings are cached on disk across processes by Triton (``cache_results``, in
# triton 3.6 and 3.8 alike: one JSON per key in Triton's cache directory, keyed by the Triton
# version, the device's target, the kernel source, the key and the configs), so a new process
# reuses them instead of benchmarking again.
_FWD_CONFIGS = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
                for bn, bk, w, st in [(128, 64, 8, 3), (128, 64, 4, 4), (128, 32, 4, 4), (64, 64, 4, 4),
                                      (128, 128, 8, 3), (64, 128, 4, 3), (256, 64, 8, 3), (64, 64, 8, 3),
                                      (64, 32, 4, 4)]]
# (64, 64) with 4 warps and 3 stages is not offered: it spills on sm_90a in bf16
# (benchmarks/results/kernel_resources.md); (64, 64) with 8 warps covers the tile.
_BWD_CONFIGS = [triton.Config(dict(BLOCK_M=bm, BLOCK_C=bc), num_warps=w, num_stages=st)
                for bm, bc, w, st in [(64, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3), (128, 32, 8, 2),
                                      (32, 128, 8, 2), (64, 32, 8, 2), (32, 32, 4, 3), (32, 32, 8, 2)]]
# Offered only with FINISH (dB formed from g2): the sm_80 tiles that hold the fp32 g2 tile without
# spilling in bf16 (64 x 32 with 8 warps, not 4), and 32 x 32 with 8 warps, the one tile of 128
# bottleneck channels that float32 with TF32 runs spill-free on sm_80 (benchmarks/results/kernel_resources.md).
BWD_FINISH_ONLY = {(64, 32, 8, 2), (32, 32, 4, 3), (32, 32, 8, 2)}


def _fwd_fits(cfg, args, target):
    """Whether a 1x1 forward config suits a launch (``args``: the kernel's named arguments X, ldw, COUT
    and BLOCK_M; compiled resources checked by `cost --kernels`):
    - no column tile wider than the output (a BLOCK_N of 256 for 128 channels computes zeros), except
      the narrowest offered (64), which the smallest bottlenecks (bn_size*k < 64) need;
    - registers: the fp32 accumulator, the BN-ReLU'd A tile and the W tile held per thread,
      at most 192 values, or 128 when W's rows are not 16-element aligned (its tile is then
      loaded through registers): above that, sm_90a spills; before sm_90 (mma.sync's A operand
      in registers) also at most 32 values of the A tile per thread, and no 128 x 32 column tile
      with 4 warps (ptxas holds some of its variants to 128 registers, and spills);
    - shared memory: num_stages buffers of the A and W tiles, plus the A tile once more after its
      prologue (the MMA operand), in the input dtype, within the device's limit (float32 tiles of
      128 rows exceed 227 KB in several configs)."""
    bm, bn, bk = args["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    if bn > max(64, next_pow2(args["COUT"])):  # (64: the narrowest tile offered, kept for small outputs)
        return False
    threads = 32 * cfg.num_warps
    if (bm * bn + bm * bk + bk * bn) / threads > (192 if args["ldw"] % 16 == 0 else 128):
        return False
    if target.arch < 90 and (bm * bk / threads > 32 or (bn, bk, cfg.num_warps) == (128, 32, 4)):
        return False
    smem = (cfg.num_stages * (bm * bk + bk * bn) + bm * bk) * args["X"].element_size()
    return smem <= target.smem


def _bwd_fits(cfg, args, target):
    """Whether a 1x1 backward config suits a launch (``args``: the kernel's named arguments X, ldw,
    COUT_PAD and FINISH):
    - before sm_90 (mma.sync: the dW accumulator and the resident W tile in registers) only
      BLOCK_C = 32 and BLOCK_M = 64 (wider or taller tiles spill on sm_80);
    - shared memory: num_stages buffers of the dout and x tiles, the resident W tile and the
      activated x tile (the dW product's operand), within the device's limit;
    - with FINISH (dB formed from g2 in the kernel): num_stages buffers of the fp32 g2 tile, the
      bottleneck tile and the x tile, and the activated x tile (as the compiled kernels use);
      registers: at most 32 values of the dB tile per thread and at most 144 of the dB, W and dW
      tiles together, with 4 warps at most 32 x 32, and when W's rows are not 16-element aligned
      (its tile loaded through registers) at most 64 x 32; the configs of ``BWD_FINISH_ONLY`` only
      there."""
    bm, bc, cp = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_C"], args["COUT_PAD"]
    if target.arch < 90 and (bc > 32 or bm > 64):
        return False
    s = args["X"].element_size()
    if args.get("FINISH"):
        threads = 32 * cfg.num_warps
        if bm * cp / threads > 32 or (bm * cp + 2 * cp * bc) / threads > 144:
            return False
        if (cfg.num_warps < 8 and bm * bc > 1024) or (args["ldw"] % 16 != 0 and bm * bc > 2048):
            return False
        # Bytes per thread in x's dtype (float32 with TF32 holds twice the bf16 registers per value):
        # the x-side tiles (x, its activation, g and G's update: BLOCK_M x BLOCK_C) at most 32 B;
        # before sm_90, mma.sync's A operand, the dB tile, at most 64 B in registers (fp32 with TF32
        # spills above either).  In bf16/fp16 both hold for every config the rules above keep (32
        # values of dB, 16 of x).
        if bm * bc * s / threads > 32 or (target.arch < 90 and bm * cp * s / threads > 64):
            return False
        smem = cfg.num_stages * (bm * cp * (4 + s) + bm * bc * s) + bm * bc * s
    else:
        if (bm, bc, cfg.num_warps, cfg.num_stages) in BWD_FINISH_ONLY:
            return False
        smem = (cfg.num_stages * (bm * cp + bm * bc) + cp * bc + bm * bc) * s
    return smem <= target.smem


def _conv1x1_fwd_block_m(shape, target):
    """The forward's tile height: 128 rows where 128 x 128 tiles make two waves of programs or more on
    the device, else 64."""
    m, cout = shape["m"], shape["cout"]
    return {"BLOCK_M": 128 if cdiv(m, 128) * cdiv(cout, 128) >= 2 * target.sms else 64}


def _conv1x1_bwd_splits(shape, blocks, target):
    """Row splits of the backward: about two waves of programs (two per multiprocessor) for 64-channel
    column blocks, at most one per 128 rows (each split writes a Cout x C fp32 partial of dW that is
    read back once)."""
    return max(1, min(cdiv(shape["m"], 128), cdiv(2 * target.sms, cdiv(shape["c"], 64))))


# shape: m, cout (the launcher's); the autotuner's fits reads the kernel's named arguments
CONV1X1_FWD = TileRule("bnrelu_conv1x1._fwd_kernel", _FWD_CONFIGS,
                       triton.Config(dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16), num_warps=4, num_stages=3),
                       fits=_fwd_fits, shape_blocks=_conv1x1_fwd_block_m, reads_device=True)
# shape: m, c  (interpreter: at most 4 splits, one per 32 rows)
CONV1X1_BWD = TileRule("bnrelu_conv1x1._bwd_kernel", _BWD_CONFIGS,
                       triton.Config(dict(BLOCK_M=32, BLOCK_C=16), num_warps=4, num_stages=3),
                       fits=_bwd_fits, splits=_conv1x1_bwd_splits,
                       interpreter_splits=lambda shape, blocks: max(1, min(4, cdiv(shape["m"], 32))),
                       reads_device=True)


# ----------------------------------------------------------------------------- bnrelu_avgpool_conv1x1
# Tiles and warps (BLOCK_M, BLOCK_N, BLOCK_K or BLOCK_C, num_warps) per kernel: "mma" for 16-bit inputs,
# "tf32" for float32 with TF32 products, "ieee" for full fp32 products (FMAs, operands in registers); small
# under the interpreter.  Fixed: tiles that compile without spills on sm_90a and sm_80 in every dtype
# (`densenet-fused cost --kernels --case transition_head_stem`).  float32 spills on the 16-bit tiles
# (benchmarks/results/kernel_resources.md), so it spreads the GEMM tiles over 8 warps, and its dx tiles
# are 32 rows (TF32: also 32 output columns a step, 4 warps).
TRANSITION_TILES = {
    "fwd": {"mma": (64, 64, 32, 4), "tf32": (64, 64, 32, 8), "ieee": (64, 64, 32, 8)},
    "dw": {"mma": (32, 64, 32, 4), "tf32": (32, 64, 32, 8), "ieee": (32, 64, 32, 8)},
    "dx": {"mma": (64, 64, 32, 8), "tf32": (32, 32, 32, 4), "ieee": (32, 64, 32, 8)},
}


def _transition_config(kernel: str, third: str):
    """The transition kernel's config for shape (dtype, precision) from ``TRANSITION_TILES`` (looked up at
    each launch); ``third``: the name of its third block constexpr (BLOCK_K or BLOCK_C)."""
    def config(shape):
        kind = "mma" if shape["dtype"] != torch.float32 else shape["precision"]
        bm, bn, b3, warps = TRANSITION_TILES[kernel][kind]
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, third: b3}, num_warps=warps, num_stages=3)
    return config


def _transition_dw_splits(most):
    """Row splits of the dW kernel: one per tile of pooled rows, at most ``most``."""
    return lambda shape, blocks, target=None: max(1, min(most, cdiv(shape["mo"], blocks["BLOCK_M"])))


# shape: dtype, precision (the dot precision); the dW kernel's also mo (pooled rows)
TRANSITION_FWD = TileRule("bnrelu_avgpool_conv1x1._fwd_kernel", _transition_config("fwd", "BLOCK_K"),
                          triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), num_warps=4, num_stages=3))
TRANSITION_DW = TileRule("bnrelu_avgpool_conv1x1._dw_kernel", _transition_config("dw", "BLOCK_C"),
                         triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_C=16), num_warps=4, num_stages=3),
                         splits=_transition_dw_splits(64), interpreter_splits=_transition_dw_splits(4))
TRANSITION_DX = TileRule("bnrelu_avgpool_conv1x1._dx_kernel", _transition_config("dx", "BLOCK_C"),
                         triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_C=16), num_warps=4, num_stages=3))


# ----------------------------------------------------------------------------- bnrelu_conv3x3
# Implicit-GEMM kernels, one config per shape (4 warps): a column tile of the k output channels up to 64;
# 4-byte inputs (fp32 with TF32) take half the forward's K step and the wgrad's 64-row tiles (spills on
# sm_80; 128 rows exceed sm_80's shared memory: benchmarks/results/kernel_resources.md).
def _conv3x3_n(k):
    return max(16, min(64, next_pow2(k)))


def _conv3x3_kstep(k):
    """The dgrad's K step: the k output channels (padded to a power of two, at least 16) up to 64."""
    return min(max(16, next_pow2(k)), 64)


def _wgrad_splits(most):
    """Row splits of the wgrad: at most one per tile of rows and ``most(shape, blocks)``."""
    return lambda shape, blocks, target=None: max(1, min(cdiv(shape["m"], blocks["BLOCK_M"]), most(shape, blocks)))


# shape: k (output channels), size (bytes per input element)
CONV3X3_FWD = TileRule(
    "bnrelu_conv3x3._fwd_kernel",
    lambda s: triton.Config(dict(BLOCK_M=128, BLOCK_N=_conv3x3_n(s["k"]), BLOCK_K=64 // (s["size"] // 2)),
                            num_warps=4, num_stages=3),
    lambda s: triton.Config(dict(BLOCK_M=32, BLOCK_N=_conv3x3_n(s["k"]), BLOCK_K=16), num_warps=4, num_stages=3))
# shape: k
CONV3X3_DGRAD = TileRule(
    "bnrelu_conv3x3._dgrad_kernel",
    lambda s: triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=_conv3x3_kstep(s["k"])), num_warps=4, num_stages=3),
    lambda s: triton.Config(dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=_conv3x3_kstep(s["k"])), num_warps=4, num_stages=3))
# shape: m (rows), cb (input channels), size; splits: about 1024 programs of 9 taps x cb/BLOCK_C column
# tiles on a GPU, at most 3 under the interpreter
CONV3X3_WGRAD = TileRule(
    "bnrelu_conv3x3._wgrad_kernel",
    lambda s: triton.Config(dict(BLOCK_M=128 // (s["size"] // 2), BLOCK_C=64), num_warps=4, num_stages=3),
    triton.Config(dict(BLOCK_M=32, BLOCK_C=16), num_warps=4, num_stages=3),
    splits=_wgrad_splits(lambda s, b: 1024 // (9 * cdiv(s["cb"], b["BLOCK_C"])) + 1),
    interpreter_splits=_wgrad_splits(lambda s, b: 3))
