"""The tile rules (densenet_fused/ops/tiles.py) give every GEMM-shaped Triton kernel exactly the tiles the
launchers chose before the rules existed, on sm_90 and sm_80 and under the interpreter, at DenseNet-121's
four dense blocks, DenseNet-BC-100's first block, the transitions of both and odd shapes.

The OLD_* tables were recorded from the previous launchers (bnrelu_conv1x1's ``_fwd_block_m``, ``_splits``
and its autotuners' prune, bnrelu_avgpool_conv1x1's ``_TILES``, bnrelu_conv3x3's inline tiles): each launch
at these shapes on fake CUDA tensors of a stand-in sm_90 / sm_80 GPU (`densenet-fused cost`'s) and on CPU
tensors under the interpreter, observed at the launch seam; for the autotuned 1x1 kernels, the candidates
their prune kept on that architecture.  float16 chose as bfloat16 everywhere, and the 1x1 and 3x3 kernels
chose the same with and without TF32 (recorded, and folded here)."""
import types

import pytest
import torch
import triton

from densenet_fused.ops import _triton_common as common
from densenet_fused.ops import bnrelu_conv1x1 as op1
from densenet_fused.ops import tiles
from densenet_fused.ops._common import cdiv, next_pow2
from densenet_fused.ops.launch import INTERPRET
from flags import patched

