"""Keras' output forms, held against Model.fit: a subclassed model's tuple outputs, nested and dict outputs and
their order, ``None`` for an output, compile's flat metrics list, loss and metric classes, and a target that only
broadcasts (a pinned difference); several outputs' targets in a dataset or a generator."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from tests import helpers
from tests.helpers import assert_history_close, assert_weights_close
from trainer import DataError, ShapeMismatchError, Trainer

X = np.random.default_rng(7).normal(size=(64, 5)).astype("float32")


def _dense3() -> keras.Model:
    keras.utils.set_random_seed(1)
    inp = layers.Input((5,))
    return keras.Model(inp, layers.Dense(3, name="probs")(inp))


class TwoHeads(keras.Model):
    """A subclassed model returning a tuple: it has no output names (Keras keys compile's lists by position)."""

    def __init__(self, nested: bool = False):
        super().__init__()
        self.nested = nested
        self.trunk, self.a, self.b = layers.Dense(4, activation="relu"), layers.Dense(1), layers.Dense(1)

    def call(self, x):
        h = self.trunk(x)
        return {"a": {"p": self.a(h)}, "b": self.b(h)} if self.nested else (self.a(h), self.b(h))


def test_a_subclassed_models_tuple_outputs_are_output_1_and_output_2_and_compiles_lists_match_fit():
    """Keras logs these losses by loss name (``mse_loss``, ``mae_loss``); tapeloop keys the tuple's outputs
    ``output_1``, ``output_2`` (tf.keras 2's names for them) — the lists were a TypeError."""
    x, y = X, [X[:, :1] * 2.0, X[:, 1:2] - 1.0]
    kwargs = {"loss": ["mse", "mae"], "loss_weights": [1.0, 0.5], "metrics": [["mae"], []]}
    values = {}
    for who in ("keras", "tapeloop"):
        keras.utils.set_random_seed(1)
        model = TwoHeads()
        if who == "keras":
            model.compile(optimizer=keras.optimizers.SGD(0.05), **kwargs)
            values[who] = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
        else:
            trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), **kwargs)
            values[who] = trainer.fit(x, y, batch_size=8, epochs=2, shuffle=False, progress=False).history
            assert list(trainer.predict(x)) == ["output_1", "output_2"]
        values[who + " weights"] = model.get_weights()
    keys = {"loss": "loss", "output_1": "mse_loss", "output_2": "mae_loss", "output_1/mae": "mae"}
    assert_history_close(values["tapeloop"], values["keras"], keys)
    for a, b in zip(values["tapeloop weights"], values["keras weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_nested_output_dict_is_named():
    """Keras takes nested outputs; tapeloop keys outputs one level deep (was: 'dict' has no attribute 'dtype')."""
    trainer = Trainer(TwoHeads(nested=True), loss={"b": "mse"})
    with pytest.raises(TypeError, match=r"output 'a' is a dict \(keys 'p'\).*one level deep.*'a_p'"):
        trainer.fit(X, {"b": X[:, :1]}, progress=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {
            "loss": {"regression_output": "mse", "classification_output": None},
            "metrics": {"classification_output": None},
        },
        {"loss": ["mse", None], "loss_weights": [2.0, 0.5]},  # a weight for an output without a loss weighs nothing
    ],
    ids=["dict", "list"],
)
def test_none_for_an_outputs_loss_or_metrics_means_none_as_in_compile(kwargs):
    """Keras takes ``None`` for an output that has no loss (or no metrics); tapeloop's dict form was a TypeError,
    and a loss weight for that output an unknown-key error."""
    x, y = helpers.example1_data(32)
    model = helpers.example1()
    ours, theirs, twin = helpers.fit_both(model, x, y, **kwargs)
    assert_history_close(ours, theirs, {"loss": "loss"})
    assert sorted(ours) == ["loss", "lr", "regression_output"]
    assert_weights_close(model, twin)


def test_a_flat_metrics_list_with_one_metric_per_output_is_compiles_per_output_form():
    """``metrics=["mae", "accuracy"]`` on a two-output model: Keras gives each output its entry (was an error)."""
    x, y = helpers.example1_data(32)
    kwargs = {"loss": ["mse", "categorical_crossentropy"], "metrics": ["mae", "accuracy"]}
    model = helpers.example1()
    ours, theirs, twin = helpers.fit_both(model, x, y, **kwargs)
    keys = {f"{out}/{metric}": f"{out}_{metric}" for out, metric in LIST_ORDER}
    assert_history_close(ours, theirs, {"loss": "loss", **keys})
    assert {key for key in ours if "/" in key} == set(keys)
    assert_weights_close(model, twin)


LIST_ORDER = [("regression_output", "mae"), ("classification_output", "accuracy")]  # model.output_names' order


def test_keras_loss_and_metric_classes_are_instantiated_as_compile_does():
    """``compile(loss=keras.losses.MeanSquaredError, metrics=[keras.metrics.MeanAbsoluteError])`` (classes, not
    objects): Keras makes one of each; tapeloop called the class as a loss(outputs, targets)."""
    x, y = X, X[:, :3]
    model = _dense3()
    kwargs = {"loss": keras.losses.MeanSquaredError, "metrics": [keras.metrics.MeanAbsoluteError]}
    ours, theirs, twin = helpers.fit_both(model, x, y, **kwargs)
    assert_history_close(ours, theirs, {"loss": "loss", "mean_absolute_error": "mean_absolute_error"})
    assert_weights_close(model, twin)


def test_a_target_that_only_broadcasts_against_the_output_is_refused_where_fit_trains_on_it():
    """Pinned difference: targets (B, 1) against an output (B, 3) with "mse" — Model.fit broadcasts and trains every
    column toward the one target, silently; tapeloop names both shapes before any update."""
    x, y = X, X[:, :1]
    twin = _dense3()
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    broadcast = np.mean((twin.predict(x, verbose=0) - y) ** 2)
    assert twin.evaluate(x, y, verbose=0) == pytest.approx(broadcast, rel=1e-5)  # Keras: the broadcast mean
    model = _dense3()
    before = helpers.weights(model)
    message = r"Output 'output' has shape \(32, 3\) but its target 'output' has shape \(32, 1\)"
    with pytest.raises(ShapeMismatchError, match=message):
        Trainer(model, loss="mse").fit(x, y, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(before, helpers.weights(model)))


def test_y_as_a_list_for_a_dict_output_model_follows_keras_output_order():
    """A functional model with dict outputs ``{"b": ..., "a": ...}``: Keras' ``output_names`` are sorted (a, b) and
    compile's lists and ``y=[...]`` follow them; tapeloop keyed ``y`` by the dict's insertion order (b, a), silently
    swapping two targets of the same shape."""
    x = X[:, :3]
    y = [x[:, :1] * 3.0, x[:, 1:2] - 2.0]  # targets for a, then b

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((3,))
        return keras.Model(inputs, {"b": layers.Dense(1, name="b")(inputs), "a": layers.Dense(1, name="a")(inputs)})

    model = build()
    assert model.output_names == ["a", "b"]
    ours, theirs, twin = helpers.fit_both(model, x, y, loss=["mse", "mae"])
    assert_history_close(ours, theirs, {"loss": "loss", "a": "a_loss", "b": "b_loss"})
    assert_weights_close(model, twin)


# -- targets for several outputs in a dataset or a generator ---------------------------------------------------------


@pytest.mark.parametrize("element", ["(x, (y1, y2))", "(x, (y1, y2), (w1, w2))", "(x, {name: y}, w)"])
def test_a_dataset_of_keras_multi_output_batches_matches_fit(element):
    """Targets and sample weights in a dataset element as Model.fit reads them: a tuple in output order, a dict by
    output name, one weight for every output."""
    x, y = helpers.example1_data(32)
    in_order = (y["regression_output"], y["classification_output"])
    rng = np.random.default_rng(2)
    w1, w2 = rng.uniform(0.2, 2.0, 32).astype("float32"), rng.uniform(0.2, 2.0, 32).astype("float32")
    parts = {"(x, (y1, y2))": (x, in_order), "(x, (y1, y2), (w1, w2))": (x, in_order, (w1, w2)),
             "(x, {name: y}, w)": (x, y, w1)}[element]  # fmt: skip
    dataset = tf.data.Dataset.from_tensor_slices(parts).batch(8)
    losses = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}
    model = helpers.example1()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss=losses)
    theirs = twin.fit(dataset, epochs=2, shuffle=False, verbose=0).history
    ours = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss=losses).fit(dataset, epochs=2, verbose=0).history
    assert_history_close(ours, theirs, {"loss": "loss", **{k: f"{k}_loss" for k in losses}})
    assert_weights_close(model, twin)


def test_a_dataset_whose_targets_do_not_fit_the_outputs_is_named():
    x, y = helpers.example1_data(16)
    three = (y["regression_output"], y["classification_output"], y["regression_output"])
    dataset = tf.data.Dataset.from_tensor_slices((x, three)).batch(8)
    trainer = Trainer(helpers.example1(), loss={"regression_output": "mse"})
    with pytest.raises(DataError, match=re.escape("y is a list of 3 arrays but the model has 2 outputs")):
        trainer.fit(dataset, epochs=1, verbose=0)


def test_a_python_generator_or_a_py_dataset_that_does_not_fit_the_outputs_is_named():
    x, y = helpers.example1_data(16)
    trainer = Trainer(helpers.example1(), loss={"regression_output": "mse"})
    with pytest.raises(DataError, match="a Python generator can be read only once"):
        trainer.fit(((x[i : i + 8], y) for i in (0, 8)), epochs=1, verbose=0)
    one_array = helpers.Batches(x, y["regression_output"], 8)
    with pytest.raises(DataError, match=re.escape("y is one array but the model has 2 outputs")):
        trainer.fit(one_array, epochs=1, verbose=0)
