"""FusedFeatures: a DenseNet's ``features`` container (torchvision's names: ``conv0, norm0, relu0,
pool0, denseblock1, transition1, ..., norm5``) that threads each dense block's batch statistics
into the fused transition or head that reads its output (DESIGN section 9: no statistics pass
over a block's output).

``forward(x)`` is torchvision's ``features(x)`` (it ends with norm5's output); ``forward_pooled(x)``
is ``flatten(adaptive_avg_pool2d(relu(features(x)), 1), 1)`` with norm5, ReLU and the pool fused
(what the package's ``DenseNet.forward`` uses).  Modules with hooks are called as modules (their
hooks fire; a hooked block's statistics are then recomputed by its reader).  Under torch.fx symbolic
tracing the container runs its modules one by one.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .head import fused_head
from .modules import FusedDenseBlock
from .transition import FusedTransition

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
STEM = ("conv0", "norm0", "relu0", "pool0")


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, attr) for attr in _HOOKS)


def _block_with_stats(block: FusedDenseBlock, x: Tensor) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """The block's output and its batch statistics (None in eval, or when the block or a dense layer has
    hooks: then it is called as a module so that they fire)."""
    if _hooked(block) or any(_hooked(layer) for layer in block.values()):
        return block(x), None
    out, mean, var = block.forward_with_stats(x)
    return out, (None if mean is None else (mean, var))


class FusedFeatures(nn.Sequential):
    """``nn.Sequential`` of a DenseNet's feature modules, with block statistics threaded into the
    following fused transition / head."""

    def _stem(self, x: Tensor) -> Tuple[Tensor, int]:
        """Runs the stem modules at the start (conv0[, norm0, relu0, pool0]); returns (output, how
        many modules it ran)."""
        mods = self._modules
        names = list(mods)
        k = 0
        while k < len(names) and k < len(STEM) and names[k] == STEM[k]:
            k += 1
        # STEM (issue 13): when densenet_fused.stem lands, a full stem (conv0, norm0, relu0, pool0 without hooks)
        # runs as `fused_stem(x, mods["conv0"], mods["norm0"], mods["pool0"])` here instead of module by module.
        for name in names[:k]:
            x = mods[name](x)
        return x, k

    def _run(self, x: Tensor, pooled: bool) -> Tensor:
        x, start = self._stem(x)
        mods = list(self._modules.values())[start:]
        stats = None
        for i, m in enumerate(mods):
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            last = nxt is None
            reader = isinstance(nxt, FusedTransition) or (pooled and i + 2 == len(mods) and _is_head_norm(nxt))
            if isinstance(m, FusedDenseBlock) and reader:
                x, stats = _block_with_stats(m, x)
                continue
            if isinstance(m, FusedTransition):
                x = m(x, stats=stats)
            elif pooled and last and _is_head_norm(m):
                return fused_head(m, x, stats)
            else:
                x = m(x)
            stats = None
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


def _is_head_norm(m) -> bool:
    return isinstance(m, nn.BatchNorm2d) and not _hooked(m)
