"""Triton building blocks shared by the GEMM-shaped ops (bnrelu_conv1x1, bnrelu_conv3x3):
the BN-ReLU prologue, the per-tile statistics epilogue and its deterministic merge, and the
autotuners' config pruning by the hardware (shared memory per block)."""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import cdiv
from .launch import INTERPRET, interpreted, launch
from .plan import alloc


def _fix_interpreter_scalar_index():
    """Triton <= 3.6's interpreter turns a scalar kernel value into a Python int (a loop bound:
    ``range(0, C, BLOCK_K)`` with C an int argument) with ``int(ndarray of shape (1,))``, which
    NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so
    every kernel with a runtime loop bound failed there.  Triton 3.7 converts the squeezed array.
    Loop bounds cannot move out of the kernels instead: the interpreter passes every non-constexpr
    argument as such an array, and constexpr bounds would recompile the GPU kernels per layer.
    This applies 3.7's conversion to the older interpreter; compiled (GPU) kernels are untouched."""
    from triton.runtime import interpreter
    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_densenet_fused_fixed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._densenet_fused_fixed = True
    interpreter._patch_lang_tensor = patched


def _version(text):
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2])


if INTERPRET and _version(triton.__version__) < (3, 7):
    import numpy as np  # the interpreter's dependency

    if _version(np.__version__) >= (2, 4):
        _fix_interpreter_scalar_index()


@triton.jit
def bnrelu_tile(PTR, rows64, ld, cols, mask, SCALE, SHIFT, cols_ok):
    """relu(x*scale + shift) of a (rows, cols) tile in fp32, 0 where ``mask`` is off (zero padding
    applies to the activated values).  A NaN stays NaN, as in torch.relu."""
    x = tl.load(PTR + rows64[:, None] * ld + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SCALE + cols, mask=cols_ok, other=0.0)
    h = tl.load(SHIFT + cols, mask=cols_ok, other=0.0)
    y = x * s[None, :] + h[None, :]
    return tl.where(mask, tl.where(y <= 0.0, 0.0, y), 0.0)


@triton.jit
def store_tile_stats(out, row_ok, col_ok, cols, pid_m, M, N, PMEAN, PM2, BLOCK_M: tl.constexpr):
    """Per-tile (mean, M2) of the values as stored (``out`` in the output dtype), per column."""
    v = tl.where(row_ok[:, None], out.to(tl.float32), 0.0)
    cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    mean = tl.sum(v, axis=0) / cnt
    d = tl.where(row_ok[:, None], v - mean[None, :], 0.0)
    tl.store(PMEAN + pid_m * N + cols, mean, mask=col_ok)
    tl.store(PM2 + pid_m * N + cols, tl.sum(d * d, axis=0), mask=col_ok)


@triton.jit
def _folded_bn(rc, ok, mean, var, GAMMA, BETA, AFF, ld_aff, eps):
    """(scale, shift, rstd) of a BatchNorm from its statistics, stored as rows of AFF (as bn_scale_shift)."""
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    scale = tl.load(GAMMA + rc, mask=ok, other=0.0).to(tl.float32) * rstd
    tl.store(AFF + rc, scale, mask=ok)
    tl.store(AFF + ld_aff + rc, tl.load(BETA + rc, mask=ok, other=0.0).to(tl.float32) - mean * scale, mask=ok)
    tl.store(AFF + 2 * ld_aff + rc, rstd, mask=ok)


@triton.jit
def stats_merge_kernel(PMEAN, PM2, MEAN, VAR, M, COUT, TILES, C_OFF, GAMMA, BETA, AFF, ld_aff, eps, MERGE_PROGRAMS,
                       TILE_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, AFFINE: tl.constexpr):
    """Merge per-tile (mean, M2) partials of COUT channels into MEAN/VAR[C_OFF:C_OFF + COUT], BLOCK_T
    tiles at a time and then a fixed tree (deterministic): mean = sum(n_t * mean_t) / M, then
    M2 = sum(M2_t + n_t * (mean_t - mean)^2), deviations from the merged mean (no cancellation).
    With AFFINE, also the folded map of the BatchNorm reading channels [0, C_OFF + COUT): programs
    past MERGE_PROGRAMS fold the channels [0, C_OFF) whose statistics are already in MEAN/VAR."""
    pid = tl.program_id(0)
    if pid < MERGE_PROGRAMS:
        rc = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = rc < COUT
        rt = tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for t0 in range(0, TILES, BLOCK_T):
            t = t0 + rt
            msk = (t < TILES)[:, None] & ok[None, :]
            nb = tl.maximum(tl.minimum(M - t * TILE_ROWS, TILE_ROWS), 0).to(tl.float32)
            acc += nb[:, None] * tl.load(PMEAN + t[:, None] * COUT + rc[None, :], mask=msk, other=0.0)
        mean = tl.sum(acc, axis=0) / M
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for t0 in range(0, TILES, BLOCK_T):
            t = t0 + rt
            msk = (t < TILES)[:, None] & ok[None, :]
            nb = tl.maximum(tl.minimum(M - t * TILE_ROWS, TILE_ROWS), 0).to(tl.float32)
            off = t[:, None] * COUT + rc[None, :]
            d = tl.load(PMEAN + off, mask=msk, other=0.0) - mean[None, :]
            acc += tl.where(msk, tl.load(PM2 + off, mask=msk, other=0.0) + nb[:, None] * d * d, 0.0)
        var = tl.sum(acc, axis=0) / M
        tl.store(MEAN + C_OFF + rc, mean, mask=ok)
        tl.store(VAR + C_OFF + rc, var, mask=ok)
        if AFFINE:
            _folded_bn(C_OFF + rc, ok, mean, var, GAMMA, BETA, AFF, ld_aff, eps)
    else:
        rc = (pid - MERGE_PROGRAMS) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = rc < C_OFF
        mean = tl.load(MEAN + rc, mask=ok, other=0.0)
        var = tl.load(VAR + rc, mask=ok, other=1.0)
        _folded_bn(rc, ok, mean, var, GAMMA, BETA, AFF, ld_aff, eps)


