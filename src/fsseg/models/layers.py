"""Small convolution blocks shared by the decoders (PFENet's FEM, CyCTR's decoder and its support-mask head).

Each returns an ``nn.Sequential`` whose children are numbered as in the references (conv at 0, ReLU at 1, ...),
so the state-dict keys of a module built from them are those of the same block written out inline.
"""

from __future__ import annotations

from torch import nn


def conv1x1_relu(cin: int, cout: int) -> nn.Sequential:
    """1x1 conv without bias + ReLU (PFENet's merges, CyCTR's query/support merges)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))


def conv3x3_relu(dim: int) -> nn.Sequential:
    """3x3 conv without bias (padding 1) + ReLU, channels kept."""
    return nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True))


def classifier(dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    """PFENet's classifier: 3x3 conv + ReLU + Dropout2d + 1x1 conv (with bias) to ``num_classes``."""
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1, bias=False),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
        nn.Conv2d(dim, num_classes, 1),
    )


__all__ = ["classifier", "conv1x1_relu", "conv3x3_relu"]
