"""Trainer with Keras-style per-output losses against keras.Model.fit: same model, weights, batches and SGD.

Keras 3.15 weights its per-output loss trackers by the *static* batch size (``compile_utils.py``:
``sample_weight=tree.flatten(y_p)[0].shape[0]``), which is None inside ``fit``'s graph, so with a partial last batch
its per-output epoch values are unweighted means of batch means and no longer sum to ``loss``. tapeloop weights every
key by batch size (DESIGN.md). Per-output values are therefore compared on full batches; with a partial batch the
total, the weights and the per-output values (against NumPy) are checked separately.
"""

import keras
import numpy as np
import pytest

from tests import helpers
from trainer import Trainer

KERAS_LOSSES_1 = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}
METRICS_1 = {"regression_output": ["mae"], "classification_output": ["accuracy"]}


def _fit_both(model, losses, metrics, data, *, epochs, batch_size, val=None):
    keras_model = helpers.clone(model)
    keras_model.compile(optimizer=keras.optimizers.SGD(0.05), loss=losses, metrics=metrics)
    keras_hist = keras_model.fit(
        *data, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0, validation_data=val
    ).history
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss=losses, metrics=metrics)
    ours = trainer.fit(data, batch_size=batch_size, epochs=epochs, shuffle=False, progress=False, validation_data=val)
    return keras_model, keras_hist, ours.history


def _assert_same(keras_hist, ours, outputs, metric_keys=()):
    for prefix in ["", "val_"] if "val_loss" in keras_hist else [""]:
        np.testing.assert_allclose(ours[prefix + "loss"], keras_hist[prefix + "loss"], rtol=1e-4, atol=1e-5)
        for out in outputs:
            np.testing.assert_allclose(
                ours[f"{prefix}{out}"], keras_hist[f"{prefix}{out}_loss"], rtol=1e-4, atol=1e-5, err_msg=out
            )
        for out, metric in metric_keys:
            np.testing.assert_allclose(
                ours[f"{prefix}{out}/{metric}"], keras_hist[f"{prefix}{out}_{metric}"], rtol=1e-4, atol=1e-5
            )


