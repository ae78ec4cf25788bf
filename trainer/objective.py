"""The objective: named losses, their components, the loss-weight variables and the weighted total.

Everything a loss returns passes through :func:`losses.components` (the one normalisation point), so the component
keys here are exactly the logged keys of DESIGN.md. Weights are ``tf.Variable``s created when the component keys are
first seen, so changing one between steps never retraces the step.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from losses import LossProtocolError, components, per_output
from losses.adapters import PerOutputLoss
from losses.protocol import describe
from trainer.errors import names
from trainer.structure import call_reader

__all__ = ["REGULARIZATION", "TOTAL", "Objective"]

TOTAL = "loss"
REGULARIZATION = "regularization"


def _is_keras_loss(value: object) -> bool:
    return isinstance(value, (str, keras.losses.Loss))


def _is_keras_function(fn: object) -> bool:
    """A Keras loss function such as ``keras.losses.mean_squared_error``: per-output, (y_true, y_pred)."""
    module = getattr(fn, "__module__", None) or ""  # None for functions made by exec (notebooks, some REPLs)
    return callable(fn) and not isinstance(fn, type) and module.split(".")[0] == "keras"


def _instance(loss: object) -> object:
    """A Keras Loss class is one of its kind, as Keras' compile makes it (``loss=keras.losses.Huber``)."""
    return loss() if isinstance(loss, type) and issubclass(loss, keras.losses.Loss) else loss