_DN121 = [(128 * hw * hw, c0, layers) for hw, c0, layers in ((56, 64, 6), (28, 128, 12), (14, 256, 24), (7, 512, 16))]
# (rows, input channels, output channels) of the 1x1 convolution: the first, middle and last layer of each block
CONV1X1 = sorted({(m, c0 + 32 * l, 128) for m, c0, layers in _DN121 for l in (0, layers // 2, layers - 1)}
                 | {(64 * 32 * 32, 24 + 12 * l, 48) for l in (0, 8, 15)}
                 | {(1, 1, 1), (37, 3, 5), (300, 17, 48), (1000, 100, 16), (5000, 1024, 300), (130, 130, 130),
                    (240 * 128, 128, 128), (263 * 128, 128, 128), (264 * 128, 128, 128), (216 * 128, 64, 64)})

# The previous candidate lists, in order: (BLOCK_N, BLOCK_K, warps, stages) and (BLOCK_M, BLOCK_C, warps, stages)
FWD_CANDIDATES = [(128, 64, 8, 3), (128, 64, 4, 4), (128, 32, 4, 4), (64, 64, 4, 4), (128, 128, 8, 3), (64, 128, 4, 3),
                  (256, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4)]
BWD_CANDIDATES = [(64, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3), (128, 32, 8, 2), (32, 128, 8, 2), (64, 32, 8, 2),
                  (32, 32, 4, 3), (32, 32, 8, 2)]
# (m, c, cout) -> BLOCK_M and the candidates (indices into FWD_CANDIDATES) the autotuner keeps, on
# sm_90 in 2-byte dtypes, sm_90 in float32, sm_80 in 2-byte dtypes, sm_80 in float32
OLD_CONV1X1_FWD = {
    (1, 1, 1): ('64:378', '64:378', '64:378', '64:378'),
    (37, 3, 5): ('64:378', '64:378', '64:378', '64:378'),
    (130, 130, 130): ('64:023478', '64:02378', '64:03478', '64:0378'),
    (300, 17, 48): ('64:378', '64:378', '64:378', '64:378'),
    (1000, 100, 16): ('64:378', '64:378', '64:378', '64:378'),
    (5000, 1024, 300): ('64:012345678', '64:0123578', '64:0134678', '64:0378'),
    (6272, 512, 128): ('64:01234578', '64:0123578', '64:013478', '64:0378'),
    (6272, 768, 128): ('64:01234578', '64:0123578', '64:013478', '64:0378'),
    (6272, 992, 128): ('64:01234578', '64:0123578', '64:013478', '64:0378'),
    (25088, 256, 128): ('64:01234578', '64:0123578', '64:013478', '64:0378'),
    (25088, 640, 128): ('64:01234578', '64:0123578', '64:013478', '64:0378'),
    (25088, 992, 128): ('64:01234578', '64:0123578', '64:013478', '64:0378'),
    (27648, 64, 64): ('64:3578', '64:3578', '128:78', '128:8'),
    (30720, 128, 128): ('64:01234578', '64:0123578', '128:078', '128:8'),
    (33664, 128, 128): ('64:01234578', '64:0123578', '128:078', '128:8'),
    (33792, 128, 128): ('128:023478', '128:02378', '128:078', '128:8'),
    (65536, 24, 48): ('128:78', '128:78', '128:78', '128:8'),
    (65536, 120, 48): ('128:78', '128:78', '128:78', '128:8'),
    (65536, 204, 48): ('128:78', '128:78', '128:78', '128:8'),
    (100352, 128, 128): ('128:023478', '128:02378', '128:078', '128:8'),
    (100352, 320, 128): ('128:023478', '128:02378', '128:078', '128:8'),
    (100352, 480, 128): ('128:023478', '128:02378', '128:078', '128:8'),
    (401408, 64, 128): ('128:023478', '128:02378', '128:078', '128:8'),
    (401408, 160, 128): ('128:023478', '128:02378', '128:078', '128:8'),
    (401408, 224, 128): ('128:023478', '128:02378', '128:078', '128:8'),
}
# (m, c, cout) -> splits, the candidates (indices into BWD_CANDIDATES) the autotuner keeps without and with
# FINISH, on the same four targets; and the interpreter's splits
OLD_CONV1X1_BWD = {
    (1, 1, 1): ('1:01234:567', '1:01234:567', '1:1:567', '1:1:567', 1),
    (37, 3, 5): ('1:01234:567', '1:01234:567', '1:1:567', '1:1:567', 2),
    (130, 130, 130): ('2:01234:7', '2:2:7', '2:1:7', '2::', 4),
    (300, 17, 48): ('3:01234:567', '3:01234:567', '3:1:567', '3:1:567', 4),
    (1000, 100, 16): ('8:01234:567', '8:01234:567', '8:1:567', '8:1:567', 4),
    (5000, 1024, 300): ('17:024:', '17::', '14::', '14::', 4),
    (6272, 512, 128): ('33:01234:04567', '33:01234:567', '27:1:567', '27:1:7', 4),
    (6272, 768, 128): ('22:01234:04567', '22:01234:567', '18:1:567', '18:1:7', 4),
    (6272, 992, 128): ('17:01234:04567', '17:01234:567', '14:1:567', '14:1:7', 4),
    (25088, 256, 128): ('66:01234:04567', '66:01234:567', '54:1:567', '54:1:7', 4),
    (25088, 640, 128): ('27:01234:04567', '27:01234:567', '22:1:567', '22:1:7', 4),
    (25088, 992, 128): ('17:01234:04567', '17:01234:567', '14:1:567', '14:1:7', 4),
    (27648, 64, 64): ('216:01234:034567', '216:01234:567', '216:1:567', '216:1:567', 4),
    (30720, 128, 128): ('132:01234:04567', '132:01234:567', '108:1:567', '108:1:7', 4),
    (33664, 128, 128): ('132:01234:04567', '132:01234:567', '108:1:567', '108:1:7', 4),
    (33792, 128, 128): ('132:01234:04567', '132:01234:567', '108:1:567', '108:1:7', 4),
    (65536, 24, 48): ('264:01234:567', '264:01234:567', '216:1:567', '216:1:567', 4),
    (65536, 120, 48): ('132:01234:567', '132:01234:567', '108:1:567', '108:1:567', 4),
    (65536, 204, 48): ('66:01234:567', '66:01234:567', '54:1:567', '54:1:567', 4),
    (100352, 128, 128): ('132:01234:04567', '132:01234:567', '108:1:567', '108:1:7', 4),
    (100352, 320, 128): ('53:01234:04567', '53:01234:567', '44:1:567', '44:1:7', 4),
    (100352, 480, 128): ('33:01234:04567', '33:01234:567', '27:1:567', '27:1:7', 4),
    (401408, 64, 128): ('264:01234:04567', '264:01234:567', '216:1:567', '216:1:7', 4),
    (401408, 160, 128): ('88:01234:04567', '88:01234:567', '72:1:567', '72:1:7', 4),
    (401408, 224, 128): ('66:01234:04567', '66:01234:567', '54:1:567', '54:1:7', 4),
}
# (N, H, W, Cb, k) -> "forward; dgrad; wgrad; wgrad splits" on a GPU (sm_90 and sm_80 alike) in 2-byte
# dtypes, in float32, and under the interpreter
OLD_CONV3X3 = {
    (128, 56, 56, 128, 32): (
        'M128,N32,K64,w4s3; M64,N64,K32,w4s3; M128,C64,w4s3; 57',
        'M128,N32,K32,w4s3; M64,N64,K32,w4s3; M64,C64,w4s3; 57',
        'M32,N32,K16,w4s3; M32,N16,K32,w4s3; M32,C16,w4s3; 3',),
    (128, 28, 28, 128, 32): (
        'M128,N32,K64,w4s3; M64,N64,K32,w4s3; M128,C64,w4s3; 57',
        'M128,N32,K32,w4s3; M64,N64,K32,w4s3; M64,C64,w4s3; 57',
        'M32,N32,K16,w4s3; M32,N16,K32,w4s3; M32,C16,w4s3; 3',),
    (128, 14, 14, 128, 32): (
        'M128,N32,K64,w4s3; M64,N64,K32,w4s3; M128,C64,w4s3; 57',
        'M128,N32,K32,w4s3; M64,N64,K32,w4s3; M64,C64,w4s3; 57',
        'M32,N32,K16,w4s3; M32,N16,K32,w4s3; M32,C16,w4s3; 3',),
    (128, 7, 7, 128, 32): (
        'M128,N32,K64,w4s3; M64,N64,K32,w4s3; M128,C64,w4s3; 49',
        'M128,N32,K32,w4s3; M64,N64,K32,w4s3; M64,C64,w4s3; 57',
        'M32,N32,K16,w4s3; M32,N16,K32,w4s3; M32,C16,w4s3; 3',),
    (64, 32, 32, 48, 12): (
        'M128,N16,K64,w4s3; M64,N64,K16,w4s3; M128,C64,w4s3; 114',
        'M128,N16,K32,w4s3; M64,N64,K16,w4s3; M64,C64,w4s3; 114',
        'M32,N16,K16,w4s3; M32,N16,K16,w4s3; M32,C16,w4s3; 3',),
    (1, 1, 1, 1, 1): (
        'M128,N16,K64,w4s3; M64,N64,K16,w4s3; M128,C64,w4s3; 1',
        'M128,N16,K32,w4s3; M64,N64,K16,w4s3; M64,C64,w4s3; 1',
        'M32,N16,K16,w4s3; M32,N16,K16,w4s3; M32,C16,w4s3; 1',),
    (2, 3, 5, 7, 5): (
        'M128,N16,K64,w4s3; M64,N64,K16,w4s3; M128,C64,w4s3; 1',
        'M128,N16,K32,w4s3; M64,N64,K16,w4s3; M64,C64,w4s3; 1',
        'M32,N16,K16,w4s3; M32,N16,K16,w4s3; M32,C16,w4s3; 1',),
    (3, 9, 7, 48, 12): (
        'M128,N16,K64,w4s3; M64,N64,K16,w4s3; M128,C64,w4s3; 2',
        'M128,N16,K32,w4s3; M64,N64,K16,w4s3; M64,C64,w4s3; 3',
        'M32,N16,K16,w4s3; M32,N16,K16,w4s3; M32,C16,w4s3; 3',),
    (2, 8, 8, 16, 100): (
        'M128,N64,K64,w4s3; M64,N64,K64,w4s3; M128,C64,w4s3; 1',
        'M128,N64,K32,w4s3; M64,N64,K64,w4s3; M64,C64,w4s3; 2',
        'M32,N64,K16,w4s3; M32,N16,K64,w4s3; M32,C16,w4s3; 3',),
    (4, 17, 13, 200, 70): (
        'M128,N64,K64,w4s3; M64,N64,K64,w4s3; M128,C64,w4s3; 7',
        'M128,N64,K32,w4s3; M64,N64,K64,w4s3; M64,C64,w4s3; 14',
        'M32,N64,K16,w4s3; M32,N16,K64,w4s3; M32,C16,w4s3; 3',),
    (2, 30, 30, 1000, 16): (
        'M128,N16,K64,w4s3; M64,N64,K16,w4s3; M128,C64,w4s3; 8',
        'M128,N16,K32,w4s3; M64,N64,K16,w4s3; M64,C64,w4s3; 8',
        'M32,N16,K16,w4s3; M32,N16,K16,w4s3; M32,C16,w4s3; 3',),
}
# (N, H, W, C, Cout) -> "forward; dW; dW splits; dx" on a GPU (sm_90 and sm_80 alike) in 2-byte dtypes, in
# float32 with TF32, in float32 without, and under the interpreter
OLD_TRANSITION = {
    (128, 56, 56, 256, 128): (
        'M64,N64,K32,w4s3; M32,N64,C32,w4s3; 64; M64,N64,C32,w8s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 64; M32,N32,C32,w4s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 64; M32,N64,C32,w8s3',
        'M16,N16,K16,w4s3; M16,N16,C16,w4s3; 4; M16,N16,C16,w4s3',),
    (128, 28, 28, 512, 256): (
        'M64,N64,K32,w4s3; M32,N64,C32,w4s3; 64; M64,N64,C32,w8s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 64; M32,N32,C32,w4s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 64; M32,N64,C32,w8s3',
        'M16,N16,K16,w4s3; M16,N16,C16,w4s3; 4; M16,N16,C16,w4s3',),
    (128, 14, 14, 1024, 512): (
        'M64,N64,K32,w4s3; M32,N64,C32,w4s3; 64; M64,N64,C32,w8s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 64; M32,N32,C32,w4s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 64; M32,N64,C32,w8s3',
        'M16,N16,K16,w4s3; M16,N16,C16,w4s3; 4; M16,N16,C16,w4s3',),
    (64, 32, 32, 216, 108): (
        'M64,N64,K32,w4s3; M32,N64,C32,w4s3; 64; M64,N64,C32,w8s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 64; M32,N32,C32,w4s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 64; M32,N64,C32,w8s3',
        'M16,N16,K16,w4s3; M16,N16,C16,w4s3; 4; M16,N16,C16,w4s3',),
    (64, 16, 16, 300, 150): (
        'M64,N64,K32,w4s3; M32,N64,C32,w4s3; 64; M64,N64,C32,w8s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 64; M32,N32,C32,w4s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 64; M32,N64,C32,w8s3',
        'M16,N16,K16,w4s3; M16,N16,C16,w4s3; 4; M16,N16,C16,w4s3',),
    (128, 29, 29, 512, 256): (
        'M64,N64,K32,w4s3; M32,N64,C32,w4s3; 64; M64,N64,C32,w8s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 64; M32,N32,C32,w4s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 64; M32,N64,C32,w8s3',
        'M16,N16,K16,w4s3; M16,N16,C16,w4s3; 4; M16,N16,C16,w4s3',),
    (1, 2, 2, 1, 1): (
        'M64,N64,K32,w4s3; M32,N64,C32,w4s3; 1; M64,N64,C32,w8s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 1; M32,N32,C32,w4s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 1; M32,N64,C32,w8s3',
        'M16,N16,K16,w4s3; M16,N16,C16,w4s3; 1; M16,N16,C16,w4s3',),
    (2, 3, 5, 7, 3): (
        'M64,N64,K32,w4s3; M32,N64,C32,w4s3; 1; M64,N64,C32,w8s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 1; M32,N32,C32,w4s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 1; M32,N64,C32,w8s3',
        'M16,N16,K16,w4s3; M16,N16,C16,w4s3; 1; M16,N16,C16,w4s3',),
    (4, 33, 17, 100, 1000): (
        'M64,N64,K32,w4s3; M32,N64,C32,w4s3; 16; M64,N64,C32,w8s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 16; M32,N32,C32,w4s3',
        'M64,N64,K32,w8s3; M32,N64,C32,w8s3; 16; M32,N64,C32,w8s3',
        'M16,N16,K16,w4s3; M16,N16,C16,w4s3; 4; M16,N16,C16,w4s3',),
}

_GPU_TARGETS = {"sm90": common.cost_target(90), "sm80": common.cost_target(80)}
_DTYPES = {"bf16": (torch.bfloat16, "tf32"), "fp16": (torch.float16, "tf32"), "fp32/tf32": (torch.float32, "tf32"),
           "fp32/ieee": (torch.float32, "ieee")}


def _driver(target):
    """The part of a Triton driver ``device_target`` reads, for a GPU that is not there."""
    props = dict(max_shared_mem=target.smem, multiprocessor_count=target.sms)
    return types.SimpleNamespace(get_current_device=lambda: 0,
                                 get_current_target=lambda: types.SimpleNamespace(arch=target.arch),
                                 utils=types.SimpleNamespace(get_device_properties=lambda index: dict(props)))


@pytest.fixture(params=list(_GPU_TARGETS))
def gpu(request):
    """(label, target): launches on a (meta) tensor that is not interpreted, Triton's active driver a stand-in
    for the target's GPU."""
    target = _GPU_TARGETS[request.param]
    with patched(common, _targets={}), patched(triton.runtime.driver, _active=_driver(target)):
        yield request.param, target


_META = torch.empty(0, device="meta")
_CPU = torch.empty(0)
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="the interpreter's tiles: TRITON_INTERPRET=1")


def _cfg(kwargs):
    """"M64,N64,K32,w4s3" of a launch's tile keywords (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_C, warps, stages)."""
    blocks = ",".join(f"{k}{kwargs['BLOCK_' + k]}" for k in "MNKC" if "BLOCK_" + k in kwargs)
    return f"{blocks},w{kwargs['num_warps']}s{kwargs['num_stages']}"


def _kept(rule, args, target):
    return "".join(str(i) for i, c in enumerate(rule.candidates) if rule.fits(c, args, target))


def test_candidates_are_the_previous_lists():
    assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            for c in tiles.CONV1X1_FWD.candidates] == FWD_CANDIDATES
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_C"], c.num_warps, c.num_stages)
            for c in tiles.CONV1X1_BWD.candidates] == BWD_CANDIDATES
    for tuned, rule in ((op1._fwd_tuned, tiles.CONV1X1_FWD), (op1._bwd_tuned, tiles.CONV1X1_BWD)):
        assert [c.kwargs for c in tuned.configs] == [c.kwargs for c in rule.candidates]
        assert tuned.early_config_prune.fits is rule.fits


