"""SSD's MultiBox loss: localisation and confidence read the box and class outputs together.

``loc`` is smooth-L1 (Keras' ``huber`` with delta 1, summed over the 4 coordinates) over positive anchors. ``conf`` is
the softmax cross-entropy over positives plus, per image, the hardest negatives ranked by their background
cross-entropy, k = min(neg_pos_ratio × positives in the image, negatives in the image). Both are divided by
max(positives in the whole batch, 1), through :func:`losses.global_normalizer`, so that a distributed run normalises
like one device.
Vectorised (a double argsort ranks negatives per image), static shapes: eager, ``tf.function`` and XLA alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import tensorflow as tf

from losses.distributed import global_normalizer
from losses.focal import sparse_focal_loss
from losses.protocol import check_number

__all__ = ["MultiBoxLoss"]


class MultiBoxLoss:
    """The SSD loss as a loss-protocol callable returning ``{"loc": ..., "conf": ...}``.

    Args:
        neg_pos_ratio: hard negatives kept per positive, per image.
        boxes: name of the box output and target (``(B, A, 4)`` encoded offsets).
        classes: name of the class output (``(B, A, C)`` logits, class 0 = background) and target (``(B, A)`` int:
            0 background, > 0 object class, < 0 ignored).
        focal_gamma: if set, ``conf`` is the focal loss (Lin et al. 2017) over every non-ignored anchor instead of
            cross-entropy with hard-negative mining (RetinaNet's recipe); ``focal_alpha`` weights object classes.
    """

    def __init__(
        self,
        neg_pos_ratio: float = 3.0,
        *,
        boxes: str = "boxes",
        classes: str = "classes",
        focal_gamma: float | None = None,
        focal_alpha: float | None = 0.25,
    ) -> None:
        self.neg_pos_ratio = check_number("MultiBoxLoss' neg_pos_ratio", neg_pos_ratio, at_least=0)
        self.boxes = boxes
        self.classes = classes
        self.focal_gamma = None if focal_gamma is None else check_number("focal_gamma", focal_gamma, at_least=0)
        self.focal_alpha = (
            None if focal_alpha is None else check_number("focal_alpha", focal_alpha, at_least=0, at_most=1)
        )

    def __call__(self, outputs: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        box_pred = tf.cast(outputs[self.boxes], tf.float32)
        logits = tf.cast(outputs[self.classes], tf.float32)
        box_true = tf.cast(targets[self.boxes], tf.float32)
        labels = tf.cast(targets[self.classes], tf.int32)

        positive = labels > 0
        negative = tf.equal(labels, 0)
        pos_f = tf.cast(positive, tf.float32)
        # max(positives in the global batch, 1) × b/B: exact under tf.distribute (see losses/distributed.py)
        normaliser = global_normalizer(tf.reduce_sum(pos_f), tf.shape(labels)[0])

        # Keras' huber is the mean over the 4 coordinates: × 4 is their sum (exact: a power of two).
        loc = tf.reduce_sum(4.0 * keras.losses.huber(box_true, box_pred, delta=1.0) * pos_f)
        safe_labels = tf.maximum(labels, 0)
        if self.focal_gamma is not None:
            focal = sparse_focal_loss(safe_labels, logits, gamma=self.focal_gamma, alpha=self.focal_alpha)
            conf = tf.reduce_sum(focal * tf.cast(labels >= 0, tf.float32))
            return {"loc": tf.math.divide_no_nan(loc, normaliser), "conf": tf.math.divide_no_nan(conf, normaliser)}

        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)  # (B, A)
        background_ce = -tf.nn.log_softmax(logits, axis=-1)[..., 0]
        # Rank negatives by background cross-entropy, hardest first; non-negatives sink to the end.
        score = tf.where(negative, background_ce, -1.0)
        order = tf.argsort(score, axis=-1, direction="DESCENDING", stable=True)
        rank = tf.argsort(order, axis=-1, stable=True)
        positives_per_image = tf.reduce_sum(pos_f, axis=-1, keepdims=True)
        negatives_per_image = tf.reduce_sum(tf.cast(negative, tf.float32), axis=-1, keepdims=True)
        k = tf.minimum(tf.floor(self.neg_pos_ratio * positives_per_image), negatives_per_image)
        hard = tf.logical_and(negative, tf.cast(rank, tf.float32) < k)
        conf = tf.reduce_sum(ce * tf.cast(tf.logical_or(positive, hard), tf.float32))
        return {"loc": tf.math.divide_no_nan(loc, normaliser), "conf": tf.math.divide_no_nan(conf, normaliser)}

    def __repr__(self) -> str:
        return f"MultiBoxLoss(neg_pos_ratio={self.neg_pos_ratio}, boxes={self.boxes!r}, classes={self.classes!r})"
