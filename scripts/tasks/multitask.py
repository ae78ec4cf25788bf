"""Built-in task ``multitask``: seed 001's first model (regression + classification heads on a shared trunk) on
synthetic data, trained with one loss that reads both outputs and reports each part.

The data: x ~ N(0, 1)^100; the class is the argmax of three fixed random projections of x; the regression target is
another projection plus a class-dependent offset — so both heads must learn, and each part shows its own curve.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from trainer import Task

TRAIN, VALIDATION = 16384, 2048


def make_data(n: int, rng: np.random.Generator, projections: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x = rng.normal(size=(n, 100)).astype("float32")
    scores = x @ projections[:, :3]
    label = scores.argmax(axis=1)
    offsets = np.array([-1.0, 0.0, 1.0], "float32")
    regression = 0.5 * (x @ projections[:, 3:4]) + offsets[label, None]
    return x, {
        "regression_output": regression.astype("float32"),
        "classification_output": np.eye(3, dtype="float32")[label],
    }


def build_model() -> keras.Model:
    inp = layers.Input((100,))
    x = layers.Dense(64, activation="relu")(inp)
    x = layers.Dense(32, activation="relu")(x)
    regression = layers.Dense(1, name="regression_output")(x)
    classification = layers.Dense(3, activation="softmax", name="classification_output")(x)
    return keras.Model(inp, [regression, classification])


def joint_loss(outputs, targets):
    """One loss over both heads, each part logged: ``regression`` (MSE) and ``classification`` (cross-entropy)."""
    mse = tf.reduce_mean(tf.square(outputs["regression_output"] - targets["regression_output"]))
    ce = tf.reduce_mean(
        keras.losses.categorical_crossentropy(targets["classification_output"], outputs["classification_output"])
    )
    return {"regression": mse, "classification": ce}


def build(
    *,
    batch_size: int,
    seed: int,
    learning_rate: float = 1e-3,
    regression_weight: float = 1.0,
    classification_weight: float = 1.0,
) -> Task:
    """Parameters (``--set NAME=VALUE``): Adam's learning rate, and the weight of each part of the loss."""
    rng = np.random.default_rng(seed)
    projections = rng.normal(size=(100, 4)).astype("float32") / 10.0
    x, y = make_data(TRAIN, rng, projections)
    xv, yv = make_data(VALIDATION, rng, projections)
    return Task(
        model=build_model(),
        loss=joint_loss,
        train=(x, y),  # NumPy: batched with --batch-size, reshuffled from (seed, epoch): a checkpoint is a position
        validation=(xv, yv),
        metrics={"classification_output": ["accuracy"], "regression_output": ["mae"]},
        loss_weights={"regression": regression_weight, "classification": classification_weight},
        optimizer=keras.optimizers.Adam(learning_rate),
        epochs=10,
    )
