"""Built-in task ``digits``: scikit-learn's bundled 8x8 digits, a classifier head and a reconstruction head.

One loss reads both outputs: ``ce`` (the classifier's cross-entropy) and ``recon`` (the decoder's error on the
pixels), plus ``agreement``: the reconstruction error counts more on examples the classifier gets right, so the
shared code is pushed to keep what the class needs. The data set ships with scikit-learn (no download).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers
from sklearn.datasets import load_digits

from trainer import Task


def joint_loss(outputs, targets):
    probs, recon = outputs["label"], outputs["pixels"]
    ce = keras.losses.sparse_categorical_crossentropy(targets["label"], probs)
    per_example = tf.reduce_mean(tf.square(recon - targets["pixels"]), axis=-1)
    p_true = tf.gather(probs, tf.cast(targets["label"], tf.int32), batch_dims=1)
    return {
        "ce": tf.reduce_mean(ce),
        "recon": tf.reduce_mean(per_example),
        "agreement": tf.reduce_mean(tf.stop_gradient(p_true) * per_example),
    }


def build(
    *,
    batch_size: int,
    seed: int,
    learning_rate: float = 2e-3,
    ce_weight: float = 1.0,
    recon_weight: float = 1.0,
    agreement_weight: float = 1.0,
) -> Task:
    """Parameters (``--set NAME=VALUE``): Adam's learning rate and the weight of each part of the loss."""
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    train, val = order[:1437], order[1437:]

    def data(index):  # NumPy: train.py batches it with --batch-size; fit reshuffles it from (seed, epoch)
        return x[index], {"label": y[index], "pixels": x[index]}

    inp = layers.Input((64,))
    code = layers.Dense(32, activation="relu")(layers.Dense(128, activation="relu")(inp))
    label = layers.Dense(10, activation="softmax", name="label")(code)
    pixels = layers.Dense(64, activation="sigmoid", name="pixels")(layers.Dense(128, activation="relu")(code))
    return Task(
        model=keras.Model(inp, {"label": label, "pixels": pixels}),
        loss=joint_loss,
        train=data(train),
        validation=data(val),
        metrics={"label": ["accuracy"]},
        loss_weights={"ce": ce_weight, "recon": recon_weight, "agreement": agreement_weight},
        optimizer=keras.optimizers.Adam(learning_rate),
        epochs=30,
    )