class Objective:
    """Named losses → components → weighted total.

    Args:
        loss: one loss callable, or a dict ``{name: loss}``; None: the model's own losses alone (``add_loss``). In
            the dict a ``str`` or ``keras.losses.Loss`` value is a Keras per-output loss on the output (and target)
            named by its key. At the top level, a Keras loss applies to the single output, or to each of several (a
            component per output, as ``compile``).
        loss_weights: ``{key: float}`` where key is a loss name (scales all its components) or a full component key.
    """

    def __init__(self, loss: object, loss_weights: Mapping[str, float] | None = None) -> None:
        if isinstance(loss, Mapping):
            loss = {name: _instance(fn) for name, fn in loss.items()}
        loss = _instance(loss)
        self._entries: dict[str | None, Callable] = {}
        self._top_level_keras: object = None
        self._outputs: list[str] = []  # the model's output names, in its order (bind_outputs)
        without_loss = {name for name, fn in loss.items() if fn is None} if isinstance(loss, Mapping) else set()
        if without_loss:  # Keras' None for an output without a loss: no loss, and its weight weighs nothing
            loss = {name: fn for name, fn in loss.items() if fn is not None} or None
            if isinstance(loss_weights, Mapping):
                loss_weights = {k: w for k, w in loss_weights.items() if k not in without_loss}
        if loss is None:
            pass  # the model's own losses alone (Keras' compile without a loss): checked on the first batch
        elif isinstance(loss, Mapping):
            if not loss:
                raise ValueError("`loss` is an empty dict; give at least one {name: loss}.")
            for name, fn in loss.items():
                if not isinstance(name, str) or not name or "/" in name:
                    raise ValueError(f"Loss names must be non-empty str without '/'; got {name!r}.")
                if name in (TOTAL, REGULARIZATION):
                    raise ValueError(f"{name!r} is a reserved key (the weighted total / model.losses); rename it.")
                if _is_keras_loss(fn) or _is_keras_function(fn):
                    self._entries[name] = per_output(fn, output=name)
                elif callable(fn):
                    self._entries[name] = fn
                else:
                    raise TypeError(
                        f"loss[{name!r}] is a {type(fn).__name__}; expected a callable loss(outputs, targets), a "
                        "Keras loss name or a keras.losses.Loss."
                    )
        elif _is_keras_loss(loss) or _is_keras_function(loss):
            per_output(loss, output="output")  # an unknown loss name fails here, in the constructor
            self._top_level_keras = loss  # bound to the single output in bind_outputs()
        elif callable(loss):
            self._entries[None] = loss
        else:
            raise TypeError(f"`loss` is a {type(loss).__name__}; expected a callable or a dict {{name: loss}}.")
        if isinstance(loss_weights, numbers.Real) and not isinstance(loss_weights, bool):
            loss_weights = {self._only_key(): loss_weights}  # Keras' loss_weights=[w] for a one-output model
        weights = dict(loss_weights or {})
        for key, value in weights.items():
            if not isinstance(key, str):
                raise TypeError(f"loss_weights keys must be str (a loss name or component key); got {key!r}.")
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"loss_weights[{key!r}] must be a number, got {value!r}.")
        self._initial_weights = {k: float(v) for k, v in weights.items()}
        self.weights: dict[str, tf.Variable] = {}
        self.keys: list[str] = []
        self._name_of: dict[str, str | None] = {}

    @property
    def initial_weights(self) -> dict[str, float]:
        """``loss_weights`` as given (before schedules, weightings or a restore change the variables)."""
        return dict(self._initial_weights)

    def _only_key(self) -> str:
        """The key a single loss weight applies to: the one loss's name, or the total for an unnamed loss."""
        if len(self._entries) > 1:
            raise ValueError(
                f"`loss_weights` is one number but there are {len(self._entries)} losses ({names(self.names)}); "
                "give a dict {loss name: weight}."
            )
        return next((name for name in self._entries if name is not None), TOTAL)

    @property
    def names(self) -> list[str]:
        """The loss names (keys of the loss dict); empty for a single unnamed loss."""
        return [n for n in self._entries if n is not None]

    def entries(self) -> dict[str | None, Callable]:
        """The loss callables by loss name (None: a single unnamed loss)."""
        return dict(self._entries)

    def trainable_variables(self) -> list[tf.Variable]:
        """Variables owned by the losses themselves (a loss Layer's weights), trained with the model."""
        return self._owned("trainable_variables")

    def variables(self) -> list[tf.Variable]:
        """Every variable the losses own (trainable or not: random generator states, counters)."""
        return self._owned("variables")

    def _owned(self, attribute: str) -> list[tf.Variable]:
        found: dict[int, tf.Variable] = {}
        for fn in self._entries.values():
            for var in getattr(fn, attribute, None) or []:
                found.setdefault(id(var), var)
        return list(found.values())

    def keras_names(self) -> dict[str, str | None]:
        """Keras' log names of the components that are Keras per-output losses, in the model's output order:
        ``<output>_loss`` with several outputs (what ``Model.evaluate`` lists right after ``loss``), None with one
        (Keras logs only the total then)."""
        keras_style = {n for n, fn in self._entries.items() if isinstance(fn, PerOutputLoss) and fn.output == n}
        single = len(self._outputs) == 1
        return {name: None if single else f"{name}_loss" for name in self._outputs if name in keras_style}

    def bind_outputs(self, output_names: list[str]) -> None:
        """Bind a top-level Keras loss to the model's outputs: its single output, or each of several (as Keras
        applies ``compile(loss="mse")`` to every output: a component per output, keyed by its name)."""
        self._outputs = list(output_names)
        if self._top_level_keras is None or self._entries:
            return
        if len(output_names) == 1:
            self._entries[None] = per_output(self._top_level_keras, output=output_names[0])
            return
        reserved = sorted(set(output_names) & {TOTAL, REGULARIZATION})
        if reserved:
            raise ValueError(
                f"`loss={self._top_level_keras!r}` applies to every output, and outputs {names(reserved)} have a "
                "reserved key (the weighted total / model.losses): rename them."
            )
        for name in output_names:
            self._entries[name] = per_output(self._top_level_keras, output=name)

    def components(
        self,
        outputs: Mapping[str, tf.Tensor],
        targets: Mapping[str, tf.Tensor],
        regularization: tf.Tensor | None = None,
        output_hint=None,
    ) -> dict[str, tf.Tensor]:
        """Run every loss on the full output and target dicts; return the unweighted components by key."""
        found: dict[str, tf.Tensor] = {}
        for name, fn in self._entries.items():
            value = call_reader(fn, outputs, targets, reader=describe("loss", name), hint=output_hint)
            if name is None and isinstance(value, Mapping) and TOTAL in value:
                raise ValueError(
                    f"The loss returns a component named {TOTAL!r}, which is reserved for the weighted total; "
                    "rename it."
                )
            for key, part in components(name, value).items():
                if key in found:
                    raise ValueError(f"Two losses produce the component key {key!r}; rename one of them.")
                found[key] = part
                self._name_of.setdefault(key, name)
        if self.keys and set(found) != set(self.keys) - {REGULARIZATION}:
            raise LossProtocolError(
                f"The losses returned the components {names(found)}, but {names(self.keys)} on the first batch. "
                "Component keys must be the same at every step and on every replica (they are logged and reduced "
                "across replicas by key): return every key every time (0.0 for a part that does not apply)."
            )
        if regularization is None and not self._entries:
            raise ValueError(
                "no `loss` was given and the model has no losses of its own (add_loss): give `loss`, a callable "
                "loss(outputs, targets), a dict {name: loss} or a Keras loss."
            )
        if regularization is not None:
            if REGULARIZATION in found:
                raise ValueError(
                    f"A loss returns a component named {REGULARIZATION!r}, which is reserved for the model's own "
                    "losses (model.losses); rename it."
                )
            found[REGULARIZATION] = tf.cast(regularization, tf.float32)
            self._name_of.setdefault(REGULARIZATION, None)
        return found

    def build(self, keys: list[str]) -> None:
        """Create the weight variables once the component keys are known; validate ``loss_weights`` against them."""
        allowed = set(keys) | set(self.names)
        unknown = sorted(set(self._initial_weights) - allowed)
        if unknown:
            raise ValueError(
                f"loss_weights has keys {names(unknown)} that are neither a loss name nor a component key; "
                f"the loss names are {names(self.names)} and the component keys {names(keys)}."
            )
        self.keys = list(keys)
        for key in sorted(allowed):
            self.weights[key] = tf.Variable(
                self._initial_weights.get(key, 1.0), trainable=False, dtype=tf.float32, name=f"loss_weight/{key}"
            )

    def weight(self, key: str) -> tf.Tensor:
        """weight(key) = weight of the full key × weight of its loss name (DESIGN.md)."""
        name = self._name_of[key]
        factor = self.weights[key]
        if name is not None and name != key:
            factor = factor * self.weights[name]
        return factor

    def weight_vector(self) -> tf.Tensor:
        """Every component's effective weight, in ``keys`` order (read once per compiled block)."""
        return tf.stack([self.weight(key) for key in self.keys])

    def total(self, parts: Mapping[str, tf.Tensor], weights: tf.Tensor) -> tf.Tensor:
        """The weighted sum that is optimised; ``weights`` is the block's :meth:`weight_vector`."""
        return tf.reduce_sum(weights * tf.stack([parts[key] for key in self.keys]))

    def logged_keys(self) -> list[str]:
        """``loss`` first, then every component (a single unnamed scalar loss is the total itself)."""
        return [TOTAL] + [k for k in self.keys if k != TOTAL]
