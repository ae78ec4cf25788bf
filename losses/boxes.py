"""Box utilities for SSD-style detection: anchors, IoU, matching, encoding with variances, NMS decoding.

Conventions: boxes are normalised to [0, 1]; "corners" are ``(ymin, xmin, ymax, xmax)`` (what
``tf.image.combined_non_max_suppression`` takes) and "centres" are ``(cy, cx, h, w)``. Class 0 is background,
labels > 0 are objects, a matched label of -1 marks an anchor to ignore. Everything is vectorised over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

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
    cy, cx, h, w = tf.unstack(tf.convert_to_tensor(boxes, tf.float32), axis=-1)
    return tf.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=-1)


def corners_to_centers(boxes: tf.Tensor) -> tf.Tensor:
    y0, x0, y1, x1 = tf.unstack(tf.convert_to_tensor(boxes, tf.float32), axis=-1)
    return tf.stack([(y0 + y1) / 2, (x0 + x1) / 2, y1 - y0, x1 - x0], axis=-1)


def iou(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """IoU of corner boxes ``a (..., N, 4)`` against ``b (..., M, 4)``: ``(..., N, M)``."""
    a = tf.convert_to_tensor(a, tf.float32)[..., :, None, :]
    b = tf.convert_to_tensor(b, tf.float32)[..., None, :, :]
    top_left = tf.maximum(a[..., :2], b[..., :2])
    bottom_right = tf.minimum(a[..., 2:], b[..., 2:])
    inter = tf.reduce_prod(tf.maximum(bottom_right - top_left, 0.0), axis=-1)
    area_a = tf.reduce_prod(tf.maximum(a[..., 2:] - a[..., :2], 0.0), axis=-1)
    area_b = tf.reduce_prod(tf.maximum(b[..., 2:] - b[..., :2], 0.0), axis=-1)
    return tf.math.divide_no_nan(inter, area_a + area_b - inter)


def encode(boxes: tf.Tensor, anchors: tf.Tensor, variances: tuple[float, float] = VARIANCES) -> tf.Tensor:
    """Corner boxes matched to anchors (centres) → SSD regression targets ``(dy, dx, dh, dw)``."""
    g = corners_to_centers(boxes)
    a = tf.convert_to_tensor(anchors, tf.float32)
    centre = (g[..., :2] - a[..., :2]) / a[..., 2:] / variances[0]
    size = tf.math.log(tf.maximum(g[..., 2:], 1e-6) / a[..., 2:]) / variances[1]
    return tf.concat([centre, size], axis=-1)


def decode(offsets: tf.Tensor, anchors: tf.Tensor, variances: tuple[float, float] = VARIANCES) -> tf.Tensor:
    """The inverse of :func:`encode`: regression outputs → corner boxes."""
    offsets = tf.convert_to_tensor(offsets, tf.float32)
    a = tf.convert_to_tensor(anchors, tf.float32)
    centre = offsets[..., :2] * variances[0] * a[..., 2:] + a[..., :2]
    size = tf.exp(offsets[..., 2:] * variances[1]) * a[..., 2:]
    return centers_to_corners(tf.concat([centre, size], axis=-1))


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
    overlaps = iou(centers_to_corners(anchors)[None], boxes)  # (B, A, N)
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
