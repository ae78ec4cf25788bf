"""Constructor options: validation and resolution, so a bad value fails in ``Trainer(...)`` with its name."""

from __future__ import annotations

import inspect
from typing import Any

import keras
import numpy as np

__all__ = ["NAN_POLICIES", "accepts_training", "make_optimizer", "positive_int"]

NAN_POLICIES = ("raise", "skip")


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return int(value)


def make_optimizer(optimizer: object) -> keras.optimizers.Optimizer:
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        try:
            return keras.optimizers.get(optimizer)
        except ValueError:
            known = sorted(n.lower() for n in dir(keras.optimizers) if n[:1].isupper() and n != "Optimizer")
            raise ValueError(f"Unknown optimizer {optimizer!r}; known names: {', '.join(known)}.") from None
    raise TypeError(f"`optimizer` must be a name or a keras.optimizers.Optimizer, got {type(optimizer).__name__}.")


def accepts_training(model: Any) -> bool:
    if isinstance(model, keras.layers.Layer):
        return True
    try:
        params = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "training" or p.kind is p.VAR_KEYWORD for p in params)
