"""The ``Task`` dataclass — what a task module's ``build(*, batch_size, seed, **params)`` returns to
``scripts/train.py`` — and the task parameters (``--set name=value``) read from ``build``'s signature."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Task", "describe_parameters", "parse_task_parameters", "task_parameters"]

RESERVED = ("batch_size", "seed")  # given to every build() by the command line itself
TYPES = (bool, int, float, str)  # (bool before int: True is an int too)
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass
class Task:
    """A trainable task: a model, its objective and its data.

    Attributes:
        model: the model (built inside the strategy's scope by ``build``).
        loss: the loss, as for ``Trainer(loss=...)``.
        train: training data: a dataset of batches, or numpy ``(x, {name: array})`` (``scripts/train.py`` batches it
            with ``--batch-size``; checkpoints then hold a position instead of a shuffle buffer).
        validation: validation data, same forms, or None.
        loss_weights, metrics, optimizer: as for ``Trainer``.
        epochs: default number of epochs.
        evaluate_extra: ``(trainer, validation) -> {name: float}`` for task metrics computed once at the end (e.g. a
            costly evaluation); metrics wanted every epoch belong in a callback that adds ``val_<name>`` to the logs.
        callbacks: Keras callbacks for ``fit``, or ``(trainer) -> callbacks`` for those that need the trainer
            (``LossWeightSchedule``). They run before the run directory's writers, so keys they add to the epoch's
            logs reach the History, CSV, TensorBoard and the plot.
        trainer_options: further ``Trainer`` keyword arguments (``steps_per_execution``, ``nan_policy``,
            ``gradient_accumulation_steps``, ``aggregator``, ...); ``--steps-per-execution`` and ``--aggregator`` on
            the command line win over these.
        pictures: ``(trainer, validation) -> {name: matplotlib Figure}``, saved as ``<name>.png`` in the run
            directory at the end of training (e.g. the detection task's ``detections.png``).
    """

    model: Any
    loss: Any
    train: Any
    validation: Any = None
    loss_weights: Mapping[str, float] | None = None
    metrics: Mapping[str, Any] | None = None
    optimizer: Any = "adam"
    epochs: int = 1
    evaluate_extra: Callable[[Any, Any], Mapping[str, float]] | None = None
    callbacks: Sequence[Any] | Callable[[Any], Sequence[Any]] = ()
    trainer_options: Mapping[str, Any] = field(default_factory=dict)
    pictures: Callable[[Any, Any], Mapping[str, Any]] | None = None

    def make_callbacks(self, trainer: Any) -> list[Any]:
        """The task's callbacks for ``trainer``."""
        return list(self.callbacks(trainer) if callable(self.callbacks) else self.callbacks)


def task_parameters(build: Callable[..., Any]) -> dict[str, Any]:
    """``build``'s own keyword parameters and their defaults (``batch_size`` and ``seed`` excluded).

    Raises:
        TypeError: a parameter has no default, or a default that is not an int, float, bool or str.
    """
    found = {}
    for name, parameter in inspect.signature(build).parameters.items():
        if name in RESERVED or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        default = parameter.default
        if default is parameter.empty or not isinstance(default, TYPES):
            raise TypeError(
                f"build() parameter {name!r} needs a default of type int, float, bool or str (its type for "
                f"--set {name}=VALUE); got {'no default' if default is parameter.empty else repr(default)}."
            )
        found[name] = default
    return found


def describe_parameters(parameters: Mapping[str, Any]) -> str:
    """``name=default (type), ...`` for messages and ``--help``."""
    if not parameters:
        return "none (its build() takes only batch_size and seed)"
    return ", ".join(f"{name}={default!r} ({type(default).__name__})" for name, default in parameters.items())


def _convert(name: str, text: str, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"--set {name}={text}: expected a bool (true/false), the type of its default {default!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(
            f"--set {name}={text}: expected {'an' if kind is int else 'a'} {kind.__name__}, the type of its default "
            f"{default!r}"
        ) from None


def parse_task_parameters(build: Callable[..., Any], settings: Sequence[str]) -> dict[str, Any]:
    """``["name=value", ...]`` from the command line, typed by ``build``'s defaults: ``{name: value}`` (only those
    given; a later setting of the same name wins).

    Raises:
        ValueError: not ``name=value``, an unknown name or a value of the wrong type; the message lists the
            accepted parameters with their defaults.
    """
    accepted = task_parameters(build)
    values: dict[str, Any] = {}
    for setting in settings:
        name, sep, text = setting.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--set {setting!r}: expected name=value. Parameters: {describe_parameters(accepted)}.")
        if name not in accepted:
            raise ValueError(f"--set {name}: the task has no parameter {name!r}. Parameters: "
                             f"{describe_parameters(accepted)}.")  # fmt: skip
        try:
            values[name] = _convert(name, text.strip(), accepted[name])
        except ValueError as error:
            raise ValueError(f"{error}. Parameters: {describe_parameters(accepted)}.") from None
    return values
