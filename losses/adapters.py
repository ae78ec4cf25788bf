"""Keras per-output losses as loss-protocol callables.

``per_output("mse", output="regression_output")`` reads one output and the target of the same name and applies a
Keras loss to the pair, exactly as ``keras.Model.compile(loss={...})`` would (same resolution of ``"crossentropy"``,
same rank alignment, same ``sum_over_batch_size`` reduction). The Trainer's Keras-style dict entries go through here,
so there is one code path for them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from losses.distributed import plain_keras_losses, replica_share

__all__ = [
    "SAMPLE_WEIGHT",
    "PerOutputLoss",
    "ShapeMismatchError",
    "binary_or_sparse",
    "display_name",
    "per_output",
    "sample_weight_key",
    "sample_weight_of",
]


class ShapeMismatchError(ValueError):
    """An output and its target have shapes that a per-output loss cannot compare."""


def _align_ranks(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Keras' rank alignment (``squeeze_or_expand_to_same_rank``): when one side has a trailing axis of size 1 that
    the other lacks, a rank-1 other side gains it (labels ``(B,)`` against outputs ``(B, 1)`` stay one value per
    example, so sample weights weigh examples), otherwise the axis is dropped."""
    t_rank, p_rank = y_true.shape.rank, y_pred.shape.rank
    if t_rank == p_rank + 1 and y_true.shape[-1] == 1:
        if p_rank == 1:
            y_pred = tf.expand_dims(y_pred, -1)
        else:
            y_true = tf.squeeze(y_true, -1)
    elif p_rank == t_rank + 1 and y_pred.shape[-1] == 1:
        if t_rank == 1:
            y_true = tf.expand_dims(y_true, -1)
        else:
            y_pred = tf.squeeze(y_pred, -1)
    return y_true, y_pred


SAMPLE_WEIGHT = "sample_weight"


def sample_weight_key(output: str | None = None) -> str:
    """The target that carries sample weights: ``sample_weight`` (every output), ``sample_weight/<output>`` (one)."""
    return SAMPLE_WEIGHT if output is None else f"{SAMPLE_WEIGHT}/{output}"


def sample_weight_of(targets: Mapping[str, tf.Tensor], output: str) -> tf.Tensor | None:
    """The weights an output's Keras-style loss or weighted metric uses: ``sample_weight/<output>`` if the batch has
    it, else ``sample_weight``, else None (unweighted)."""
    for key in (sample_weight_key(output), SAMPLE_WEIGHT):
        if key in targets:
            return targets[key]
    return None


class FunctionLoss(keras.losses.Loss):
    """A function ``fn(y_true, y_pred) -> per-example values`` as a Keras ``Loss`` (mean over the batch)."""

    def __init__(self, fn: Callable, name: str | None = None) -> None:
        super().__init__(name=name or getattr(fn, "__name__", None))
        self.fn = fn

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return self.fn(*_align_ranks(y_true, y_pred))


def _keras_loss_names() -> list[str]:
    names = {n for n in dir(keras.losses) if not n.startswith("_") and n.islower()}
    names -= {"get", "serialize", "deserialize"}
    return sorted(names | {"mse", "mae", "mape", "msle", "crossentropy", "ce"})  # with the aliases accepted here


def binary_or_sparse(y_true: tf.Tensor, y_pred: tf.Tensor) -> tuple[bool, bool]:
    """Keras' rule for ``"crossentropy"`` and ``"accuracy"`` (keras/src/trainers/compile_utils.py): binary when the
    output has one unit, sparse when the target has lower rank or a trailing 1 against several units."""
    t_rank, p_rank = y_true.shape.rank, y_pred.shape.rank
    is_binary = y_pred.shape[-1] == 1
    is_sparse = t_rank < p_rank or (y_true.shape[-1] == 1 and y_pred.shape[-1] not in (None, 1))
    return is_binary, is_sparse


def display_name(identifier: object) -> str:
    """The name a Keras loss or metric identifier is logged under: the string, or the object's name."""
    if isinstance(identifier, str):
        return identifier
    return getattr(identifier, "name", None) or getattr(identifier, "__name__", type(identifier).__name__)


