"""Focal loss (Lin et al. 2017) for softmax classifiers with integer labels, as a function and a Keras ``Loss``."""

from __future__ import annotations

import keras
import tensorflow as tf

from losses.protocol import check_number

__all__ = ["SparseFocalLoss", "sparse_focal_loss"]


def sparse_focal_loss(
    labels: tf.Tensor, logits: tf.Tensor, *, gamma: float = 2.0, alpha: float | None = 0.25
) -> tf.Tensor:
    """Per-example focal loss ``-α_t (1 - p_t)^γ log p_t`` of softmax ``logits (..., C)`` for ``labels (...)``.

    ``α_t`` is ``alpha`` for object classes (label > 0) and ``1 - alpha`` for the background class 0 (None: 1).
    With ``gamma=0`` and ``alpha=None`` it is the softmax cross-entropy.
    """
    labels = tf.cast(labels, tf.int32)
    log_p = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    log_pt = tf.gather(log_p, labels, batch_dims=labels.shape.rank)
    loss = -tf.pow(1.0 - tf.exp(log_pt), gamma) * log_pt
    if alpha is not None:
        loss = loss * tf.where(labels > 0, alpha, 1.0 - alpha)
    return loss


class SparseFocalLoss(keras.losses.Loss):
    """Keras ``Loss`` form (mean over examples) for ``per_output``/``compile``: labels ``(B,)``, logits ``(B, C)``."""

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | None = 0.25,
        name: str = "sparse_focal_loss",
        reduction: str | None = "sum_over_batch_size",
        dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)  # Keras' own arguments: from_config passes them
        self.gamma = check_number("SparseFocalLoss' gamma", gamma, at_least=0)
        self.alpha = None if alpha is None else check_number("SparseFocalLoss' alpha", alpha, at_least=0, at_most=1)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        if y_true.shape.rank == y_pred.shape.rank:  # labels with a trailing 1
            y_true = tf.squeeze(y_true, -1)
        return sparse_focal_loss(y_true, y_pred, gamma=self.gamma, alpha=self.alpha)

    def get_config(self) -> dict:
        return {**super().get_config(), "gamma": self.gamma, "alpha": self.alpha}
