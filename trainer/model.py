"""The blog's ResNet-style CNN for 28x28 single-channel images, built by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution with stride 2 (halves the image), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class ResBlock(nn.Module):
    """Two 3x3 convolutions at constant width with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


def blog_resnet(num_classes: int = 10) -> nn.Sequential:
    """28x28 -> 14 -> 7 -> 4 -> 2 -> 1: the last stride-2 block emits the logits."""
    return nn.Sequential(
        conv_bn_relu(1, 8),
        ResBlock(8),
        conv_bn_relu(8, 16),
        ResBlock(16),
        conv_bn_relu(16, 32),
        ResBlock(32),
        conv_bn_relu(32, 16),
        conv_bn_relu(16, num_classes),
        nn.Flatten(),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {"blog_resnet": blog_resnet}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Builds a registered architecture by name."""
    return MODELS[name](num_classes=num_classes)
