"""Box utilities and mAP on hand-computed cases; the detection task trains a few steps."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from losses import average_precision, boxes, mean_average_precision
from trainer import Trainer


def test_make_anchors_positions_and_shapes():
    anchors = boxes.make_anchors([2], [((0.5, 1.0), (0.5, 4.0))])
    assert anchors.shape == (8, 4)
    np.testing.assert_allclose(anchors[0], [0.25, 0.25, 0.5, 0.5])
    np.testing.assert_allclose(anchors[1], [0.25, 0.25, 0.25, 1.0])  # aspect 4: h = s/2, w = 2s
    np.testing.assert_allclose(anchors[2], [0.25, 0.75, 0.5, 0.5])  # next cell in the same row
    np.testing.assert_allclose(anchors[4], [0.75, 0.25, 0.5, 0.5])


def test_iou_hand_cases():
    a = np.array([[0.0, 0.0, 1.0, 1.0]])
    b = np.array([[0.5, 0.5, 1.5, 1.5], [2.0, 2.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_allclose(boxes.iou(a, b).numpy(), [[0.25 / 1.75, 0.0, 1.0]], rtol=1e-6)


def test_encode_hand_case_and_decode_inverts_it():
    anchor = np.array([[0.5, 0.5, 0.2, 0.2]])
    box = np.array([[0.4, 0.45, 0.6, 0.65]])
    encoded = boxes.encode(box, anchor).numpy()
    np.testing.assert_allclose(encoded, [[0.0, 2.5, 0.0, 0.0]], atol=1e-5)
    rng = np.random.default_rng(0)
    anchors = np.concatenate([rng.uniform(0.2, 0.8, (10, 2)), rng.uniform(0.1, 0.4, (10, 2))], 1)
    corners = boxes.centers_to_corners(
        np.concatenate([rng.uniform(0.2, 0.8, (10, 2)), rng.uniform(0.05, 0.5, (10, 2))], 1)
    ).numpy()
    np.testing.assert_allclose(boxes.decode(boxes.encode(corners, anchors), anchors).numpy(), corners, atol=1e-5)


def test_match_positive_forced_ignored_and_background():
    anchors = np.array(
        [
            [0.25, 0.25, 0.5, 0.5],  # IoU 1 with the big box
            [0.75, 0.75, 0.5, 0.5],  # IoU 0.04 with the small box, but its best anchor: forced positive
            [0.3, 0.3, 0.5, 0.5],  # IoU 0.68: positive
            [0.35, 0.35, 0.5, 0.5],  # IoU 0.47: between the thresholds, ignored
            [0.25, 0.8, 0.2, 0.2],  # no overlap: background
        ],
        np.float32,
    )
    gt = np.array([[[0.0, 0.0, 0.5, 0.5], [0.7, 0.7, 0.8, 0.8], [0.0, 0.0, 0.0, 0.0]]], np.float32)
    labels = np.array([[2, 1, 0]])
    encoded, matched = boxes.match(gt, labels, anchors)
    assert matched.numpy().tolist() == [[2, 1, 2, -1, 0]]
    np.testing.assert_allclose(encoded.numpy()[0, 0], [0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(boxes.decode(encoded, anchors).numpy()[0, 1], gt[0, 1], atol=1e-5)


def test_decode_detections_returns_the_confident_box_with_its_label():
    anchors = boxes.make_anchors([2], [((0.5, 1.0),)])
    logits = np.full((1, 4, 3), -5.0, np.float32)
    logits[0, :, 0] = 5.0  # background everywhere ...
    logits[0, 3] = [-5.0, -5.0, 5.0]  # ... but class 2 at the last anchor
    (found,) = boxes.decode_detections(np.zeros((1, 4, 4), np.float32), logits, anchors, score_threshold=0.5)
    found_boxes, scores, labels = found
    assert labels.tolist() == [2] and scores[0] > 0.99
    np.testing.assert_allclose(found_boxes[0], [0.5, 0.5, 1.0, 1.0], atol=1e-6)


def test_average_precision_and_map_on_a_hand_computed_case():
    # recall 0.5, 0.5, 1 with precision 1, 1/2, 2/3: all-point AP = 0.5·1 + 0.5·2/3
    assert average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(5 / 6)
    a, b, c = [0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0, 1, 1]
    truth = [(np.array([a, b]), np.array([1, 1])), (np.array([c]), np.array([2]))]
    detections = [
        (np.array([a, [0.9, 0.0, 1.0, 0.1], b]), np.array([0.9, 0.8, 0.7]), np.array([1, 1, 1])),
        (np.array([c, c, a]), np.array([0.6, 0.5, 0.4]), np.array([2, 2, 3])),  # a duplicate; class 3 has no truth
    ]
    # class 1: AP 5/6 (a false positive between the two hits); class 2: AP 1 (the duplicate comes after full recall)
    assert mean_average_precision(detections, truth, iou_threshold=0.5) == pytest.approx((5 / 6 + 1) / 2)
    shifted = [(d[0] + np.array([0.1, 0.1, 0.1, 0.1]), d[1], d[2]) for d in detections]
    assert mean_average_precision(shifted, truth, iou_threshold=0.75) < mean_average_precision(shifted, truth)


def _detection_task():
    path = Path(__file__).resolve().parents[1] / "scripts" / "tasks" / "detection.py"
    spec = importlib.util.spec_from_file_location("detection_task", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_detection_data_is_deterministic_and_valid():
    task = _detection_task()
    first = task.make_images(16, np.random.default_rng(3))
    second = task.make_images(16, np.random.default_rng(3))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    images, box, label = first
    counts = (label > 0).sum(1)
    assert images.shape == (16, 64, 64, 3) and counts.min() >= 1 and counts.max() <= 4
    real = box[label > 0]
    assert (real >= 0).all() and (real <= 1).all() and (real[:, 2:] > real[:, :2]).all()
    assert set(np.unique(label[label > 0])) <= {1, 2, 3}


def test_detection_map_of_perfect_outputs_is_one():
    """The task's evaluation paths (predict, decode, NMS, then our mAP per epoch and COCOeval's at the end) on
    outputs equal to the encoded targets."""
    task = _detection_task()
    images, box, label = task.make_images(32, np.random.default_rng(5))
    targets = task.encode_targets(box, label)

    class Oracle:
        def predict(self, x, batch_size=None):
            one_hot = np.eye(task.NUM_CLASSES)[np.maximum(targets["classes"], 0)]  # ignored anchors: background
            return {"boxes": targets["boxes"], "classes": np.where(one_hot > 0, 10.0, -10.0).astype(np.float32)}

    logs = {}
    task.EpochMAP(Oracle(), images, box, label).on_epoch_end(0, logs)
    assert logs == {"val_mAP@0.5": 1.0, "val_mAP@0.75": 1.0}
    coco = task.coco_metrics(Oracle(), images, box, label)
    assert coco == pytest.approx({"coco_AP@[.5:.95]": 1.0, "coco_AP@0.5": 1.0, "coco_AP@0.75": 1.0})


def test_detection_task_learns_to_detect_in_48_steps():
    task = _detection_task().build(batch_size=32, seed=0, train_size=512, epochs=3)
    trainer = Trainer(task.model, optimizer=task.optimizer, loss=task.loss, loss_weights=task.loss_weights)
    history = trainer.fit(task.train, epochs=3, progress=False, callbacks=task.make_callbacks(trainer)).history
    assert set(history) == {"loss", "loc", "conf", "lr", "val_mAP@0.5", "val_mAP@0.75"} and trainer.global_step == 48
    assert history["loss"][-1] < 0.75 * history["loss"][0]  # measured: 7.77 -> 4.44
    # Measured 0.27-0.32 after 3 epochs (an untrained model: 0.00); a broken loss, matching or decoding stays near 0.
    assert history["val_mAP@0.5"][-1] > 0.15 and history["val_mAP@0.75"][-1] < history["val_mAP@0.5"][-1]
