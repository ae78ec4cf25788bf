"""Callbacks: Keras callbacks run unchanged; ``History`` records epoch logs; one list dispatches every hook.

A resumed ``fit`` gives callbacks their state back (:func:`callback_states` / :func:`restore_callback_states`):
Keras' ``EarlyStopping``, ``ReduceLROnPlateau`` and ``ModelCheckpoint`` by their attributes, any other callback
through the small protocol ``state_dict() -> dict`` / ``load_state_dict(state)`` (values: JSON-able, numpy arrays,
lists of arrays), so a resumed run stops or lowers the rate at the same epoch as an uninterrupted one.

Keras callbacks see ``self.model`` (the user's Keras model, with ``optimizer`` and ``stop_training`` set as
``Model.fit`` sets them; for a non-Keras model a small stand-in with the same attributes) and ``self.params``.
Batch hooks run once per compiled block, with the index of the block's last step, as Keras does with
``steps_per_execution``. Callbacks with a ``teardown()`` method get it in the ``finally`` of every loop.
"""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from trainer.errors import names

__all__ = [
    "CallbackList",
    "History",
    "as_callbacks",
    "callback_model",
    "callback_states",
    "follow_monitors",
    "restore_callback_states",
]


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


def callback_model(
    model: Any, optimizer: keras.optimizers.Optimizer, evaluate: Callable | None = None
) -> tuple[Any, Callable[[], None]]:
    """The object callbacks get as ``self.model``: the Keras model itself, wired as ``Model.fit`` would wire it.

    ``evaluate`` (the Trainer's) answers a callback's ``self.model.evaluate(x, y)`` with Keras' signature and
    defaults (a scalar or a list): the model's own would fail, it is not compiled.

    Returns (that object, what gives the model back as it was — its own optimizer, or none, and ``evaluate``:
    :meth:`CallbackList.teardown` calls it; a compiled model's later ``fit`` trained with the Trainer's optimizer).
    """
    if not isinstance(model, keras.Model):
        stand_in = _ModelStandIn(model, optimizer)
        if evaluate is not None:
            stand_in.evaluate = _KerasEvaluate(evaluate)
        return stand_in, lambda: None
    own = model.__dict__.get("optimizer", _ABSENT)
    model.optimizer = optimizer
    model.stop_training = False
    if evaluate is not None and not getattr(model, "compiled", False):
        model.evaluate = _KerasEvaluate(evaluate)

    def give_back() -> None:
        if own is _ABSENT:
            del model.optimizer
        else:
            model.optimizer = own
        if isinstance(model.__dict__.get("evaluate"), _KerasEvaluate):
            del model.evaluate

    return model, give_back


_ABSENT = object()


class _KerasEvaluate:
    """``Model.evaluate``'s signature and defaults over ``Trainer.evaluate``."""

    def __init__(self, evaluate: Callable) -> None:
        self._evaluate = evaluate

    def __call__(self, x: Any = None, y: Any = None, batch_size: int | None = None, verbose: int | str = "auto",
                 sample_weight: Any = None, steps: int | None = None, callbacks: Any = None,
                 return_dict: bool = False) -> Any:  # fmt: skip
        return self._evaluate(x, y, batch_size=batch_size, verbose=verbose, sample_weight=sample_weight, steps=steps,
                              callbacks=callbacks or (), return_dict=return_dict)  # fmt: skip


def as_callbacks(callbacks: Any, checkpoint_dir: Any = None) -> list[keras.callbacks.Callback]:
    """Keras' forms of ``callbacks``: a list or tuple of callbacks, one callback, or None.

    Raises:
        ValueError: a ``BackupAndRestore`` with a ``checkpoint_dir``: each would restore training its own way.
    """
    if callbacks is None:
        return []
    if isinstance(callbacks, keras.callbacks.Callback):
        callbacks = [callbacks]
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of keras.callbacks.Callback, got {type(callbacks).__name__}.")
    for callback in callbacks:  # before anything is lent to them (see callback_model)
        if not isinstance(callback, keras.callbacks.Callback):
            raise TypeError(f"callbacks must be keras.callbacks.Callback objects, got {type(callback).__name__}.")
    if checkpoint_dir is not None and any(isinstance(c, keras.callbacks.BackupAndRestore) for c in callbacks):
        raise ValueError(
            "Pass either checkpoint_dir or keras.callbacks.BackupAndRestore, not both: each restores the weights "
            "its own way. checkpoint_dir resumes to the step (data position, trackers and callbacks included); "
            "BackupAndRestore to the start of the epoch after its last backup."
        )
    return list(callbacks)


