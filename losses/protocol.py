"""The loss protocol: what a loss callable receives and returns, and the one place its return is normalised.

A loss is any callable ``loss(outputs, targets)`` where ``outputs`` maps every model output name to a tensor and
``targets`` maps every target name of the batch to a tensor. It returns the batch mean as a scalar, or a dict of
named scalar components. :func:`components` turns either form into a flat ``{key: float32 scalar}`` dict with the
key-naming rules of the design card, and rejects anything else with a message naming the loss.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping

import tensorflow as tf

LossValue = tf.Tensor | Mapping[str, tf.Tensor]
LossFn = Callable[[Mapping[str, tf.Tensor], Mapping[str, tf.Tensor]], LossValue]

__all__ = ["LossFn", "LossProtocolError", "LossValue", "components", "describe"]


class LossProtocolError(TypeError):
    """A loss returned something the loss protocol does not allow (None, a non-scalar, an int, a nested dict...)."""


def describe(kind: str, name: str | None) -> str:
    """How messages name a loss or metric: ``the loss`` (unnamed) or ``loss 'det'``."""
    return f"the {kind}" if name is None else f"{kind} {name!r}"


def _scalar(where: str, part: str | None, value: object) -> tf.Tensor:
    where = where + ("" if part is None else f" (component {part!r})")
    if value is None:
        raise LossProtocolError(f"{where} returned None; return a scalar tensor (the batch mean) or a dict of them.")
    if isinstance(value, Mapping):
        raise LossProtocolError(f"{where} returned a nested dict; components must be scalars, one level deep.")
    if isinstance(value, bool):
        raise LossProtocolError(f"{where} returned a bool; return a float scalar.")
    try:
        tensor = tf.convert_to_tensor(value)
    except (TypeError, ValueError) as err:
        raise LossProtocolError(f"{where} returned {type(value).__name__}, not a tensor: {err}") from None
    if not tensor.dtype.is_floating:
        raise LossProtocolError(
            f"{where} returned a {tensor.dtype.name} tensor; losses must be floating point "
            "(an integer loss has no gradient)."
        )
    if tensor.shape.rank != 0:
        raise LossProtocolError(
            f"{where} returned shape {tensor.shape}; a loss returns a scalar, the mean over the batch "
            "(reduce it with tf.reduce_mean)."
        )
    return tf.cast(tensor, tf.float32)


def components(name: str | None, value: object, *, kind: str = "loss") -> dict[str, tf.Tensor]:
    """Normalise what loss ``name`` returned into ``{component key: float32 scalar}``.

    Key rules (DESIGN.md, "Names of what is logged"): a single unnamed loss (``name=None``) returning a scalar gives
    ``{"loss": v}``; returning a dict gives its keys as they are. A named loss ``"det"`` returning a scalar gives
    ``{"det": v}``; returning ``{"loc": a}`` gives ``{"det/loc": a}``.

    ``kind`` only changes the wording of errors (metric callables follow the same protocol).

    Raises:
        LossProtocolError: the value is None, not floating, not scalar, a nested or empty dict, or has non-str keys.
    """
    where = describe(kind, name)
    if isinstance(value, Mapping):
        if not value:
            raise LossProtocolError(f"{where} returned an empty dict; return at least one component.")
        bad = [k for k in value if not isinstance(k, str) or not k]
        if bad:
            raise LossProtocolError(
                f"{where} returned component keys {bad!r}; component keys must be non-empty strings."
            )
        prefix = "" if name is None else f"{name}/"
        return {prefix + key: _scalar(where, key, part) for key, part in value.items()}
    return {"loss" if name is None else name: _scalar(where, None, value)}


def check_number(what: str, value: object, *, at_least: float | None = None, above: float | None = None,
                 at_most: float | None = None, integer: bool = False) -> float:  # fmt: skip
    """A constructor argument checked: ``value`` as a float (an int with ``integer``), or a TypeError/ValueError
    that names ``what``, the value and the allowed range."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise TypeError(f"{what} must be {'an int' if integer else 'a finite number'}, got {value!r}.")
    if at_least is not None and value < at_least:
        raise ValueError(f"{what} must be >= {at_least}, got {value!r}.")
    if above is not None and value <= above:
        raise ValueError(f"{what} must be > {above}, got {value!r}.")
    if at_most is not None and value > at_most:
        raise ValueError(f"{what} must be <= {at_most}, got {value!r}.")
    return int(value) if integer else float(value)
