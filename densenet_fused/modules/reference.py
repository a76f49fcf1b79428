"""Plain-PyTorch reference dense block (the concatenating version of torchvision's
``_DenseBlock``, memory O(L^2)): the baseline of tests, the demo and the benchmarks.
Same children and state_dict keys as FusedDenseBlock, so weights move between them."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dense import FusedDenseLayer


class ReferenceDenseLayer(FusedDenseLayer):
    """The same modules as FusedDenseLayer, run as separate torch ops on a concatenation."""

    def forward(self, features) -> Tensor:
        x = torch.cat(features, 1)
        out = self.conv1(self.relu1(self.norm1(x)))
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class ReferenceDenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module("denselayer%d" % (i + 1),
                            ReferenceDenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate))

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)