def step_periods(sources: Iterable[Any], steps_per_execution: int | str) -> list[int]:
    """The step periods training blocks must end on, for the callbacks (and the checkpointer) in ``sources``.

    tapeloop's own parts define ``step_periods()``. Keras' ``ModelCheckpoint`` and ``BackupAndRestore`` with an
    integer ``save_freq`` count the batches between the indices they are given and save once that many ran: blocks
    that end on its multiples make them save at the same steps as ``Model.fit`` at one step per call. Keras'
    ``TensorBoard`` counts calls, not steps: with batch-level scalars and several steps per call it writes per block,
    as in ``Model.fit`` with ``steps_per_execution`` (a warning says so; ``TensorBoardWriter`` counts steps).
    """
    keras_saver = (keras.callbacks.ModelCheckpoint, keras.callbacks.BackupAndRestore)
    periods = []
    for source in sources:
        if source is None:
            continue
        periods.extend(getattr(source, "step_periods", list)())
        frequency = getattr(source, "save_freq", None)
        if isinstance(source, keras_saver) and isinstance(frequency, int) and not isinstance(frequency, bool):
            periods.append(frequency)
        board = isinstance(source, keras.callbacks.TensorBoard) and source.update_freq != "epoch"
        if board and steps_per_execution != 1:
            warnings.warn(
                f"keras.callbacks.TensorBoard(update_freq={source.update_freq}) counts calls, not steps: its "
                "batch-level scalars are written once per block of steps (as Model.fit does with "
                "steps_per_execution). Use trainer.TensorBoardWriter(every=N), or steps_per_execution=1.",
                UserWarning,
                stacklevel=3,
            )
    return periods


def _take_restored_epoch(model: Any) -> int | None:
    """Read and clear the epoch Keras' ``BackupAndRestore`` restored. Keras has no public interface for it: the
    callback sets the model's private ``_initial_epoch`` in ``on_train_begin`` and ``Model.fit`` reads it next
    (``keras/src/callbacks/backup_and_restore.py``, ``keras/src/backend/tensorflow/trainer.py``); this is the one
    place tapeloop touches it."""
    if not isinstance(model, keras.Model):
        return None
    epoch, model._initial_epoch = getattr(model, "_initial_epoch", None), None
    return epoch


