"""Built-in task ``balancing``: two tasks on one narrow shared trunk, whose losses differ 1000x in scale and whose
gradients conflict — the case multi-task aggregators exist for (``--aggregator upgrad``, ``mgda``, ...).

The data: x ~ N(0, 1)^32. ``regression`` predicts 45·tanh(x·a) (its MSE starts ~1000x the other loss);
``classification`` predicts whether x·b > 0, with b = -0.8·a + 0.6·c: the two tasks read opposite directions of
the same feature, so on a 4-unit trunk their gradients pull against each other. With the plain sum the
regression term drowns the classification; an aggregator of the per-task gradients keeps both learning. Each
task's own metric is logged (``val_regression_output/mae``, ``val_classification_output/binary_accuracy``).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from trainer import Task

TRAIN, VALIDATION = 8192, 2048


def make_data(n: int, rng: np.random.Generator, a: np.ndarray, b: np.ndarray):
    x = rng.normal(size=(n, 32)).astype("float32")
    regression = 45.0 * np.tanh(x @ a)
    label = (x @ b > 0).astype("float32")
    return x, {"regression_output": regression.astype("float32"), "classification_output": label}


def build_model() -> keras.Model:
    inp = layers.Input((32,))
    x = layers.Dense(32, activation="relu")(inp)
    x = layers.Dense(4, activation="relu")(x)  # the narrow shared trunk the two tasks compete for
    regression = layers.Dense(1, name="regression_output")(x)
    classification = layers.Dense(1, activation="sigmoid", name="classification_output")(x)
    return keras.Model(inp, [regression, classification])


def two_tasks(outputs, targets):
    """``regression`` (MSE, large) and ``classification`` (binary cross-entropy, ~0.7 at the start)."""
    mse = tf.reduce_mean(tf.square(outputs["regression_output"] - targets["regression_output"]))
    bce = tf.reduce_mean(
        keras.losses.binary_crossentropy(targets["classification_output"], outputs["classification_output"])
    )
    return {"regression": mse, "classification": bce}


def build(
    *,
    batch_size: int,
    seed: int,
    learning_rate: float = 1e-3,
    regression_weight: float = 1.0,
    classification_weight: float = 1.0,
) -> Task:
    """Parameters (``--set NAME=VALUE``): Adam's learning rate, each loss's weight. The aggregator: ``--aggregator``."""
    rng = np.random.default_rng(seed)
    a, c = rng.normal(size=(2, 32, 1)).astype("float32") / np.sqrt(32.0)
    b = -0.8 * a + 0.6 * c
    x, y = make_data(TRAIN, rng, a, b)
    xv, yv = make_data(VALIDATION, rng, a, b)
    return Task(
        model=build_model(),
        loss=two_tasks,
        train=(x, y),
        validation=(xv, yv),
        metrics={"regression_output": ["mae"], "classification_output": ["binary_accuracy"]},
        loss_weights={"regression": regression_weight, "classification": classification_weight},
        optimizer=keras.optimizers.Adam(learning_rate),
        epochs=8,
    )
