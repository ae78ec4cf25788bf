"""Built-in task ``detection`` (the default): a small SSD on synthetic shapes, trained with ``MultiBoxLoss``.

Images are 64x64 with 1-4 objects of three shapes (rectangle, ellipse, triangle) in random colours and sizes on a
noisy background, generated deterministically from the seed. The model has 912 anchors on 16x16, 8x8 and 4x4
feature maps. ``evaluate_extra`` reports mAP@0.5 and mAP@0.75 (VOC all-point) on the validation images.
"""

from __future__ import annotations

import contextlib
import io

import keras
import numpy as np
from keras import layers
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

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
CLASS_NAMES = ("background", "rectangle", "ellipse", "triangle")
COLOURS = ("white", "tab:red", "tab:cyan", "yellow")
CATEGORIES = [{"id": c, "name": name} for c, name in enumerate(CLASS_NAMES) if c > 0]


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


def detect(trainer, images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image ``(corner boxes, scores, labels)`` after NMS."""
    outputs = trainer.predict(images, batch_size=128)
    return boxes.decode_detections(outputs["boxes"], outputs["classes"], ANCHORS)


def truth_of(box: np.ndarray, label: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(b[lab > 0], lab[lab > 0]) for b, lab in zip(box, label)]


class EpochMAP(keras.callbacks.Callback):
    """Adds ``val_mAP@0.5`` and ``val_mAP@0.75`` (VOC all-point) to every epoch's logs, so they are in the History,
    history.csv, TensorBoard and the plot (``EarlyStopping(monitor="val_mAP@0.5", mode="max")`` may monitor them:
    a key a callback adds has no direction tapeloop knows)."""

    def __init__(self, trainer, images: np.ndarray, box: np.ndarray, label: np.ndarray) -> None:
        super().__init__()
        self.trainer, self.images, self.truth = trainer, images, truth_of(box, label)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        detections = detect(self.trainer, self.images)
        for t in (0.5, 0.75):
            logs[f"val_mAP@{t}"] = mean_average_precision(detections, self.truth, iou_threshold=t)


def coco_average_precision(detections, truth) -> dict[str, float]:
    """COCO's own yardstick by ``pycocotools.COCOeval`` on the same detections: AP@[.5:.95], AP@0.5, AP@0.75
    (101-point interpolation, up to 100 detections an image). Raises ImportError without pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(corners: np.ndarray) -> list[float]:
        y0, x0, y1, x1 = (float(v) * SIZE for v in corners)
        return [x0, y0, x1 - x0, y1 - y0]

    images = [{"id": i, "width": SIZE, "height": SIZE} for i in range(len(truth))]
    annotations = [
        {"id": k + 1, "image_id": i, "category_id": int(c), "bbox": xywh(b), "iscrowd": 0}
        for k, (i, b, c) in enumerate((i, b, c) for i, (bs, cs) in enumerate(truth) for b, c in zip(bs, cs))
    ]
    for annotation in annotations:
        annotation["area"] = annotation["bbox"][2] * annotation["bbox"][3]
    found = [
        {"image_id": i, "category_id": int(c), "bbox": xywh(b), "score": float(s)}
        for i, (bs, ss, cs) in enumerate(detections)
        for b, s, c in zip(bs, ss, cs)
    ]
    if not found:
        return dict.fromkeys(("coco_AP@[.5:.95]", "coco_AP@0.5", "coco_AP@0.75"), 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        ground = COCO()
        ground.dataset = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        ground.createIndex()
        evaluation = COCOeval(ground, ground.loadRes(found), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ap, ap50, ap75 = (float(v) for v in evaluation.stats[:3])
    return {"coco_AP@[.5:.95]": ap, "coco_AP@0.5": ap50, "coco_AP@0.75": ap75}


def coco_metrics(trainer, images: np.ndarray, box: np.ndarray, label: np.ndarray) -> dict[str, float]:
    try:
        return coco_average_precision(detect(trainer, images), truth_of(box, label))
    except ImportError:
        print('COCO AP not computed: pycocotools is not installed (pip install -e ".[detection]").')
        return {}


def detections_figure(trainer, images: np.ndarray, box: np.ndarray, label: np.ndarray, n: int = 16) -> Figure:
    """A grid of ``n`` validation images: ground truth dashed white, detections (score >= 0.5) in their class's
    colour with class and score."""
    detections = detect(trainer, images[:n])
    columns = 4
    figure = Figure(figsize=(2.2 * columns, 2.2 * -(-n // columns)), layout="constrained")
    for i, axis in enumerate(figure.subplots(-(-n // columns), columns).flat):
        axis.set_axis_off()
        if i >= n:
            continue
        axis.imshow(images[i])
        for b in box[i][label[i] > 0] * SIZE:
            outline = Rectangle((b[1] - 0.5, b[0] - 0.5), b[3] - b[1], b[2] - b[0], fill=False, ec="white", ls="--")
            outline.set_path_effects([patheffects.withStroke(linewidth=2.5, foreground="black")])
            axis.add_patch(outline)
        for b, score, c in zip(*detections[i]):
            if score < 0.5:
                continue
            b, colour = b * SIZE, COLOURS[int(c)]
            axis.add_patch(Rectangle((b[1] - 0.5, b[0] - 0.5), b[3] - b[1], b[2] - b[0], fill=False, ec=colour, lw=1.5))
            axis.text(b[1], b[0] - 1, f"{CLASS_NAMES[int(c)]} {score:.2f}", color=colour, fontsize=6, va="bottom")
    figure.suptitle("validation: ground truth (dashed) and detections (score >= 0.5)", fontsize=9)
    return figure


def build(
    *,
    batch_size: int,
    seed: int,
    learning_rate: float = 3e-3,
    loc_weight: float = 1.0,
    conf_weight: float = 1.0,
    neg_pos_ratio: float = 3.0,
    train_size: int = TRAIN,
    epochs: int = 8,
) -> Task:
    """Parameters (``--set NAME=VALUE``): the peak learning rate of the cosine schedule, the weights of the two
    parts of the MultiBox loss, its hard-negative ratio, the number of training images, and ``epochs`` (the
    schedule's length and the default ``--epochs``)."""
    rng = np.random.default_rng(seed)
    x, box, label = make_images(train_size, rng)
    xv, box_v, label_v = make_images(VALIDATION, rng)
    steps = epochs * -(-train_size // batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps, alpha=0.01)
    return Task(
        model=build_model(),
        loss=MultiBoxLoss(neg_pos_ratio=neg_pos_ratio),
        loss_weights={"loc": loc_weight, "conf": conf_weight},
        # NumPy data: train.py batches it with --batch-size and fit reshuffles it from (seed, epoch), so a
        # checkpoint holds the position, not a tf.data shuffle buffer of every image (217 MB).
        train=(x, encode_targets(box, label)),
        validation=(xv, encode_targets(box_v, label_v)),
        optimizer=keras.optimizers.Adam(schedule),
        epochs=epochs,
        callbacks=lambda trainer: [EpochMAP(trainer, xv, box_v, label_v)],
        evaluate_extra=lambda trainer, _: coco_metrics(trainer, xv, box_v, label_v),
        pictures=lambda trainer, _: {"detections": detections_figure(trainer, xv, box_v, label_v)},
    )