class CallbackList:
    """Calls each hook on every callback, in order (synchronously: a writer sees steps in order)."""

    def __init__(
        self,
        callbacks: Iterable[keras.callbacks.Callback],
        *,
        model: Any,
        params: dict[str, Any],
        give_back: Callable[[], None] = lambda: None,
    ) -> None:
        self.callbacks = list(callbacks)
        self.model = model
        self._give_back = give_back  # the model as it was before callback_model lent it (see teardown)
        self._followed: list[keras.callbacks.Callback] = []
        for callback in self.callbacks:  # (checked by as_callbacks)
            callback.set_model(model)
            callback.set_params(params)

    @property
    def stop_training(self) -> bool:
        """A callback asked training to stop (``self.model.stop_training = True``, as with ``Model.fit``)."""
        return bool(getattr(self.model, "stop_training", False))

    def on_train_begin(self, logs: Mapping[str, float] | None = None) -> int | None:
        """Call every ``on_train_begin``; returns the epoch Keras' ``BackupAndRestore`` restored, if it did
        (for this fit only: Keras leaves it on the model, so its next fit starts there too)."""
        _take_restored_epoch(self.model)  # a stale one, from an earlier Model.fit
        logs = {} if logs is None else logs
        for callback in self.callbacks:
            callback.on_train_begin(logs)
        return _take_restored_epoch(self.model)

    def follow_monitors(self, runner: Any, validation: bool) -> None:
        """:func:`follow_monitors` over an epoch's logs as ``runner`` (a ``BlockRunner``) writes them; the modes it
        sets are put back by :meth:`teardown`."""
        tracker = runner.trackers["train"]
        self._followed = follow_monitors(
            self.callbacks,
            train_keys=runner.log_keys("train"),
            val_keys=runner.log_keys("eval") if validation else [],
            losses=runner.steps.loss_keys,
            metrics={**tracker.metrics, **tracker.layer_metrics},
        )

    def listens(self, hook: str) -> bool:
        """Some callback overrides ``hook`` (else its logs need not be made)."""
        return bool(getattr(self, hook).methods)

    def __getattr__(self, hook: str):
        if not hook.startswith("on_"):
            raise AttributeError(hook)
        base = getattr(keras.callbacks.Callback, hook)
        # Only callbacks that override the hook are called (per block this is often none at all).
        # A hook may be overridden on the class or set on the instance (``LambdaCallback``).
        methods = [m for m in (getattr(cb, hook) for cb in self.callbacks) if getattr(m, "__func__", None) is not base]

        def dispatch(*args: Any) -> None:
            if args and args[-1] is None:  # as Keras: every hook gets a logs dict, one shared by all callbacks
                args = (*args[:-1], {})
            for method in methods:
                method(*args)

        dispatch.methods = methods
        setattr(self, hook, dispatch)  # cached: __getattr__ runs once per hook
        return dispatch

    def teardown(self) -> None:
        """Always runs (from ``finally``): close progress bars and writers even when a step raised; the model's own
        optimizer and ``evaluate`` back (see :func:`callback_model`); monitoring callbacks' ``mode`` as given."""
        self._give_back()
        for callback in self._followed:
            callback.mode = "auto"  # as it was given (its monitor_op stays resolved)
        for callback in self.callbacks:
            if getattr(callback, "teardown", None) is not None:
                callback.teardown()


def _keras_style(key: str, losses: Iterable[str]) -> str:
    """Keras' log name for a logged key, by Keras' rule: ``out/mae`` -> ``out_mae``, an output's loss component
    ``out`` -> ``out_loss`` (for the hint of an error only)."""
    if "/" in key:
        return key.replace("/", "_")
    return f"{key}_loss" if key in losses and key not in ("loss", "regularization") else key


def follow_monitors(
    callbacks: Iterable[keras.callbacks.Callback],
    *,
    train_keys: Sequence[str],
    val_keys: Sequence[str],
    losses: Sequence[str],
    metrics: Mapping[str, keras.metrics.Metric],
) -> list[keras.callbacks.Callback]:
    """Give Keras' monitoring callbacks (``EarlyStopping``, ``ModelCheckpoint``, ``ReduceLROnPlateau``) what a
    compiled model gives them, before any update; returns those whose ``mode`` was set (to be put back to "auto").

    With ``mode="auto"`` Keras looks the monitored value up in the compiled model's metrics for its direction, and
    raises after the first epoch when it is not there — always, with a Trainer's model, which is not compiled.
    Here a loss or a loss component is minimised (Keras' auto mode places only ``loss``), a Keras metric goes its
    own way (its ``_direction``, Keras' rule), and anything else is an error asking for ``mode``. A key that is not
    logged is an error when it is Keras' name for a logged one or needs validation data (it would never be found:
    Keras warns every epoch and never stops), and in auto mode (Keras raises later). A ``ModelCheckpoint`` that
    saves every epoch never reads its monitor (``val_loss`` by default): it is left alone.

    Args:
        train_keys: the keys of an epoch's training logs; ``val_keys``: of its validation logs (none without).
        losses: the logged loss keys (the total, each component, ``regularization``).
        metrics: Keras metric objects by logged key (their direction).
    """
    keys = [*train_keys, *(f"val_{key}" for key in val_keys)]
    aliases = {_keras_style(key, losses): key for key in keys if _keras_style(key, losses) != key}
    aliases.update({f"val_{alias}": f"val_{key}" for alias, key in list(aliases.items()) if f"val_{key}" in keys})
    followed = []
    for callback in callbacks:
        monitor, mode = getattr(callback, "monitor", None), getattr(callback, "mode", None)
        if not isinstance(monitor, str) or mode not in ("auto", "min", "max"):
            continue
        reads = getattr(callback, "save_best_only", True)  # a ModelCheckpoint that saves every epoch never reads it
        if monitor not in keys and reads:
            said = f"{type(callback).__name__} monitors {monitor!r}"
            if monitor in aliases:
                raise ValueError(f"{said}: that is Keras' name for {aliases[monitor]!r}; logged keys: {names(keys)}.")
            if monitor.startswith("val_") and monitor[4:] in train_keys:
                raise ValueError(f"{said}, which is logged only with validation data (validation_data=...).")
            if mode == "auto":
                raise ValueError(
                    f"{said}, which tapeloop does not log (a key your own callback adds to the logs needs "
                    f"mode='min' or mode='max'); logged keys: {names(keys)}."
                )
        if mode != "auto" or getattr(callback, "monitor_op", None) is not None:
            continue
        base = monitor.removeprefix("val_")
        direction = "down" if base in losses else getattr(metrics.get(base), "_direction", None)
        if direction is None and reads:
            raise ValueError(
                f"{type(callback).__name__} cannot tell whether {base!r} should go up or down (a loss goes down, a "
                "Keras metric says which way it goes, other values do not): pass mode='min' or mode='max'."
            )
        callback.mode = "max" if direction == "up" else "min"
        followed.append(callback)
    return followed


