"""``--cuda-graphs``: forward, loss and backward of a training step captured as one CUDA graph
and replayed on every batch, following torch's "whole network capture" recipe
(https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture): warm-up steps on a side
stream first (Triton autotuning, cuBLAS/cuDNN workspaces), gradients set to None before the
capture so that the captured backward writes them into the graph's memory, the inputs copied into
static tensors before each replay.  The optimizer steps eagerly on those gradients after each
replay, as in torch's partial-capture examples, so that the learning-rate schedule (a Python float
in SGD's parameter groups) keeps applying.  Static shapes: every batch has the captured size."""
from contextlib import nullcontext
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class GraphedStep:
    """``step(x, y)`` -> (loss, logits): what ``cross_entropy(model(x), y).backward()`` computes, the
    parameters' ``.grad`` holding the gradients, from a CUDA graph captured at the first call.

    The warm-up runs forward and backward (no optimizer step) ``warmup`` times on the first batch;
    the model's buffers (BatchNorm running statistics, batch counts) and the RNG states are put back
    afterwards, so the replayed steps are the steps an eager loop would have taken.  Between calls
    the caller must not set the gradients to None (``zero_grad(set_to_none=True)``): the graph writes
    them where they were at the capture.  The returned tensors are overwritten by the next call.
    ``dtype``: the autocast dtype (None: no autocast, the parameters' dtype)."""

    def __init__(self, model: nn.Module, dtype: Optional[torch.dtype] = torch.bfloat16, warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"GraphedStep: expected warmup >= 1 (Triton autotunes before the capture), got {warmup}")
        self.model, self.dtype, self.warmup = model, dtype, warmup
        self.graph = None

    def _forward_backward(self) -> Tuple[torch.Tensor, torch.Tensor]:
        # cache_enabled=False: autocast's cast cache must not outlive a capture (torch's autocast notes)
        autocast = (nullcontext() if self.dtype is None
                    else torch.autocast("cuda", dtype=self.dtype, cache_enabled=False))
        with autocast:
            logits = self.model(self.x)
            loss = F.cross_entropy(logits, self.y)
        loss.backward()
        return loss.detach(), logits.detach()

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x = torch.empty_like(x).copy_(x)  # same strides (channels-last)
        self.y = y.detach().clone()
        buffers = [b.detach().clone() for b in self.model.buffers()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.random.fork_rng(devices=[x.get_device()]), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.model.zero_grad(set_to_none=True)
                self._forward_backward()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)
        self.model.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.logits = self._forward_backward()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None:
            self._capture(x, y)
        elif x.shape != self.x.shape or y.shape != self.y.shape:
            raise ValueError(f"GraphedStep: captured for inputs {tuple(self.x.shape)} and targets "
                             f"{tuple(self.y.shape)}, got {tuple(x.shape)} and {tuple(y.shape)} (static shapes)")
        with torch.no_grad():
            self.x.copy_(x)
            self.y.copy_(y)
        self.graph.replay()
        return self.loss, self.logits