def test_example1_matches_keras_fit():
    model = helpers.example1()
    data = helpers.example1_data(96)  # full batches: see the module docstring
    val = helpers.example1_data(20, seed=1)
    keras_model, keras_hist, ours = _fit_both(model, KERAS_LOSSES_1, METRICS_1, data, epochs=3, batch_size=32, val=val)
    _assert_same(
        keras_hist, ours, KERAS_LOSSES_1, [("regression_output", "mae"), ("classification_output", "accuracy")]
    )
    assert sorted(set(ours) - {"lr"}) == sorted(
        f"{p}{k}"
        for p in ("", "val_")
        for k in ("loss", *KERAS_LOSSES_1, "regression_output/mae", "classification_output/accuracy")
    )
    for a, b in zip(helpers.weights(model), helpers.weights(keras_model)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_example1_partial_batch_matches_keras_total_and_weights():
    model = helpers.example1()
    data = helpers.example1_data(70)  # 70 = 2 x 32 + a partial batch of 6
    keras_model, keras_hist, ours = _fit_both(model, KERAS_LOSSES_1, None, data, epochs=2, batch_size=32)
    np.testing.assert_allclose(ours["loss"], keras_hist["loss"], rtol=1e-5)
    for a, b in zip(helpers.weights(model), helpers.weights(keras_model)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Each component is the batch-weighted mean, so the components sum to the total (they do not in Keras).
    np.testing.assert_allclose(ours["loss"], np.add(ours["regression_output"], ours["classification_output"]), 1e-6)


def test_example2_fixed_to_28x28_matches_keras_fit():
    model = helpers.example2(image_size=28)
    losses = {"vector_output": "binary_crossentropy", "image_output": "mse"}
    metrics = {"vector_output": ["accuracy"], "image_output": ["mae"]}
    keras_model, keras_hist, ours = _fit_both(model, losses, metrics, helpers.example2_data(24), epochs=2, batch_size=8)
    _assert_same(keras_hist, ours, losses, [("vector_output", "accuracy"), ("image_output", "mae")])
    for a, b in zip(helpers.weights(model), helpers.weights(keras_model)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_example1_with_l2_regularizer_matches_keras_and_logs_regularization():
    model = helpers.example1(regularizer=0.01)
    keras_model, keras_hist, ours = _fit_both(
        model, KERAS_LOSSES_1, None, helpers.example1_data(48), epochs=2, batch_size=16
    )
    _assert_same(keras_hist, ours, KERAS_LOSSES_1)
    # Keras folds model.losses into `loss`; tapeloop also shows them as their own component.
    keras_regularization = np.array(keras_hist["loss"]) - sum(np.array(keras_hist[f"{k}_loss"]) for k in KERAS_LOSSES_1)
    np.testing.assert_allclose(ours["regularization"], keras_regularization, rtol=1e-3)
    assert min(ours["regularization"]) > 0
    for a, b in zip(helpers.weights(model), helpers.weights(keras_model)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_add_loss_from_a_layer_matches_keras_fit():
    """Activity regularization reaches the loss through ``add_loss`` during the call, not through a weight."""
    inp = keras.layers.Input((100,))
    x = keras.layers.Dense(16, activation="relu")(inp)
    x = keras.layers.ActivityRegularization(l1=0.01)(x)
    r = keras.layers.Dense(1, name="regression_output")(x)
    c = keras.layers.Dense(3, activation="softmax", name="classification_output")(x)
    model = keras.Model(inp, [r, c])
    keras_model, keras_hist, ours = _fit_both(
        model, KERAS_LOSSES_1, None, helpers.example1_data(32), epochs=2, batch_size=16
    )
    _assert_same(keras_hist, ours, KERAS_LOSSES_1)
    assert min(ours["regularization"]) > 0
    for a, b in zip(helpers.weights(model), helpers.weights(keras_model)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    ("output_units", "labels", "expected"),
    [
        (1, "binary", keras.metrics.BinaryAccuracy),
        (3, "sparse", keras.metrics.SparseCategoricalAccuracy),
        (3, "onehot", keras.metrics.CategoricalAccuracy),
    ],
)
def test_accuracy_resolves_like_keras(output_units, labels, expected):
    inp = keras.layers.Input((4,))
    out = keras.layers.Dense(output_units, activation="sigmoid" if output_units == 1 else "softmax", name="out")(inp)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    x = rng.random((30, 4), dtype=np.float32)
    y = {
        "binary": rng.integers(0, 2, (30, 1)).astype("float32"),
        "sparse": rng.integers(0, 3, (30,)),
        "onehot": np.eye(3, dtype="float32")[rng.integers(0, 3, 30)],
    }[labels]
    loss = {"binary": "binary_crossentropy", "sparse": "sparse_categorical_crossentropy"}.get(
        labels, "categorical_crossentropy"
    )
    keras_model = helpers.clone(model)
    keras_model.compile(optimizer="sgd", loss=loss, metrics=["accuracy"])
    keras_acc = keras_model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)["accuracy"]
    trainer = Trainer(model, optimizer="sgd", loss={"output": loss}, metrics={"output": ["accuracy"]})
    result = trainer.evaluate((x, {"output": y}), batch_size=8)
    assert type(trainer.runner.trackers["eval"].metrics["output/accuracy"]) is expected
    assert result["output/accuracy"] == pytest.approx(keras_acc, abs=1e-6)


@pytest.mark.parametrize("layer", ["Dropout", "GaussianNoise", "BatchNormalization"])
def test_random_and_batch_statistics_layers_train_as_in_fit(layer):
    """Two models built alike (a clone would get other dropout seeds): the same masks and noise draws, step by step,
    and the same moving statistics — the forward pass runs once per step in training mode, as in Model.fit."""

    def build():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6,))
        hidden = keras.layers.Dense(16, activation="relu")(inp)
        made = {
            "Dropout": lambda: keras.layers.Dropout(0.3),
            "GaussianNoise": lambda: keras.layers.GaussianNoise(0.1),
            "BatchNormalization": keras.layers.BatchNormalization,
        }
        hidden = made[layer]()(hidden)
        return keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(hidden))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) > 0).astype("float32")
    model, twin = build(), build()
    args = {"batch_size": 16, "epochs": 2, "shuffle": False, "validation_split": 0.25}
    twin.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy", steps_per_execution=2)
    theirs = twin.fit(x, y, verbose=0, **args).history
    trainer = Trainer(model, optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy", steps_per_execution=2)
    ours = trainer.fit(x, y, progress=False, **args).history
    helpers.assert_history_close(ours, theirs, {"loss": "loss", "val_loss": "val_loss"})
    for a, b in zip(model.variables, twin.variables, strict=True):  # moving statistics and RNG states included
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=helpers.RTOL, atol=helpers.ATOL, err_msg=a.path)