def test_conv1x1_on_a_gpu(gpu):
    label, target = gpu
    col = {"sm90": 0, "sm80": 2}[label]
    for (m, c, cout), want_fwd in OLD_CONV1X1_FWD.items():
        want_bwd = OLD_CONV1X1_BWD[(m, c, cout)]
        for dtype, extra in ((torch.bfloat16, 0), (torch.float16, 0), (torch.float32, 1)):
            x = torch.empty(0, dtype=dtype)
            t = tiles.choose(tiles.CONV1X1_FWD, _META, m=m, cout=cout)
            assert t.tuned and t.splits == 1
            block_m, kept = want_fwd[col + extra].split(":")
            assert t.kwargs == {"BLOCK_M": int(block_m)}, (m, c, cout)
            args = dict(X=x, ldw=c, COUT=cout, BLOCK_M=t.kwargs["BLOCK_M"])
            assert _kept(tiles.CONV1X1_FWD, args, target) == kept, (m, c, cout, dtype)
            t = tiles.choose(tiles.CONV1X1_BWD, _META, m=m, c=c)
            splits, kept, kept_finish = want_bwd[col + extra].split(":")
            assert t.tuned and t.kwargs == {} and t.splits == int(splits), (m, c, cout)
            for finish, want in ((False, kept), (True, kept_finish)):
                args = dict(X=x, ldw=c, COUT_PAD=max(16, next_pow2(cout)), FINISH=finish)
                assert _kept(tiles.CONV1X1_BWD, args, target) == want, (m, c, cout, dtype, finish)


