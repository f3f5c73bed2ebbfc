"""The networks: the blog's ResNet-style CNN (built by name), or a user's factory (`module:function`)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from trainer.config import FACTORY_PATTERN
from trainer.errors import ConfigError, first_line


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


def blog_resnet(num_classes: int = 10, in_channels: int = 1, image_size: tuple[int, int] = (28, 28)) -> nn.Sequential:
    """28x28 -> 14 -> 7 -> 4 -> 2 -> 1: the last stride-2 block emits the logits.

    Other channel counts change the first convolution only. Images that five halvings do not bring
    to 1x1 (larger than 32 pixels a side) end in a global average pool; for MNIST's 28x28 the
    network is exactly the blog's."""
    layers = [
        conv_bn_relu(in_channels, 8),
        ResBlock(8),
        conv_bn_relu(8, 16),
        ResBlock(16),
        conv_bn_relu(16, 32),
        ResBlock(32),
        conv_bn_relu(32, 16),
        conv_bn_relu(16, num_classes),
    ]
    height, width = image_size
    for _ in range(5):
        height, width = (height + 1) // 2, (width + 1) // 2
    if (height, width) != (1, 1):
        layers.append(nn.AdaptiveAvgPool2d(1))
    return nn.Sequential(*layers, nn.Flatten())


MODELS: dict[str, Callable[..., nn.Module]] = {"blog_resnet": blog_resnet}


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """`package.module:attribute` -> the callable. Only ever called with a spec the user typed."""
    if not FACTORY_PATTERN.fullmatch(spec):
        raise ConfigError(f"--model must be {' or '.join(MODELS)} or package.module:factory, got {spec!r}")
    module_name, attribute = spec.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does; the `trainer` console script does not
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as exc:  # noqa: BLE001 (ImportError, or whatever the module raises as it is imported)
        raise ConfigError(f"--model {spec}: cannot import it ({type(exc).__name__}: {first_line(exc)})") from None
    if not callable(target):
        raise ConfigError(f"--model {spec}: {attribute} is not callable")
    return target


def build_model(name: str, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> nn.Module:
    """A built-in architecture by name, or `factory(num_classes=..., in_channels=...)` of a
    `module:factory` spec, for inputs of `input_shape` ([C, H, W]; other shapes: C is the first)."""
    in_channels = input_shape[0] if input_shape else 1
    if name in MODELS:
        image = tuple(input_shape[1:]) if len(input_shape) == 3 else (28, 28)
        return MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image)
    factory = import_factory(name)
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels)
    except TypeError as exc:
        raise ConfigError(f"--model {name}: must accept num_classes= and in_channels= ({first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 (the user's factory failed: one line that says where)
        raise ConfigError(f"--model {name} raised {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def logits_of(output: Any) -> Any:
    """The logits in what a model returns: a tensor; a dict's or an object's `logits` (transformers'
    ModelOutput is both); else a tuple's or list's first item. Anything else is returned as it is
    (and found not to be logits [B, C] by whoever checks)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, tuple | list) and output:
        return output[0]
    return output


def output_classes(model: nn.Module, one_input: Tensor) -> int:
    """How many classes `model` tells apart: its output width for a batch of one input (run in eval
    mode, so BatchNorm's statistics stay as they are). A model that cannot take the input, or does
    not return logits [1, C], is a ConfigError."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = logits_of(model(one_input))
    except Exception as exc:  # noqa: BLE001 (the user's model and data do not fit: say so in one line)
        shape = tuple(one_input.shape[1:])
        raise ConfigError(f"the model cannot take one input of shape {shape}: {first_line(exc)}") from None
    finally:
        model.train(was_training)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigError(
            f"the model must return logits [batch, classes] (or a tuple, dict or output object holding them as its "
            f"first item or `logits`); for a batch of 1 it returned {got}"
        )
    return logits.shape[1]