# Keras callbacks whose decisions depend on what they saw in earlier epochs: the attributes that hold it.
KERAS_STATE: dict[type, tuple[str, ...]] = {
    keras.callbacks.EarlyStopping: ("wait", "stopped_epoch", "best", "best_epoch", "best_weights"),
    keras.callbacks.ReduceLROnPlateau: ("wait", "cooldown_counter", "best"),
    keras.callbacks.ModelCheckpoint: ("best", "_batches_seen_since_last_saving", "_last_batch_seen"),  # save_freq=N
}


def _encode(value: Any, where: str) -> Any:
    """JSON-able form of a state value (numpy arrays as base64 ``.npy`` bytes)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.generic,)) and np.ndim(value) == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_encode(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v, where) for k, v in value.items()}
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy, tensors, variables
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(value), allow_pickle=False)
        return {"__ndarray__": base64.b64encode(buffer.getvalue()).decode("ascii")}
    raise TypeError(f"{where}: cannot save a {type(value).__name__} in a checkpoint (JSON values and arrays only).")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__ndarray__"}:
            return np.load(io.BytesIO(base64.b64decode(value["__ndarray__"])), allow_pickle=False)
        return {k: _decode(v) for k, v in value.items()}
    return value


def _state(callback: keras.callbacks.Callback) -> dict[str, Any] | None:
    if hasattr(callback, "state_dict"):
        return dict(callback.state_dict())
    for cls, attributes in KERAS_STATE.items():
        if isinstance(callback, cls):
            return {name: getattr(callback, name) for name in attributes if hasattr(callback, name)}
    return None


def callback_states(callbacks: Iterable[keras.callbacks.Callback]) -> list[dict[str, Any] | None]:
    """Each callback's state, JSON-able, in order (None for a callback without state)."""
    found = []
    for callback in callbacks:
        state = _state(callback)
        name = type(callback).__name__
        found.append(None if state is None else {"class": name, "state": _encode(state, f"callback {name}")})
    return found


def restore_callback_states(callbacks: Iterable[keras.callbacks.Callback], saved: list[dict[str, Any] | None]) -> None:
    """Give each callback its saved state back (call it after ``on_train_begin``, which resets Keras' callbacks).
    A callback list that changed since the checkpoint restores what still lines up and warns about the rest."""
    callbacks = list(callbacks)
    for index, entry in enumerate(saved or []):
        if entry is None:
            continue
        callback = callbacks[index] if index < len(callbacks) else None
        if callback is None or type(callback).__name__ != entry["class"]:
            warnings.warn(
                f"The checkpoint holds the state of a {entry['class']} callback at position {index}, but this fit "
                f"has {type(callback).__name__ if callback else 'none'} there: its state is not restored.",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        state = _decode(entry["state"])
        if hasattr(callback, "load_state_dict"):
            callback.load_state_dict(state)
        else:
            for name, value in state.items():
                setattr(callback, name, value)