@interpreter_only
def test_conv1x1_under_the_interpreter():
    for (m, c, cout), want in OLD_CONV1X1_BWD.items():
        t = tiles.choose(tiles.CONV1X1_FWD, _CPU, m=m, cout=cout)
        assert not t.tuned and _cfg(t.kwargs) == "M32,N16,K16,w4s3" and t.splits == 1
        t = tiles.choose(tiles.CONV1X1_BWD, _CPU, m=m, c=c)
        assert not t.tuned and _cfg(t.kwargs) == "M32,C16,w4s3" and t.splits == want[4], (m, c)


def _conv3x3(x, n, h, w, cb, k, dtype):
    size = torch.empty(0, dtype=dtype).element_size()
    fwd = tiles.choose(tiles.CONV3X3_FWD, x, k=k, size=size)
    dgrad = tiles.choose(tiles.CONV3X3_DGRAD, x, k=k)
    wgrad = tiles.choose(tiles.CONV3X3_WGRAD, x, m=n * h * w, cb=cb, size=size)
    assert not (fwd.tuned or dgrad.tuned or wgrad.tuned) and fwd.splits == dgrad.splits == 1
    return f"{_cfg(fwd.kwargs)}; {_cfg(dgrad.kwargs)}; {_cfg(wgrad.kwargs)}; {wgrad.splits}"


