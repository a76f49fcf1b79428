"""FusedFeatures: a DenseNet's ``features`` container (torchvision's names: ``conv0, norm0, relu0,
pool0, denseblock1, transition1, ..., norm5``) that threads each dense block's batch statistics
into the fused transition or head that reads its output (docs/design.md section 9: no statistics pass
over a block's output).

``forward(x)`` is torchvision's ``features(x)`` (it ends with norm5's output); ``forward_pooled(x)``
is ``flatten(adaptive_avg_pool2d(relu(features(x)), 1), 1)`` with norm5, ReLU and the pool fused
(what the package's ``DenseNet.forward`` uses).  Modules with hooks are called as modules (their
hooks fire; a hooked block's statistics are then recomputed by its reader).  Under torch.fx symbolic
tracing the container runs its modules one by one.  A transition and the block after it (neither
hooked) run as one node that writes the transition's output straight into the block's buffer
(transition_block.py).  A full ImageNet stem (conv0, norm0, relu0,
pool0 without hooks) runs as one fused op (stem.fused_stem).

``sync_group`` (set by densenet_fused.convert_sync_batchnorm): norm0 and norm5, run fused, take their
batch statistics over that process group; where one of them would have to run as a module (hooks, or
norm5 in ``forward``, whose output is norm5's) it raises instead of silently using local statistics.
"""
from collections import OrderedDict
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import has_hooks
from .head import fused_head
from .dense import FusedDenseBlock
from .stem import fused_stem
from .transition import FusedTransition
from .transition_block import transition_into_block

STEM = ("conv0", "norm0", "relu0", "pool0")


def _hooked(module: nn.Module) -> bool:
    return has_hooks(module)


def _block_with_stats(block: FusedDenseBlock, x: Tensor) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """The block's output and its batch statistics (None in eval, or when the block or a dense layer has
    hooks: then it is called as a module so that they fire)."""
    if _hooked(block) or any(_hooked(layer) for layer in block.values()):
        return block(x), None
    out, mean, var = block.forward_with_stats(x)
    return out, (None if mean is None else (mean, var))


class FusedFeatures(nn.Sequential):
    """``nn.Sequential`` of a DenseNet's feature modules, with block statistics threaded into the
    following fused transition / head.  ``torch.jit.script`` compiles a plain ``nn.Sequential`` of
    the same modules (the blocks and transitions in their unfused, torchvision form)."""

    def __prepare_scriptable__(self) -> nn.Sequential:
        """What ``torch.jit.script`` compiles: a new ``nn.Sequential`` of these very modules (torch
        then prepares the fused ones among them; this container keeps its own)."""
        seq = nn.Sequential(OrderedDict(self.named_children()))
        seq.training = self.training
        return seq

    def _stem(self, x: Tensor) -> Tuple[Tensor, int]:
        """Runs the stem modules at the start (conv0[, norm0, relu0, pool0]); returns (output, how
        many modules it ran)."""
        mods = self._modules
        names = list(mods)
        k = 0
        while k < len(names) and k < len(STEM) and names[k] == STEM[k]:
            k += 1
        if k == len(STEM) and not any(_hooked(mods[name]) for name in STEM):
            return fused_stem(x, mods["conv0"], mods["norm0"], mods["pool0"], self._sync_group()), k
        for name in names[:k]:
            self._refuse_unsynced(name, mods[name])
            x = mods[name](x)
        return x, k

    def _sync_group(self):
        return getattr(self, "sync_group", None)

    def _refuse_unsynced(self, name: str, module: nn.Module) -> None:
        """A plain BatchNorm run as a module while the container synchronizes its statistics would
        silently use the local batch: refuse."""
        if self._sync_group() is not None and module.training and type(module) is nn.BatchNorm2d:
            raise NotImplementedError(
                f"FusedFeatures: {name} would run as a module with local batch statistics, but the container "
                f"synchronizes them over a process group (densenet_fused.convert_sync_batchnorm). It runs fused "
                f"only without hooks (norm5: in forward_pooled, as the package's DenseNet calls it); on CUDA, "
                f"torch.nn.SyncBatchNorm.convert_sync_batchnorm synchronizes every norm instead")

    def _run(self, x: Tensor, pooled: bool) -> Tensor:
        x, start = self._stem(x)
        names = list(self._modules)[start:]
        mods = list(self._modules.values())[start:]

        def reads_stats(j: int) -> bool:  # module j normalizes its input with the previous block's statistics
            return j < len(mods) and (isinstance(mods[j], FusedTransition)
                                      or (pooled and j + 1 == len(mods) and _is_head_norm(mods[j])))
        stats = None
        i = 0
        while i < len(mods):
            m = mods[i]
            if (isinstance(m, FusedTransition) and i + 1 < len(mods) and x.shape[0] > 0  # (empty: module by module)
                    and _fusable_pair(m, mods[i + 1])):
                # the transition writes into the next block's buffer: one node for both
                if reads_stats(i + 2):
                    x, mean, var = transition_into_block(m, mods[i + 1], x, stats, with_stats=True)
                    stats = None if mean is None else (mean, var)
                else:
                    x, stats = transition_into_block(m, mods[i + 1], x, stats), None
                i += 2
                continue
            if isinstance(m, FusedDenseBlock) and reads_stats(i + 1):
                x, stats = _block_with_stats(m, x)
                i += 1
                continue
            if isinstance(m, FusedTransition):
                x = m(x, stats=stats)
            elif pooled and i + 1 == len(mods) and _is_head_norm(m):
                return fused_head(m, x, stats, self._sync_group())
            else:
                if isinstance(m, nn.BatchNorm2d):
                    self._refuse_unsynced(names[i], m)
                x = m(x)
            stats = None
            i += 1
        if pooled:  # the container does not end with a hook-free norm5: torchvision's head, module by module
            return torch.flatten(F.adaptive_avg_pool2d(F.relu(x), (1, 1)), 1)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return super().forward(x)
        return self._run(x, pooled=False)

    def forward_pooled(self, x: Tensor) -> Tensor:
        """``torch.flatten(F.adaptive_avg_pool2d(F.relu(self(x)), (1, 1)), 1)`` with norm5, ReLU and the
        pool fused into one op reading the last block's output with its statistics."""
        if isinstance(x, torch.fx.Proxy) or _hooked(self):
            return torch.flatten(F.adaptive_avg_pool2d(F.relu(self(x)), (1, 1)), 1)
        return self._run(x, pooled=True)


def _fusable_pair(transition: FusedTransition, block: nn.Module) -> bool:
    """Whether a transition and the block after it run as one node (neither, nor a dense layer, hooked)."""
    return (isinstance(block, FusedDenseBlock) and not _hooked(transition) and not _hooked(block)
            and not any(_hooked(layer) for layer in block.values()))


def _is_head_norm(m) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not _hooked(m)
