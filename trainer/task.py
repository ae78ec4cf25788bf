"""The ``Task`` dataclass: what a task module's ``build(*, batch_size, seed)`` returns to ``scripts/train.py``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Task"]


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
        evaluate_extra: ``(trainer, validation) -> {name: float}`` for task metrics (e.g. mAP).
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