def merge_stats(pmean, pm2, m, tile_rows, mean=None, var=None, affine=None):
    """(mean, var) from per-tile partials ``pmean``, ``pm2`` (tiles, N) written by store_tile_stats; into the
    last N entries of ``mean``/``var`` (contiguous float32 vectors of C + N) when given.
    ``affine = (out (3, C + N), gamma, beta, eps)`` also writes the folded map (scale, shift, rstd)
    of the BatchNorm reading all C + N channels of ``mean``/``var``."""
    tiles, n = pmean.shape
    if mean is None:
        mean = alloc(n, torch.float32, pmean.device, keep=True)  # (plan: statistics outlive the layer)
        var = alloc(n, torch.float32, pmean.device, keep=True)
    c_off = mean.shape[0] - n
    aff, gamma, beta, eps = affine if affine is not None else (mean, mean, mean, 0.0)  # unused without AFFINE
    interp = interpreted(pmean)
    block_c = 32 if interp else 64
    merge_programs = cdiv(n, block_c)
    grid = merge_programs + (cdiv(c_off, block_c) if affine is not None else 0)
    launch(stats_merge_kernel, (grid,), (pmean, pm2, mean, var, m, n, tiles, c_off, gamma, beta, aff,
        aff.stride(0) if affine is not None else 0, eps, merge_programs), TILE_ROWS=tile_rows,
        BLOCK_T=4 if interp else 32, BLOCK_C=block_c, AFFINE=affine is not None)
    return mean, var


def cuda_gemm_impl(dtype) -> str:
    """The implementation a GEMM-shaped op (bnrelu_conv1x1, bnrelu_conv3x3) runs on CUDA tensors of
    ``dtype``: "triton", or "aten" (cuBLAS / cuDNN) for float64 and for float32 without TF32
    (``torch.backends.cuda.matmul.allow_tf32`` False, PyTorch's default): full fp32 products
    lower ``tl.dot`` to FMAs, slow and spilling heavily (benchmarks/results/kernel_resources.md),
    where cuBLAS / cuDNN compute them at full speed.  16-bit dtypes and float32 with TF32 run Triton."""
    if dtype == torch.float64 or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "aten"
    return "triton"


def dot_precision(dtype):
    """Full fp32 products unless TF32 is allowed for matmuls (ignored for 16-bit inputs)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# The GPUs a config is checked for, per compute capability: shared memory a block may use (opt-in
# maximum, bytes), what `densenet-fused cost --kernels` checks compiled kernels against, and the
# streaming multiprocessors of the architecture's reference GPU, what `densenet-fused cost` sizes the
# shape-dependent grids for.  On a GPU the launchers use the device's own values (``device_target``).
SMEM_PER_BLOCK = {80: 166912, 90: 232448}  # A100; H100 / H200
SMS = {80: 108, 90: 132}  # A100; H100 SXM / H200


class Target(NamedTuple):
    arch: int   # compute capability, major * 10 + minor
    smem: int   # shared memory per block, bytes
    sms: int    # streaming multiprocessors


def cost_target(arch: int) -> Target:
    return Target(arch, SMEM_PER_BLOCK[arch], SMS[arch])


# (id(driver), device index) -> (driver, Target): the driver kept alive with its entry, so that its id
# is never reused by another (a stand-in driver of `densenet-fused cost` for another architecture)
_targets: dict = {}


def device_target() -> Target:
    """Compute capability, shared memory per block (opt-in maximum) and multiprocessor count of the
    device Triton launches on (the current one: the launchers run under their tensors' device), read
    from Triton's active driver."""
    drv = triton.runtime.driver.active
    index = drv.get_current_device()
    entry = _targets.get((id(drv), index))
    if entry is None:
        props = drv.utils.get_device_properties(index)
        entry = _targets[(id(drv), index)] = (drv, Target(drv.get_current_target().arch,
                                                          int(props["max_shared_mem"]),
                                                          int(props["multiprocessor_count"])))
    return entry[1]


def config_pruner(fits, name):
    """An autotuner ``early_config_prune`` keeping the configs for which ``fits(config, args, target)``
    holds on the launch's device (args: the kernel's named arguments and the launch's keyword
    arguments; target: a ``Target``).  The predicate is kept as ``.fits`` for `cost --kernels`,
    which applies it for each architecture it compiles for."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        target = device_target()
        kept = [c for c in configs if fits(c, args, target)]
        if not kept:
            raise RuntimeError(f"{name}: no autotuner config fits this launch ({target}); configs: {configs}")
        return kept

    prune.fits = fits
    return prune


# The tensor arguments each Triton kernel of this file writes ("w") or reads and writes ("rw"); every other
# tensor argument is read (what `densenet-fused cost` counts as a launch's traffic).
TRITON_WRITES = {
    "stats_merge_kernel": {"MEAN": "w", "VAR": "w"},
}
