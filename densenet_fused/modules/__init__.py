"""The modules people build with: the fused dense block and layer (dense.py), the transition, stem and
head (transition.py, stem.py, head.py), the DenseNet ``features`` and models, ``convert`` and
``convert_sync_batchnorm``, and a plain-PyTorch reference layer.  Each checks its call and hands the
tensors to one autograd node (densenet_fused.autograd); nothing here imports densenet_fused.tools."""
from ..autograd.planned import planning  # noqa: F401  (re-exported: densenet_fused.planning)
from .convert import convert
from .dense import FusedDenseBlock, FusedDenseLayer
from .features import FusedFeatures
from .head import fused_head
from .models import DenseNet, densenet121, densenet161, densenet169, densenet201, densenet264, densenet_bc
from .stem import fused_stem
from .sync_batchnorm import convert_sync_batchnorm
from .transition import FusedTransition

__all__ = ["FusedDenseBlock", "FusedDenseLayer", "FusedTransition", "FusedFeatures", "fused_stem", "fused_head",
           "convert", "convert_sync_batchnorm", "DenseNet", "densenet121", "densenet161", "densenet169",
           "densenet201", "densenet264", "densenet_bc"]
