"""Detection evaluation: mean average precision with VOC all-point interpolation (NumPy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["average_precision", "box_iou", "mean_average_precision"]


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one corner box ``(4,)`` with each of ``boxes (n, 4)`` (NumPy, for evaluation and data generation).

    Not ``keras.utils.bounding_boxes.compute_iou`` (equal to 3e-6): mAP calls this once per detection, and Keras'
    version, eager TensorFlow ops on the TF backend, took 6.8 ms a call against 54 us here (measured).
    """
    top_left = np.maximum(box[:2], boxes[:, :2])
    bottom_right = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / np.maximum(area + areas - inter, 1e-12)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point interpolation: area under the precision envelope (max precision at recall >= r)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def mean_average_precision(
    detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    iou_threshold: float = 0.5,
) -> float:
    """mAP over the classes that have ground truth.

    Args:
        detections: per image ``(boxes (n, 4) corners, scores (n,), labels (n,))``.
        ground_truth: per image ``(boxes (m, 4), labels (m,))``.
        iou_threshold: a detection is a true positive if it overlaps an unmatched ground-truth box of its class
            by at least this IoU (each ground-truth box is matched once, highest scores first).
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} images of detections but {len(ground_truth)} of ground truth.")
    classes = sorted({int(c) for _, labels in ground_truth for c in labels})
    aps = []
    for cls in classes:
        gts = [boxes[labels == cls] for boxes, labels in ground_truth]
        used = [np.zeros(len(g), bool) for g in gts]
        found = [
            (score, image, box)
            for image, (boxes, scores, labels) in enumerate(detections)
            for box, score, label in zip(boxes, scores, labels)
            if label == cls
        ]
        found.sort(key=lambda d: -d[0])
        hits = np.zeros(len(found))
        for i, (_, image, box) in enumerate(found):
            if len(gts[image]):
                overlaps = box_iou(np.asarray(box, np.float64), np.asarray(gts[image], np.float64))
                best = int(np.argmax(overlaps))
                if overlaps[best] >= iou_threshold and not used[image][best]:
                    used[image][best] = True
                    hits[i] = 1
        total = sum(len(g) for g in gts)
        tp = np.cumsum(hits)
        recall = tp / total
        precision = tp / np.arange(1, len(found) + 1)
        aps.append(average_precision(recall, precision))
    return float(np.mean(aps)) if aps else 0.0
