"""Constructor options: validation and resolution, so a bad value fails in ``Trainer(...)`` with its name."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any, TypeVar

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "AUTO",
    "NAN_POLICIES",
    "accepts_training",
    "check_flags",
    "choice",
    "computes_in_float16",
    "make_optimizer",
    "non_negative_int",
    "optional",
    "positive_int",
    "resolve_steps_per_execution",
]

T = TypeVar("T")
AUTO = "auto"  # steps_per_execution tuned at run time (trainer/blocks.py)
NAN_POLICIES = ("raise", "skip")


def positive_int(name: str, value: object, *, error: type[Exception] = ValueError) -> int:
    """``value`` as an int, or ``error`` naming ``name`` and quoting the value (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise error(f"`{name}` must be a positive int, got {value!r}.")
    return int(value)


def non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative int, got {value!r}.")
    return int(value)


def optional(check: Callable[[str, object], T], name: str, value: object) -> T | None:
    """``check(name, value)``, or None when ``value`` is None."""
    return None if value is None else check(name, value)


def choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}.")
    return value


def check_flags(**flags: object) -> None:
    """Booleans are booleans; ``jit_compile`` and ``run_eagerly`` exclude each other."""
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"`{flag}` must be True or False, got {value!r}.")
    if flags.get("jit_compile") and flags.get("run_eagerly"):
        raise ValueError("`jit_compile=True` and `run_eagerly=True` exclude each other; choose one.")


def resolve_steps_per_execution(value: object) -> int | str:
    if value == AUTO:
        return AUTO
    try:
        return positive_int("steps_per_execution", value)
    except ValueError:
        raise ValueError(f"`steps_per_execution` must be a positive int or 'auto', got {value!r}.") from None


def check_created_in(strategy: tf.distribute.Strategy, model: Any) -> None:
    """The model's variables (those it has yet) must come from ``strategy``'s scope: TensorFlow cannot mix them."""
    outside = [
        getattr(v, "path", v.name)
        for v in getattr(model, "variables", [])
        if not strategy.extended.variable_created_in_scope(v.value if isinstance(v, keras.Variable) else v)
    ]
    if outside:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
        raise ValueError(
            f"The model's variables ({shown}) were not created in the scope of the Trainer's strategy "
            f"({type(strategy).__name__}): build the model inside `with strategy.scope():` and pass the same "
            "strategy= (or none, inside that scope)."
        )


def computes_in_float16(model: Any) -> bool:
    """The model computes in float16: a Keras model's own ``dtype_policy`` (fixed when it was built, as
    ``Model.compile`` reads it) is ``mixed_float16``; any other model: the global policy is."""
    policy = getattr(model, "dtype_policy", None) if isinstance(model, keras.layers.Layer) else None
    name = getattr(policy, "name", None) or keras.mixed_precision.global_policy().name
    return name == "mixed_float16"


def make_optimizer(optimizer: object, *, float16: bool = False) -> keras.optimizers.Optimizer:
    """The optimizer object; for a model that computes in float16 (``float16``) wrapped in a ``LossScaleOptimizer``
    (dynamic loss scaling), as ``Model.compile`` does."""
    if isinstance(optimizer, str):
        try:
            optimizer = keras.optimizers.get(optimizer)
        except ValueError:
            known = sorted(n.lower() for n in dir(keras.optimizers) if n[:1].isupper() and n != "Optimizer")
            raise ValueError(f"Unknown optimizer {optimizer!r}; known names: {', '.join(known)}.") from None
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"`optimizer` must be a name or a keras.optimizers.Optimizer, got {type(optimizer).__name__}.")
    made_in = getattr(optimizer, "_distribution_strategy", None)  # Keras' TF optimizers keep their creation's strategy
    if made_in is not None and made_in is not tf.distribute.get_strategy():
        name = type(optimizer).__name__
        raise ValueError(
            f"The optimizer {name} was created outside the strategy's scope, and TensorFlow ties an optimizer to the "
            f"strategy current when it is made: create it inside `with strategy.scope():`, or pass its name "
            f"(optimizer={name.lower()!r})."
        )
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    if float16 and not scaled:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def accepts_training(model: Any) -> bool:
    if isinstance(model, keras.layers.Layer):
        return True
    try:
        params = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "training" or p.kind is p.VAR_KEYWORD for p in params)


def check_same_variables(built: list[tf.Variable], now: list[tf.Variable]) -> None:
    """A Trainer trains the variables it was built with: a layer frozen or unfrozen since then is an error (Model.fit
    silently keeps training the old set until ``compile()`` is called again)."""
    if [id(v) for v in built] == [id(v) for v in now]:
        return
    was, became = {id(v) for v in built}, {id(v) for v in now}
    added = [v.path for v in now if id(v) not in was]
    removed = [v.path for v in built if id(v) not in became]
    raise ValueError(
        "The model's trainable variables changed since this Trainer was built"
        + (f"; now trainable: {added}" if added else "")
        + (f"; no longer trainable: {removed}" if removed else "")
        + ". A Trainer trains the variables it was built with (as Model.fit does until compile() is called again):"
        " make a new Trainer for the new set, e.g. to fine-tune after unfreezing a base model."
    )


def checkpoint_period(checkpoint_dir: object, checkpoint_every: object) -> int | None:
    """``fit``'s ``checkpoint_every``: a positive int, and only with a ``checkpoint_dir``."""
    if checkpoint_every is None:
        return None
    if checkpoint_dir is None:
        raise ValueError("`checkpoint_every` needs `checkpoint_dir`: where should the checkpoints go?")
    return positive_int("checkpoint_every", checkpoint_every)


def learning_rate_setting(optimizer: keras.optimizers.Optimizer) -> Any:
    """The learning rate an optimizer was given, as its config holds it (a schedule's config for a schedule), for a
    resume to compare with the checkpoint's: a number to 7 significant digits (no float32 noise)."""
    try:
        value = optimizer.get_config().get("learning_rate")
    except Exception:  # an optimizer without a Keras config: nothing to compare
        return None
    if isinstance(value, (int, float)):
        return float(f"{value:.7g}")
    try:  # a schedule's config goes into the checkpoint's JSON
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value
