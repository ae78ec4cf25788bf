"""Built-in task ``detection`` (the default): a small SSD on synthetic shapes, trained with ``MultiBoxLoss``.

Images are 64x64 with 1-4 objects of three shapes (rectangle, ellipse, triangle) in random colours and sizes on a
noisy background, generated deterministically from the seed. The model has 912 anchors on 16x16, 8x8 and 4x4
feature maps. ``evaluate_extra`` reports mAP@0.5 and mAP@0.75 (VOC all-point) on the validation images.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from losses import MultiBoxLoss, box_iou, boxes, mean_average_precision
from trainer import Task

SIZE = 64
NUM_CLASSES = 4  # background + rectangle, ellipse, triangle
MAX_OBJECTS = 4
TRAIN, VALIDATION = 4096, 512
FEATURES = (16, 8, 4)
SHAPES = (
    ((0.16, 1.0), (0.16, 2.0), (0.16, 0.5)),
    ((0.3, 1.0), (0.42, 1.0)),
    ((0.6, 1.0),),
)
ANCHORS = boxes.make_anchors(FEATURES, SHAPES)


def _draw(image: np.ndarray, shape: int, y0: int, x0: int, h: int, w: int, colour: np.ndarray) -> None:
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    if shape == 1:  # rectangle
        mask = np.ones((h, w), bool)
    elif shape == 2:  # ellipse
        mask = ((yy - y0 - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - x0 - (w - 1) / 2) / (w / 2)) ** 2 <= 1.0
    else:  # triangle, apex up
        mask = np.abs(xx - x0 - (w - 1) / 2) <= (yy - y0 + 1) / h * w / 2
    image[y0 : y0 + h, x0 : x0 + w][mask] = colour


def make_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` images ``(n, 64, 64, 3)`` with corner boxes ``(n, 4, 4)`` and labels ``(n, 4)`` (0 = no object)."""
    images = rng.uniform(0.0, 0.3, (n, 1, 1, 3)) + rng.normal(0.0, 0.03, (n, SIZE, SIZE, 3))
    images = images.astype(np.float32)
    box = np.zeros((n, MAX_OBJECTS, 4), np.float32)
    label = np.zeros((n, MAX_OBJECTS), np.int32)
    for i in range(n):
        placed: list[np.ndarray] = []
        for j in range(rng.integers(1, MAX_OBJECTS + 1)):
            for _ in range(20):  # retry until it overlaps earlier objects only a little
                h, w = rng.integers(10, 29, 2)
                y0, x0 = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
                candidate = np.array([y0, x0, y0 + h, x0 + w], np.float32) / SIZE
                if not placed or box_iou(candidate, np.stack(placed)).max() < 0.2:
                    break
            else:
                continue
            shape = int(rng.integers(1, NUM_CLASSES))
            _draw(images[i], shape, y0, x0, h, w, rng.uniform(0.45, 1.0, 3).astype(np.float32))
            placed.append(candidate)
            box[i, j], label[i, j] = candidate, shape
    return np.clip(images, 0.0, 1.0), box, label


def build_model() -> keras.Model:
    """A 7-conv SSD (~250k parameters): three feature maps, a box head and a class head on each."""
    inp = layers.Input((SIZE, SIZE, 3))

    def conv(x, filters, stride=1):
        return layers.Conv2D(filters, 3, strides=stride, padding="same", activation="relu")(x)

    x = conv(conv(inp, 16, 2), 32, 2)  # 16x16
    f16 = conv(x, 48)
    f8 = conv(conv(f16, 64, 2), 64)  # 8x8
    f4 = conv(conv(f8, 96, 2), 96)  # 4x4
    box_parts, class_parts = [], []
    for feature, shapes in zip((f16, f8, f4), SHAPES):
        k = len(shapes)
        box_parts.append(layers.Reshape((-1, 4))(layers.Conv2D(4 * k, 3, padding="same")(feature)))
        logits = layers.Conv2D(NUM_CLASSES * k, 3, padding="same")(feature)
        class_parts.append(layers.Reshape((-1, NUM_CLASSES))(logits))
    return keras.Model(
        inp,
        {
            "boxes": layers.Concatenate(axis=1, name="boxes")(box_parts),
            "classes": layers.Concatenate(axis=1, name="classes")(class_parts),
        },
    )


def encode_targets(box: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    encoded, matched = boxes.match(box, label, ANCHORS)
    return {"boxes": encoded.numpy(), "classes": matched.numpy()}


def evaluate_map(trainer, images: np.ndarray, box: np.ndarray, label: np.ndarray) -> dict[str, float]:
    outputs = trainer.predict(images, batch_size=128)
    detections = boxes.decode_detections(outputs["boxes"], outputs["classes"], ANCHORS)
    truth = [(b[lab > 0], lab[lab > 0]) for b, lab in zip(box, label)]
    return {f"mAP@{t}": mean_average_precision(detections, truth, iou_threshold=t) for t in (0.5, 0.75)}


def build(*, batch_size: int, seed: int, train_size: int = TRAIN, epochs: int = 8) -> Task:
    rng = np.random.default_rng(seed)
    x, box, label = make_images(train_size, rng)
    xv, box_v, label_v = make_images(VALIDATION, rng)
    steps = epochs * -(-train_size // batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=steps, alpha=0.01)
    return Task(
        model=build_model(),
        loss=MultiBoxLoss(neg_pos_ratio=3.0),
        # NumPy data: train.py batches it with --batch-size and fit reshuffles it from (seed, epoch), so a
        # checkpoint holds the position, not a tf.data shuffle buffer of every image (217 MB).
        train=(x, encode_targets(box, label)),
        validation=(xv, encode_targets(box_v, label_v)),
        optimizer=keras.optimizers.Adam(schedule),
        epochs=epochs,
        evaluate_extra=lambda trainer, _: evaluate_map(trainer, xv, box_v, label_v),
    )