def _transition(x, n, h, w, c, cout, label):
    dtype, precision = _DTYPES[label]
    fwd = tiles.choose(tiles.TRANSITION_FWD, x, dtype=dtype, precision=precision)
    dw = tiles.choose(tiles.TRANSITION_DW, x, dtype=dtype, precision=precision, mo=n * (h // 2) * (w // 2))
    dx = tiles.choose(tiles.TRANSITION_DX, x, dtype=dtype, precision=precision)
    assert not (fwd.tuned or dw.tuned or dx.tuned) and fwd.splits == dx.splits == 1
    return f"{_cfg(fwd.kwargs)}; {_cfg(dw.kwargs)}; {dw.splits}; {_cfg(dx.kwargs)}"


def test_conv3x3_and_transition_on_a_gpu(gpu):
    for shape, want in OLD_CONV3X3.items():
        for label, col in (("bf16", 0), ("fp16", 0), ("fp32/tf32", 1), ("fp32/ieee", 1)):
            assert _conv3x3(_META, *shape, _DTYPES[label][0]) == want[col], (shape, label)
    for shape, want in OLD_TRANSITION.items():
        for label, col in (("bf16", 0), ("fp16", 0), ("fp32/tf32", 1), ("fp32/ieee", 2)):
            assert _transition(_META, *shape, label) == want[col], (shape, label)


@interpreter_only
def test_conv3x3_and_transition_under_the_interpreter():
    for label in _DTYPES:
        for shape, want in OLD_CONV3X3.items():
            assert _conv3x3(_CPU, *shape, _DTYPES[label][0]) == want[2], (shape, label)
        for shape, want in OLD_TRANSITION.items():
            assert _transition(_CPU, *shape, label) == want[3], (shape, label)


def test_rules_are_declared_whole():
    fixed = triton.Config(dict(BLOCK_M=16))
    with pytest.raises(ValueError, match="two candidates or more and a fits predicate"):
        tiles.TileRule("k", [fixed], fixed, fits=lambda *a: True)
    with pytest.raises(ValueError, match="two candidates or more and a fits predicate"):
        tiles.TileRule("k", [fixed, fixed], fixed)
    with pytest.raises(ValueError, match="splits and interpreter_splits go together"):
        tiles.TileRule("k", lambda s: fixed, fixed, splits=lambda s, b, t: 1)
    with pytest.raises(ValueError, match="one config per shape; it is not autotuned"):
        tiles.autotuned(tiles.CONV3X3_FWD, op1._fwd_kernel, key=["COUT"])


def test_an_autotuned_rule_with_no_fitting_candidate_says_so(gpu):
    """The prune of an autotuned launch raises with the device and the candidates when none fits."""
    prune = op1._fwd_tuned.early_config_prune
    args = dict(X=torch.empty(0, dtype=torch.float32), ldw=1024, COUT=1024, BLOCK_M=1 << 14)  # no tile fits
    with pytest.raises(RuntimeError, match="bnrelu_conv1x1._fwd_kernel: no autotuner config fits this launch"):
        prune(op1._fwd_tuned.configs, args)


def test_a_choice_is_made_once_per_shape_and_device(gpu):
    """choose() keeps each choice (host time): the same shape on the same device gets the same Tiles; the
    store is emptied when it outgrows its bound."""
    _, target = gpu
    with patched(tiles, _chosen={}, _CHOSEN_MAX=3):
        a = tiles.choose(tiles.CONV1X1_BWD, _META, m=50000, c=256)
        assert tiles.choose(tiles.CONV1X1_BWD, _META, m=50000, c=256) is a
        assert a.splits == cdiv(2 * target.sms, 4)  # two waves of 256 / 64 column blocks
        b = tiles.choose(tiles.CONV1X1_BWD, _META, m=50000, c=512)
        assert b is not a and b.splits == cdiv(2 * target.sms, 8)
        tiles.choose(tiles.CONV3X3_DGRAD, _META, k=32)
        assert len(tiles._chosen) == 3
        tiles.choose(tiles.CONV3X3_DGRAD, _META, k=48)
        assert len(tiles._chosen) == 1
