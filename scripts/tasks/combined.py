"""Built-in task ``combined``: seed 002's combined loss, 0.5·BCE + 0.5·MSE on one sigmoid output, both parts logged.

Synthetic data: 20 features, a binary label from a noisy linear rule. The loss returns ``{"bce", "mse"}`` and the
weights 0.5/0.5 come from ``loss_weights``, so ``loss`` is the optimised mix and each part has its own curve.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from trainer import Task

TRAIN, VALIDATION = 8192, 2048


def bce_mse(outputs, targets):
    y, p = targets["output"], outputs["output"]
    return {
        "bce": tf.reduce_mean(keras.losses.binary_crossentropy(y, p)),
        "mse": tf.reduce_mean(keras.losses.mean_squared_error(y, p)),
    }


def build(
    *, batch_size: int, seed: int, learning_rate: float = 1e-3, bce_weight: float = 0.5, mse_weight: float = 0.5
) -> Task:
    """Parameters (``--set NAME=VALUE``): Adam's learning rate and the two parts' weights (0.5·BCE + 0.5·MSE)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(20, 1)).astype("float32")

    def data(n: int):
        x = rng.normal(size=(n, 20)).astype("float32")
        y = ((x @ w + rng.normal(scale=1.0, size=(n, 1))) > 0).astype("float32")
        return x, {"output": y}  # NumPy: batched with --batch-size, reshuffled by fit from (seed, epoch)

    inp = layers.Input((20,))
    hidden = layers.Dense(32, activation="relu")(inp)
    model = keras.Model(inp, layers.Dense(1, activation="sigmoid")(hidden))
    return Task(
        model=model,
        loss=bce_mse,
        loss_weights={"bce": bce_weight, "mse": mse_weight},
        train=data(TRAIN),
        validation=data(VALIDATION),
        metrics={"output": ["accuracy"]},
        optimizer=keras.optimizers.Adam(learning_rate),
        epochs=5,
    )
