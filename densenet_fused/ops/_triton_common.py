"""Triton building blocks shared by the GEMM-shaped ops (bnrelu_conv1x1, bnrelu_conv3x3):
the BN-ReLU prologue, the per-tile statistics epilogue and its deterministic merge."""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    applies to the activated values)."""
    x = tl.load(PTR + rows64[:, None] * ld + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SCALE + cols, mask=cols_ok, other=0.0)
    h = tl.load(SHIFT + cols, mask=cols_ok, other=0.0)
    return tl.where(mask, tl.maximum(x * s[None, :] + h[None, :], 0.0), 0.0)


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
def stats_merge_kernel(PMEAN, PM2, MEAN, VAR, M, COUT, TILES, TILE_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan merge of per-tile (mean, M2) partials, tile by tile in order: deterministic."""
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = rc < COUT
    n = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range(0, TILES):
        nb = tl.minimum(M - t * TILE_ROWS, TILE_ROWS).to(tl.float32)
        mb = tl.load(PMEAN + t * COUT + rc, mask=ok, other=0.0)
        m2b = tl.load(PM2 + t * COUT + rc, mask=ok, other=0.0)
        nt = n + nb
        delta = mb - mean
        wb = nb / nt
        mean = mean + delta * wb
        m2 = m2 + m2b + delta * delta * n * wb
        n = nt
    tl.store(MEAN + rc, mean, mask=ok)
    tl.store(VAR + rc, m2 / n, mask=ok)


def merge_stats(part, m, tile_rows):
    """(mean, var) from per-tile partials part = (2, tiles, N) written by store_tile_stats."""
    tiles, n = part.shape[1], part.shape[2]
    mean = torch.empty(n, dtype=torch.float32, device=part.device)
    var = torch.empty(n, dtype=torch.float32, device=part.device)
    stats_merge_kernel[(triton.cdiv(n, 64),)](part[0], part[1], mean, var, m, n, tiles, TILE_ROWS=tile_rows,
                                              BLOCK_C=64)
    return mean, var


def dot_precision(dtype):
    """Full fp32 products unless TF32 is allowed for matmuls (ignored for 16-bit inputs)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
