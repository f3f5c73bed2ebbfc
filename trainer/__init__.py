"""trainer: the blog's MNIST ResNet recipe on Hugging Face Accelerate, exact and crash-safe."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["EvalResult", "Stopped", "TrainConfig", "Trainer", "__version__", "from_pretrained", "load_weights"]


def __getattr__(name: str) -> Any:
    # Lazy: `trainer --help` and the config need neither torch nor accelerate.
    if name == "TrainConfig":
        from trainer.config import TrainConfig

        return TrainConfig
    if name in ("Trainer", "Stopped", "EvalResult"):
        from trainer import engine

        return getattr(engine, name)
    if name == "load_weights":
        from trainer.evaluation import load_weights

        return load_weights
    if name == "from_pretrained":
        from trainer.export import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
