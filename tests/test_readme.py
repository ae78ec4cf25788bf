"""The README's examples run as written."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer import Trainer


def test_readme_multibox_example_trains_with_the_documented_keys():
    multibox = helpers.readme_definition("multibox")
    anchors, classes = 6, 3
    inp = keras.layers.Input((8,))
    boxes = keras.layers.Reshape((anchors, 4), name="boxes")(keras.layers.Dense(anchors * 4)(inp))
    logits = keras.layers.Reshape((anchors, classes), name="classes")(keras.layers.Dense(anchors * classes)(inp))
    aux = keras.layers.Dense(1, name="aux")(inp)
    model = keras.Model(inp, {"boxes": boxes, "classes": logits, "aux": aux})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8)).astype("float32")
    y = {
        "boxes": rng.normal(size=(20, anchors, 4)).astype("float32"),
        "classes": rng.integers(0, classes, (20, anchors)),
        "aux": rng.normal(size=(20, 1)).astype("float32"),
    }
    train_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    trainer = Trainer(model, optimizer="adam", loss={"det": multibox, "aux": "mse"}, loss_weights={"det/loc": 2.0})
    history = trainer.fit(train_ds, epochs=2, validation_data=train_ds, progress=False)
    assert list(history.history) == [
        "loss", "det/loc", "det/conf", "aux", "lr", "val_loss", "val_det/loc", "val_det/conf", "val_aux"
    ]  # fmt: skip
    h = history.history
    np.testing.assert_allclose(h["val_loss"], 2 * np.array(h["val_det/loc"]) + h["val_det/conf"] + h["val_aux"], 1e-5)


def test_readme_seed002_example_logs_both_parts():
    bce_mse = helpers.readme_definition("bce_mse")
    inp = keras.layers.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(inp))
    x = np.random.default_rng(1).normal(size=(16, 3)).astype("float32")
    y = {"output": (x[:, :1] > 0).astype("float32")}
    trainer = Trainer(model, loss=bce_mse, loss_weights={"bce": 0.5, "mse": 0.5})
    assert set(trainer.fit((x, y), batch_size=8, progress=False).history) == {"loss", "bce", "mse", "lr"}


def test_readme_global_normalizer_example_matches_numpy():
    masked_mse = helpers.readme_definition("masked_mse")
    rng = np.random.default_rng(2)
    pred, depth = rng.normal(size=(2, 5, 5)), rng.normal(size=(2, 5, 5))
    mask = (rng.random((2, 5, 5)) > 0.5).astype("float64")
    value = masked_mse({"depth": tf.constant(pred)}, {"depth": tf.constant(depth), "mask": tf.constant(mask)})
    assert float(value) == pytest.approx((mask * (pred - depth) ** 2).sum() / mask.sum())
