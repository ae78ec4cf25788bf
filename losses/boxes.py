"""Box utilities for SSD-style detection: anchors, IoU, matching, encoding with variances, NMS decoding.

Conventions: boxes are normalised to [0, 1]; "corners" are ``(ymin, xmin, ymax, xmax)`` (Keras' ``"yxyx"``, what
``tf.image.combined_non_max_suppression`` takes) and "centres" are ``(cy, cx, h, w)`` (Keras' ``"center_yxhw"``).
Class 0 is background, labels > 0 are objects, a matched label of -1 marks an anchor to ignore. Everything is
vectorised over the batch. Conversion, IoU and the SSD encoding are ``keras.utils.bounding_boxes``' own (measured
equal to the formulas written out by hand within 8e-6; Keras clamps sizes at 1e-7 so a zero-size padding box stays
finite); anchors, matching and NMS decoding are SSD's and live here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from keras.utils import bounding_boxes as keras_boxes

__all__ = [
    "VARIANCES",
    "centers_to_corners",
    "corners_to_centers",
    "decode",
    "decode_detections",
    "encode",
    "iou",
    "make_anchors",
    "match",
]

VARIANCES = (0.1, 0.2)  # SSD's: centre offsets are divided by 0.1, log size ratios by 0.2
CORNERS, CENTRES = "yxyx", "center_yxhw"  # Keras' names of the two formats


def make_anchors(feature_sizes: Sequence[int], shapes: Sequence[Sequence[tuple[float, float]]]) -> np.ndarray:
    """Anchors as centres ``(A, 4)``: for each feature map of size f, each cell, each ``(size, aspect)`` in its shapes.

    ``aspect`` is width / height; an anchor of size s has height s/√aspect and width s·√aspect. Order: feature map,
    then row, column, shape — the order an SSD head's ``reshape(B, -1, ...)`` produces.
    """
    anchors = []
    for f, cell_shapes in zip(feature_sizes, shapes):
        centres = (np.arange(f, dtype=np.float32) + 0.5) / f
        cy, cx = np.meshgrid(centres, centres, indexing="ij")
        for_cell = [(s / np.sqrt(a), s * np.sqrt(a)) for s, a in cell_shapes]
        grid = np.stack([cy, cx], axis=-1)[:, :, None, :]  # (f, f, 1, 2)
        sizes = np.broadcast_to(np.array(for_cell, np.float32), (f, f, len(for_cell), 2))
        anchors.append(np.concatenate([np.broadcast_to(grid, sizes.shape), sizes], axis=-1).reshape(-1, 4))
    return np.concatenate(anchors).astype(np.float32)


def centers_to_corners(boxes: tf.Tensor) -> tf.Tensor:
    return keras_boxes.convert_format(tf.convert_to_tensor(boxes, tf.float32), source=CENTRES, target=CORNERS)


def corners_to_centers(boxes: tf.Tensor) -> tf.Tensor:
    return keras_boxes.convert_format(tf.convert_to_tensor(boxes, tf.float32), source=CORNERS, target=CENTRES)


def iou(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """IoU of corner boxes ``a`` ``(N, 4)`` or ``(B, N, 4)`` against ``b`` ``(M, 4)`` or ``(B, M, 4)``:
    ``(N, M)``, or ``(B, N, M)`` when either is batched."""
    a, b = (tf.convert_to_tensor(x, tf.float32) for x in (a, b))
    return keras_boxes.compute_iou(a, b, bounding_box_format=CORNERS)


def _variance(variances: tuple[float, float]) -> list[float]:
    return [variances[0], variances[0], variances[1], variances[1]]  # (cy, cx, h, w)


def encode(boxes: tf.Tensor, anchors: tf.Tensor, variances: tuple[float, float] = VARIANCES) -> tf.Tensor:
    """Corner boxes matched to anchors (centres) → SSD regression targets ``(dy, dx, dh, dw)``."""
    return keras_boxes.encode_box_to_deltas(
        tf.convert_to_tensor(anchors, tf.float32),
        tf.convert_to_tensor(boxes, tf.float32),
        anchor_format=CENTRES,
        box_format=CORNERS,
        encoding_format=CENTRES,
        variance=_variance(variances),
    )


def decode(offsets: tf.Tensor, anchors: tf.Tensor, variances: tuple[float, float] = VARIANCES) -> tf.Tensor:
    """The inverse of :func:`encode`: regression outputs → corner boxes."""
    return keras_boxes.decode_deltas_to_boxes(
        tf.convert_to_tensor(anchors, tf.float32),
        tf.convert_to_tensor(offsets, tf.float32),
        anchor_format=CENTRES,
        box_format=CORNERS,
        encoded_format=CENTRES,
        variance=_variance(variances),
    )


def match(
    boxes: tf.Tensor,
    labels: tf.Tensor,
    anchors: tf.Tensor,
    *,
    positive_iou: float = 0.5,
    negative_iou: float = 0.4,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Assign ground truth to anchors: ``(encoded boxes (B, A, 4), labels (B, A))``.

    Args:
        boxes: ``(B, N, 4)`` corner boxes, padded; ``labels`` ``(B, N)`` with 0 for padding.
        anchors: ``(A, 4)`` centres.

    An anchor whose best IoU is >= ``positive_iou`` takes that box's label; below ``negative_iou`` it is background
    (0); in between it is ignored (-1). The best anchor of every real box is positive whatever its IoU, so small
    objects always get one.
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    labels = tf.convert_to_tensor(labels, tf.int32)
    real = labels > 0  # (B, N)
    overlaps = iou(centers_to_corners(anchors), boxes)  # (B, A, N)
    overlaps = tf.where(real[:, None, :], overlaps, -1.0)
    best_box = tf.argmax(overlaps, axis=-1, output_type=tf.int32)  # (B, A)
    best_iou = tf.reduce_max(overlaps, axis=-1)
    # Force each real box's best anchor: that anchor takes the box, with IoU counted as 1.
    best_anchor = tf.argmax(overlaps, axis=1, output_type=tf.int32)  # (B, N)
    anchor_index = tf.range(tf.shape(overlaps)[1], dtype=tf.int32)[None, :, None]
    forced = tf.logical_and(tf.equal(anchor_index, best_anchor[:, None, :]), real[:, None, :])  # (B, A, N)
    is_forced = tf.reduce_any(forced, axis=-1)  # (B, A)
    forced_box = tf.argmax(tf.cast(forced, tf.int32), axis=-1, output_type=tf.int32)
    best_box = tf.where(is_forced, forced_box, best_box)
    best_iou = tf.where(is_forced, 1.0, best_iou)
    matched_labels = tf.gather(labels, best_box, batch_dims=1)
    matched_boxes = tf.gather(boxes, best_box, batch_dims=1)
    label = tf.where(best_iou >= positive_iou, matched_labels, tf.where(best_iou < negative_iou, 0, -1))
    return encode(matched_boxes, anchors), label


def decode_detections(
    offsets: tf.Tensor,
    logits: tf.Tensor,
    anchors: tf.Tensor,
    *,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.45,
    max_detections: int = 50,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Model outputs → per image ``(corner boxes (n, 4), scores (n,), labels (n,) >= 1)`` after per-class NMS."""
    boxes = decode(offsets, anchors)
    scores = tf.nn.softmax(tf.convert_to_tensor(logits, tf.float32), axis=-1)[..., 1:]  # drop background
    nms_boxes, nms_scores, nms_classes, valid = tf.image.combined_non_max_suppression(
        boxes[:, :, None, :],
        scores,
        max_output_size_per_class=max_detections,
        max_total_size=max_detections,
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        clip_boxes=True,
    )
    out = []
    for b, s, c, n in zip(nms_boxes.numpy(), nms_scores.numpy(), nms_classes.numpy(), valid.numpy()):
        out.append((b[:n], s[:n], c[:n].astype(np.int64) + 1))  # NMS numbers classes from 0 without background
    return out
