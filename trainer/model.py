"""Calling the user's model the way the loops need it.

``ModelCall`` keys whatever the model returns by output name (``trainer/structure.py``), gives losses float32
outputs under mixed precision, names the model in any error it raises while tapeloop checks the first batch or
traces the step, sums ``model.losses``, and lists the state an inspecting pass must leave as it was.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import keras
import tensorflow as tf

from trainer.errors import OWN_ERRORS, UserCodeError, describe_tensors
from trainer.options import accepts_training
from trainer.structure import as_output_dict, keyed, output_hint, preserved

__all__ = ["ModelCall", "check_own_training"]

HALF = (tf.float16, tf.bfloat16)


class ModelCall:
    """``model(inputs, training) -> {output name: tensor}``, with its losses and state.

    Args:
        model: a ``keras.Model``, ``tf.Module`` or callable ``inputs -> outputs``.
    """

    def __init__(self, model: Any) -> None:
        if not callable(model):
            raise TypeError(f"`model` must be callable (a keras.Model, tf.Module or function), got {model!r}.")
        self.model = model
        self.hint = output_hint(model)  # extra text for a missing output name
        self._training_arg = accepts_training(model)
        self._names: list[str] | None = None  # the output names, once known
        # A plain function has no variable lists: the trainable variables it reads, seen on its first eager call.
        self._read: list[tf.Variable] | None = [] if hasattr(model, "trainable_variables") else None

    def __call__(self, inputs: Any, training: bool) -> dict[str, tf.Tensor]:
        model = self.model
        discover = self._read is None and tf.executing_eagerly()
        if discover and tf.distribute.has_strategy():
            raise TypeError(
                "A plain function as the model cannot be distributed: under a tf.distribute strategy its variables "
                "are seen as per-device copies, not the distributed variables to train. Wrap it in a tf.Module (its "
                "variables as attributes, the function as __call__) or use a keras.Model."
            )
        try:
            with tf.GradientTape() if discover else contextlib.nullcontext() as tape:
                value = model(inputs, training=training) if self._training_arg else model(inputs)
        except OWN_ERRORS:
            raise
        except Exception as err:  # at the first batch, or while tracing: name it, list what the model was given
            raise UserCodeError("the model", err, describe_tensors("input", keyed(inputs))) from err
        if discover:
            self._read = list(tape.watched_variables())
        outputs = as_output_dict(value, getattr(model, "output_names", None))
        # Mixed precision: losses, metrics and trackers see float32 outputs (as if the last layers were float32).
        return {k: tf.cast(v, tf.float32) if v.dtype in HALF else v for k, v in outputs.items()}

    def regularization(self) -> tf.Tensor | None:
        """``sum(model.losses)`` in float32, or None when the model carries no losses."""
        losses = list(getattr(self.model, "losses", None) or ())
        return tf.add_n([tf.cast(loss, tf.float32) for loss in losses]) if losses else None

    @property
    def trainable_variables(self) -> list[tf.Variable]:
        """The model's ``trainable_variables``; for a plain function, the trainable variables its first call read."""
        variables = getattr(self.model, "trainable_variables", None)
        if variables is not None:
            return list(variables)
        if self._read is None:
            raise RuntimeError("A plain function's variables are known after its first call (fit or evaluate).")
        if not self._read:
            raise ValueError(
                f"The model {self.model!r} read no trainable variable on its first call, so there is nothing to "
                "train: create its tf.Variables outside the function and read them inside (or use a keras.Model)."
            )
        return list(self._read)

    @property
    def variables(self) -> list[tf.Variable]:
        """Every variable a checkpoint saves of the model (a plain function's: those its first call read)."""
        found = getattr(self.model, "variables", None)
        return list(found) if found is not None else list(self._read or [])

    def layer_metrics(self) -> dict[str, keras.metrics.Metric]:
        """Keras metrics owned by the model's layers, which update them in their own ``call`` (keras.io's endpoint
        layer), by name: logged as ``Model.fit`` logs them. A model's own metric attributes are left out: a custom
        ``train_step`` updates those, and the Trainer does not call it."""
        found: dict[str, keras.metrics.Metric] = {}
        if not isinstance(self.model, keras.Model):
            return found
        # Keras' rule (Trainer.metrics): every nested layer's metrics, but not a nested model's own (a compiled
        # base model's loss tracker and compile metrics belong to its own fit).
        for layer in self.model._flatten_layers(include_self=False):
            if isinstance(layer, keras.Model):
                continue
            for metric in layer.metrics:
                if found.get(metric.name, metric) is not metric:
                    raise ValueError(f"Two metrics in the model's layers are named {metric.name!r}; rename one.")
                found[metric.name] = metric
        return found

    def output_names(self, inputs: Any, strategy: tf.distribute.Strategy) -> list[str]:
        """The model's output names in the order Keras reads ``y=[...]`` in (``model.output_names``, sorted for a dict
        of outputs), from one eager forward pass that changes no state (cached)."""
        if self._names is None:
            with strategy.scope(), preserved(self.state()):
                names = list(self(inputs, training=False))
            keras_order = list(getattr(self.model, "output_names", None) or [])
            self._names = keras_order if sorted(keras_order) == sorted(names) else names
        return self._names

    def state(self) -> list[tf.Variable]:
        """What an inspecting forward pass could change: the non-trainable variables (random generator states,
        moving statistics, counters)."""
        found = getattr(self.model, "non_trainable_variables", None)
        if found is None:
            found = getattr(self.model, "variables", None) or []
        return list(found)


def check_own_training(model: Any, loss: Any) -> None:
    """What a Keras user may expect the Trainer to read from the model, said when it does not: ``compile()``'s loss
    (no ``loss`` given: an error naming it), and an override of ``train_step``/``compute_loss``/``test_step``
    (keras.io's custom-training examples), which tapeloop's step never calls: an error without a ``loss``, a
    warning with one (the override would be bypassed silently otherwise)."""
    if not isinstance(model, keras.Model):
        return
    if loss is None and getattr(model, "compiled", False) and getattr(model, "loss", None) is not None:
        raise ValueError(
            f"`loss` is required: the Trainer does not read model.compile()'s arguments; pass them to it, e.g. "
            f"Trainer(model, loss={model.loss!r}, ...) (compile's loss, loss_weights and metrics forms are taken)."
        )
    own = [name for name in ("train_step", "compute_loss", "test_step")
           if getattr(type(model), name, None) is not getattr(keras.Model, name)]  # fmt: skip
    if not own:
        return
    methods = " and ".join(f"{type(model).__name__}.{name}" for name in own)
    what = (
        f"{methods} will not be called: the Trainer runs its own step, which differentiates `loss` "
        "(a loss(outputs, targets) on the model's outputs; README: Coming from Keras)."
    )
    if loss is None:
        raise ValueError(f"`loss` is required. {what} Write what {own[0]} computes as that loss.")
    warnings.warn(what, UserWarning, stacklevel=3)
