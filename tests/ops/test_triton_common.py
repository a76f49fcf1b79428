"""The device the Triton launchers size their grids for: ``_triton_common.device_target`` reads the
compute capability, shared memory and multiprocessor count from Triton's active driver, and the
shape-dependent grids (two waves of programs) follow the multiprocessor count; the interpreter's
fixed small tiles ask no driver."""
import types

import pytest
import torch
import triton

from densenet_fused.ops import _triton_common as common
from densenet_fused.ops import bnrelu_maxpool as pool
from densenet_fused.ops import tiles
from densenet_fused.ops.launch import INTERPRET
from flags import patched


def _driver(arch, smem, sms):
    """The part of a Triton driver ``device_target`` reads, for a GPU that is not there."""
    props = dict(max_shared_mem=smem, multiprocessor_count=sms)
    return types.SimpleNamespace(get_current_device=lambda: 0,
                                 get_current_target=lambda: types.SimpleNamespace(arch=arch),
                                 utils=types.SimpleNamespace(get_device_properties=lambda index: dict(props)))


def _on(drv):
    """``drv`` as Triton's active driver within; the previous one (none on a machine without a GPU) after."""
    return patched(triton.runtime.driver, _active=drv)


@pytest.fixture(autouse=True)
def _fresh_targets():
    with patched(common, _targets={}):
        yield


def test_device_target_reads_the_active_drivers_properties():
    with _on(_driver(80, 166912, 108)):
        assert common.device_target() == common.Target(80, 166912, 108)
    with _on(_driver(90, 232448, 114)):  # another driver (an H100 PCIe): its own values, not the cached ones
        assert common.device_target() == common.Target(90, 232448, 114)
    assert common.cost_target(80) == common.Target(80, 166912, 108)  # A100
    assert common.cost_target(90) == common.Target(90, 232448, 132)  # H100 SXM / H200


_GPU = torch.empty(0, device="meta")  # a launch that is not interpreted (the GPU's tiles)
_CPU = torch.empty(0)  # interpreted under TRITON_INTERPRET=1


def _block_m(x, m, cout):
    return tiles.choose(tiles.CONV1X1_FWD, x, m=m, cout=cout).kwargs["BLOCK_M"]


def _splits(x, m, c):
    return tiles.choose(tiles.CONV1X1_BWD, x, m=m, c=c).splits


def test_grids_take_two_waves_of_the_devices_multiprocessors():
    m = 240 * 128  # 240 tiles of 128 x 128 for 128 output channels: 2 waves of 108 SMs, not of 132
    want = {108: (128, 54, 108), 132: (64, 66, 132)}  # (1x1 forward BLOCK_M, 1x1 splits, max-pool splits)
    for sms, (block_m, splits, pool_splits) in want.items():
        with _on(_driver(90, 232448, sms)):
            assert _block_m(_GPU, m, 128) == block_m, sms
            assert _splits(_GPU, 10 ** 6, 256) == splits, sms  # cdiv(2 * sms, 256 / 64)
            assert pool._splits(10 ** 6, 64, 32, 32, interp=False) == pool_splits, sms  # cdiv(2 * sms, 64 / 32)
    with _on(_driver(90, 232448, 132)):  # fewer rows than two waves: one split per 128 rows
        assert _splits(_GPU, 300, 256) == 3 and pool._splits(40, 64, 32, 32, interp=False) == 2


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's tiles: TRITON_INTERPRET=1")
def test_interpreter_tiles_ask_no_driver():
    def refuse():
        raise AssertionError("the interpreter path asked Triton's driver")
    with _on(types.SimpleNamespace(get_current_device=refuse)):
        assert _block_m(_CPU, 240 * 128, 128) == 32
        assert _splits(_CPU, 10 ** 6, 256) == 4
        assert pool._splits(10 ** 6, 64, 32, 32, interp=True) == 3
        with pytest.raises(AssertionError, match="asked Triton's driver"):  # the control: the GPU path asks
            _splits(_GPU, 10 ** 6, 256)
