"""Callbacks: Keras callbacks run unchanged; ``History`` records epoch logs; one list dispatches every hook.

Keras callbacks see ``self.model`` (the user's Keras model, with ``optimizer`` and ``stop_training`` set as
``Model.fit`` sets them; for a non-Keras model a small stand-in with the same attributes) and ``self.params``.
Batch hooks run once per compiled block, with the index of the block's last step, as Keras does with
``steps_per_execution``. Callbacks with a ``teardown()`` method get it in the ``finally`` of every loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import keras

__all__ = ["CallbackList", "History", "callback_model"]


class History(keras.callbacks.History):
    """Per-epoch logs: ``history.history`` is ``{key: [one value per epoch]}``; a ``keras.callbacks.History``.

    Unlike Keras' own, it keeps its epochs at ``on_train_begin``: a resumed ``fit`` restores the epochs already
    done (:meth:`restore`) before training begins.
    """

    def __init__(self) -> None:
        super().__init__()
        self.epoch: list[int] = []

    def restore(self, history: Mapping[str, list[float]]) -> None:
        """Start from the epochs of a resumed run."""
        self.history = {key: list(values) for key, values in history.items()}
        self.epoch = list(range(max(map(len, self.history.values()), default=0)))

    def on_train_begin(self, logs: Mapping[str, float] | None = None) -> None:
        """Nothing: Keras' History forgets its epochs here; this one keeps the restored ones."""


class _ModelStandIn:
    """What callbacks see as ``self.model`` when the model is not a ``keras.Model``."""

    def __init__(self, model: Any, optimizer: keras.optimizers.Optimizer) -> None:
        self.module = model
        self.optimizer = optimizer
        self.stop_training = False


def callback_model(model: Any, optimizer: keras.optimizers.Optimizer) -> Any:
    """The object callbacks get as ``self.model``: the Keras model itself, wired as ``Model.fit`` would wire it."""
    if isinstance(model, keras.Model):
        model.optimizer = optimizer
        model.stop_training = False
        return model
    return _ModelStandIn(model, optimizer)


class CallbackList:
    """Calls each hook on every callback, in order (synchronously: a writer sees steps in order)."""

    def __init__(self, callbacks: Iterable[keras.callbacks.Callback], *, model: Any, params: dict[str, Any]) -> None:
        self.callbacks = list(callbacks)
        self.model = model
        for callback in self.callbacks:
            if not isinstance(callback, keras.callbacks.Callback):
                raise TypeError(f"callbacks must be keras.callbacks.Callback objects, got {type(callback).__name__}.")
            callback.set_model(model)
            callback.set_params(params)

    @property
    def stop_training(self) -> bool:
        """A callback asked training to stop (``self.model.stop_training = True``, as with ``Model.fit``)."""
        return bool(getattr(self.model, "stop_training", False))

    def __getattr__(self, hook: str):
        if not hook.startswith("on_"):
            raise AttributeError(hook)
        base = getattr(keras.callbacks.Callback, hook)
        # Only callbacks that override the hook are called (per block this is often none at all).
        # A hook may be overridden on the class or set on the instance (``LambdaCallback``).
        methods = [m for m in (getattr(cb, hook) for cb in self.callbacks) if getattr(m, "__func__", None) is not base]

        def dispatch(*args: Any) -> None:
            for method in methods:
                method(*args)

        setattr(self, hook, dispatch)  # cached: __getattr__ runs once per hook
        return dispatch

    def teardown(self) -> None:
        """Always runs (from ``finally``): close progress bars and writers even when a step raised."""
        for callback in self.callbacks:
            teardown = getattr(callback, "teardown", None)
            if teardown is not None:
                teardown()
