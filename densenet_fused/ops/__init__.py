"""The densenet_fused ops: one file per op (launcher, fake implementation, CUDA kernel
registration where it lives in Python).  Schemas and C++ kernels are in csrc/."""
from .bn_grad_finish import bn_grad_finish
from .bn_scale_shift import bn_scale_shift
from .bnrelu_avgpool_conv1x1 import bnrelu_avgpool_conv1x1_bwd, bnrelu_avgpool_conv1x1_fwd
from .bnrelu_conv1x1 import bnrelu_conv1x1_bwd, bnrelu_conv1x1_fwd
from .bnrelu_conv3x3 import bnrelu_conv3x3_bwd, bnrelu_conv3x3_fwd, using_conv3x3
from .bnrelu_global_avgpool import bnrelu_global_avgpool_bwd, bnrelu_global_avgpool_fwd
from .bnrelu_maxpool import bnrelu_maxpool_bwd, bnrelu_maxpool_fwd
from .channel_stats import channel_stats
from .options import Accumulate, Dropout, FoldBN, GradFinish, StatsOut
from .running_stats_update import running_stats_update
from .table import BlockOps, block_ops

__all__ = ["bn_grad_finish", "bn_scale_shift", "bnrelu_avgpool_conv1x1_bwd", "bnrelu_avgpool_conv1x1_fwd",
           "bnrelu_global_avgpool_bwd", "bnrelu_global_avgpool_fwd", "bnrelu_conv1x1_bwd", "bnrelu_conv1x1_fwd",
           "bnrelu_conv3x3_bwd", "bnrelu_conv3x3_fwd", "bnrelu_maxpool_bwd", "bnrelu_maxpool_fwd",
           "channel_stats", "running_stats_update", "using_conv3x3", "BlockOps", "block_ops",
           "Accumulate", "Dropout", "FoldBN", "GradFinish", "StatsOut"]
