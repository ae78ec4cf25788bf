"""Keras metrics in tapeloop, held against Model.fit: weighted metrics per output, a compiled model used as a layer
(its compile metrics stay its own) and a custom metric written as keras.io writes them."""

import keras
import numpy as np
import pytest
from keras import layers

from tests import helpers
from tests.helpers import assert_history_close
from trainer import Trainer


def test_weighted_metrics_per_output_use_that_outputs_sample_weights_as_in_fit():
    x, y = helpers.example1_data(48)
    model = helpers.example1()
    twin = helpers.clone(model)
    losses = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}
    compiled = {"loss": losses, "weighted_metrics": {"classification_output": ["accuracy"], "regression_output": "mae"}}
    twin.compile(optimizer=keras.optimizers.SGD(0.05), **compiled)
    rng = np.random.default_rng(6)
    weights = {name: rng.uniform(0.1, 3.0, len(x)).astype("float32") for name in losses}  # each output its own
    args = {"batch_size": 8, "epochs": 2, "shuffle": False}
    in_order = [weights[name] for name in losses]  # Keras: in y's structure, here a list in output order
    theirs = twin.fit(x, [y[name] for name in losses], sample_weight=in_order, verbose=0, **args).history
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), **compiled)
    ours = trainer.fit(x, y, sample_weight=weights, progress=False, **args).history
    keys = {
        "classification_output/accuracy": "classification_output_accuracy",
        "regression_output/mae": "regression_output_mae",
        "loss": "loss",
    }
    assert_history_close(ours, theirs, keys)
    with pytest.raises(TypeError, match=r"a callable metric\(outputs, targets\) goes in `metrics`"):
        Trainer(model, loss=losses, weighted_metrics={"mine": lambda outputs, targets: 0.0})


def test_a_compiled_model_used_as_a_layer_keeps_its_compile_metrics_to_itself_as_in_fit():
    """Transfer learning with a compiled (e.g. loaded) base model: Keras logs the layers' own metrics but not a
    nested model's loss tracker and compile metrics; neither does tapeloop (they would collide with `loss`)."""
    x, y = helpers.small_data(48)
    y = y["output"]
    keras.utils.set_random_seed(0)
    inp = layers.Input((5,))
    base = keras.Model(inp, layers.Dense(4)(inp))
    base.compile(optimizer="adam", loss="mse", metrics=["mae"])
    base.fit(x, x[:, :4], verbose=0)
    outer_input = layers.Input((5,))
    model = keras.Model(outer_input, layers.Dense(1)(base(outer_input)))
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    theirs = twin.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss="mse")
    ours = trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, progress=False).history
    assert sorted(ours) == ["loss", "lr"] and sorted(theirs) == ["loss"]
    assert_history_close(ours, theirs, {"loss": "loss"})


class AboveRate(keras.metrics.Metric):
    """A custom metric written as keras.io writes them: a required argument and no ``get_config``."""

    def __init__(self, threshold, name="above_rate", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.hits = self.add_variable(shape=(), initializer="zeros", name="hits")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        above = keras.ops.cast(y_pred > self.threshold, "float32")
        self.hits.assign_add(keras.ops.sum(above))
        self.count.assign_add(keras.ops.cast(keras.ops.size(above), "float32"))

    def result(self):
        return self.hits / keras.ops.maximum(self.count, 1.0)


def test_a_custom_metric_without_get_config_is_used_itself_as_fit_uses_it():
    """Its config cannot rebuild it (TypeError: missing 'threshold'); tapeloop now uses the object, as Keras does."""
    x, y = helpers.small_data(64)
    y = y["output"]
    runs = {}
    for who in ("keras", "tapeloop"):
        model, metric = helpers.small_model(dropout=0.0), AboveRate(0.5)
        if who == "keras":
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", metrics=[metric])
            history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, validation_data=(x, y))
        else:
            trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.01), loss="mse", metrics=[metric])
            history = trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, progress=False, validation_data=(x, y))
        runs[who] = (history.history, float(metric.result()))
    keys = ("above_rate", "val_above_rate", "loss")
    assert_history_close(runs["tapeloop"][0], runs["keras"][0], {key: key for key in keys})
    assert runs["tapeloop"][1] == pytest.approx(runs["keras"][1])  # the object holds the last evaluation's value
