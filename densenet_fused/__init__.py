"""densenet_fused: DenseNet dense blocks in memory linear in depth.

A drop-in replacement for torchvision's ``_DenseBlock`` (``FusedDenseBlock``) built on a
shared NHWC feature buffer, BatchNorm-ReLU fused into the 1x1 convolution, batch
statistics computed once per channel and a one-pass backward.
"""
from ._loader import WITH_CUDA, TORCH_VERSION_BUILT  # noqa: F401  (loads the ops first)
from . import ops  # noqa: F401  (fake implementations, CUDA kernels from Python)
from .modules import (DenseNet, FusedDenseBlock, FusedDenseLayer, FusedFeatures, FusedTransition, convert,
                      convert_sync_batchnorm, densenet121, densenet161, densenet169, densenet201, densenet264,
                      densenet_bc, fused_head, fused_stem, planning)

from ._version import __version__  # noqa: E402  (one source: pyproject reads it too)

__all__ = ["__version__", "FusedDenseBlock", "FusedDenseLayer", "FusedTransition", "FusedFeatures", "fused_stem",
           "fused_head", "convert", "convert_sync_batchnorm", "DenseNet", "densenet121", "densenet161",
           "densenet169", "densenet201", "densenet264", "densenet_bc", "planning"]
