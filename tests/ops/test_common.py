"""The device guard of the Python-registered (Triton) CUDA kernels: launches go to the GPU of
the op's first tensor, whatever device is current."""
import contextlib
import types

import pytest
import torch

from densenet_fused.ops._common import on_tensor_device
from flags import patched


def _record(log):
    @contextlib.contextmanager
    def device(dev):
        log.append(("enter", torch.device(dev)))
        yield
        log.append(("exit", torch.device(dev)))
    return device


def test_switches_to_the_tensors_gpu_and_back():
    log = []
    fake = types.SimpleNamespace(device=torch.device("cuda", 1))  # only .device is read
    kernel = on_tensor_device(lambda x, y, k=0: log.append(("run", y, k)) or "out")
    with patched(torch.cuda, current_device=lambda: 0, device=_record(log)):
        assert kernel(fake, 7, k=3) == "out"
    assert log == [("enter", torch.device("cuda", 1)), ("run", 7, 3), ("exit", torch.device("cuda", 1))]


def test_no_switch_when_current_or_on_the_cpu():
    log = []
    kernel = on_tensor_device(lambda x: log.append("run") or x)
    with patched(torch.cuda, current_device=lambda: 1, device=_record(log)):
        kernel(types.SimpleNamespace(device=torch.device("cuda", 1)))
        t = torch.ones(2)
        assert kernel(t) is t
    assert log == ["run", "run"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_block_on_the_second_gpu_while_the_first_is_current(no_tf32):
    from densenet_fused import FusedDenseBlock
    torch.manual_seed(0)
    block = FusedDenseBlock(2, 8, 2, 4).to("cuda:1").train()
    x = torch.randn(2, 8, 5, 5, device="cuda:1").to(memory_format=torch.channels_last)
    with torch.cuda.device(0):
        y = block(x)
        y.float().sum().backward()
    torch.manual_seed(0)
    ref = FusedDenseBlock(2, 8, 2, 4).train()  # the same initial weights, on the CPU
    torch.testing.assert_close(y.cpu(), ref(x.cpu()), rtol=1e-4, atol=1e-4)
