"""Small models for tests that need a real network but not the blog's: `--model helpers.models:small_cnn`."""

from __future__ import annotations

from torch import nn


def small_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """A convolution, batch norm, pooling and a linear layer: every kind of module the blog's network
    has, in a graph that torch.compile builds in a few seconds."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 16, num_classes),
    )


class _WithUnused(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.net = small_cnn(num_classes, in_channels)
        self.unused = nn.Linear(2, 2)  # never called: DDP waits for its gradient unless told otherwise

    def forward(self, x):
        return self.net(x)


def with_unused_parameter(num_classes: int, in_channels: int) -> nn.Module:
    """small_cnn beside a layer that forward never calls (DDP then needs find_unused_parameters)."""
    return _WithUnused(num_classes, in_channels)


class _DataDependent(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.net = small_cnn(num_classes, in_channels)

    def forward(self, x):
        if x.sum() > 0:  # control flow on the data: no exporter can write one graph for it
            return self.net(x)
        return -self.net(x)


def data_dependent(num_classes: int, in_channels: int) -> nn.Module:
    """small_cnn behind a branch on the input's values, which torch.export and ONNX cannot express."""
    return _DataDependent(num_classes, in_channels)