class PerOutputLoss:
    """A Keras loss applied to one output and one target; a loss-protocol callable returning a scalar.

    Args:
        loss: a Keras loss name (``"mse"``, ``"categorical_crossentropy"``, ``"crossentropy"``), a
            ``keras.losses.Loss`` object, or a function ``fn(y_true, y_pred)`` returning per-example values.
        output: the output it reads.
        target: the target it reads; defaults to ``output``.
        sample_weight: name of a target holding per-example weights. None (the default): the target
            ``sample_weight/<output>`` if the batch has one, else ``sample_weight`` if it has one (what
            ``Trainer.fit(sample_weight=...)`` and ``class_weight`` put there), else unweighted — as Keras applies
            ``fit``'s sample weights to its compiled losses.
    """

    def __init__(
        self,
        loss: str | keras.losses.Loss | Callable,
        *,
        output: str,
        target: str | None = None,
        sample_weight: str | None = None,
    ) -> None:
        if not isinstance(output, str) or not output:
            raise ValueError(f"per_output: `output` must be an output name (a non-empty str), got {output!r}.")
        self.output = output
        self.target = output if target is None else target
        self.sample_weight = sample_weight
        self.identifier = loss
        self.name = display_name(loss)
        self._loss: keras.losses.Loss | None = None
        if isinstance(loss, str):
            if loss.lower() not in ("crossentropy", "ce"):
                self._loss = self._from_name(loss)
        elif isinstance(loss, keras.losses.Loss):
            if loss.reduction in (None, "none"):
                raise ValueError(
                    f"The loss for output {output!r}, {type(loss).__name__}(reduction={loss.reduction!r}), returns one "
                    "value per example. Model.fit would log their mean but differentiate their sum (it trains as "
                    "reduction='sum'); tapeloop trains what it logs: give reduction='sum_over_batch_size' (the mean, "
                    "Keras' default) or 'sum'."
                )
            self._loss = loss
        elif callable(loss):
            self._loss = FunctionLoss(loss, name=self.name)
        else:
            raise TypeError(
                f"per_output: loss for output {output!r} must be a Keras loss name, a keras.losses.Loss or a "
                f"function (y_true, y_pred); got {type(loss).__name__}."
            )

    def _from_name(self, name: str) -> keras.losses.Loss:
        try:
            resolved = keras.losses.get(name)
        except ValueError:
            known = _keras_loss_names()
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"Unknown Keras loss {name!r} for output {self.output!r}.{hint} Known names: {', '.join(known)}."
            ) from None
        if isinstance(resolved, keras.losses.Loss):
            return resolved
        return FunctionLoss(resolved, name=name)

    def _resolve(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> keras.losses.Loss:
        if self._loss is None:  # "crossentropy": chosen from the shapes, as Keras does
            is_binary, is_sparse = binary_or_sparse(y_true, y_pred)
            if is_binary:
                self._loss = keras.losses.BinaryCrossentropy(name=self.name)
            elif is_sparse:
                self._loss = keras.losses.SparseCategoricalCrossentropy(name=self.name)
            else:
                self._loss = keras.losses.CategoricalCrossentropy(name=self.name)
        return self._loss

    def _is_sparse(self, loss: keras.losses.Loss) -> bool:
        fn = getattr(loss, "fn", None)
        names = (type(loss).__name__, getattr(loss, "name", ""), getattr(fn, "__name__", ""))
        return any("sparse" in n.lower() for n in names)

    def _check_shapes(self, loss: keras.losses.Loss, y_true: tf.Tensor, y_pred: tf.Tensor) -> None:
        t, p = y_true.shape, y_pred.shape
        if t.rank is None or p.rank is None:
            return
        if self._is_sparse(loss):
            expected = [p[:-1], p[:-1].concatenate([1])]
            ok = any(t.rank == e.rank and t[1:].is_compatible_with(e[1:]) for e in expected)
            rule = f"a sparse loss wants integer labels of shape {p[:-1]} (or with a trailing 1)"
        else:
            if t.rank == p.rank + 1 and t[-1] == 1:  # Keras squeezes a trailing 1 to align ranks
                t = t[:-1]
            elif p.rank == t.rank + 1 and p[-1] == 1:
                p = p[:-1]
            ok = t.rank == p.rank and t[1:].is_compatible_with(p[1:])
            rule = f"{self.name!r} compares them element by element"
        if not ok:
            raise ShapeMismatchError(
                f"Output {self.output!r} has shape {tuple(y_pred.shape)} but its target {self.target!r} has shape "
                f"{tuple(y_true.shape)}: {rule}."
            )

    def __call__(self, outputs: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor]) -> tf.Tensor:
        y_pred = tf.convert_to_tensor(outputs[self.output])
        y_true = tf.convert_to_tensor(targets[self.target])
        loss = self._resolve(y_true, y_pred)
        self._check_shapes(loss, y_true, y_pred)
        weight = self._sample_weight(targets)
        with plain_keras_losses():  # the plain mean of this replica's share: the step scales it by b/B once
            value = loss(y_true, y_pred, sample_weight=weight)
        reduction = getattr(loss, "reduction", None)
        if reduction == "sum":
            # A sum over this replica's examples; the step scales each replica's value by b/B and adds them, so
            # b/B is undone here: the global batch's sum, as Model.fit under a strategy (and on one device).
            share = tf.cast(replica_share(tf.shape(y_pred)[0]), value.dtype)
            return tf.math.divide_no_nan(value, share)
        return value

    def _sample_weight(self, targets: Mapping[str, tf.Tensor]) -> tf.Tensor | None:
        if self.sample_weight is not None:
            return targets[self.sample_weight]
        return sample_weight_of(targets, self.output)

    def __repr__(self) -> str:
        return f"per_output({self.name!r}, output={self.output!r}, target={self.target!r})"


def per_output(
    loss: str | keras.losses.Loss | Callable,
    *,
    output: str,
    target: str | None = None,
    sample_weight: str | None = None,
) -> PerOutputLoss:
    """Turn a Keras loss into a loss-protocol callable on one output/target pair (see :class:`PerOutputLoss`)."""
    return PerOutputLoss(loss, output=output, target=target, sample_weight=sample_weight)
