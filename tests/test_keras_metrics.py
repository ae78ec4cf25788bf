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


# -- monitoring a logged value: EarlyStopping, ModelCheckpoint, ReduceLROnPlateau ---------------------------------


def _classifier() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = layers.Input((5,))
    return keras.Model(inp, layers.Dense(3, activation="softmax")(layers.Dense(8, activation="relu")(inp)))


def _monitors(key: str, directory) -> list[keras.callbacks.Callback]:
    return [
        keras.callbacks.EarlyStopping(monitor=key, patience=1, min_delta=0.01),
        keras.callbacks.ReduceLROnPlateau(monitor=key, patience=0, factor=0.5, min_delta=0.01),
        keras.callbacks.ModelCheckpoint(
            str(directory / "best.weights.h5"), monitor=key, save_best_only=True, save_weights_only=True
        ),
    ]


def test_monitoring_a_metric_in_auto_mode_finds_its_direction_as_fit_does(tmp_path):
    """``monitor="val_accuracy"`` with the default ``mode="auto"``: Keras looks the metric up in the compiled model's
    metrics to learn that accuracy goes up; a Trainer's model is not compiled, and Keras raised "isn't able to
    automatically determine whether that metric should be maximized" after the first epoch."""
    rng = np.random.default_rng(3)
    x, labels = rng.normal(size=(96, 5)).astype("float32"), rng.integers(0, 3, 96)
    args = {"batch_size": 16, "epochs": 8, "shuffle": False, "validation_split": 0.25}
    compiled = {"loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}
    model = _classifier()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.3), **compiled)
    (tmp_path / "keras").mkdir(), (tmp_path / "ours").mkdir()
    keras_monitors = _monitors("val_accuracy", tmp_path / "keras")
    theirs = twin.fit(x, labels, callbacks=keras_monitors, verbose=0, **args).history
    monitors = _monitors("val_accuracy", tmp_path / "ours")
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.3), **compiled)
    ours = trainer.fit(x, labels, callbacks=monitors, progress=False, **args).history
    assert len(ours["loss"]) == len(theirs["loss"]) < 8  # stopped at the same epoch, before the last
    assert_history_close(ours, theirs, {k: k for k in ("loss", "accuracy", "val_loss", "val_accuracy")})
    np.testing.assert_allclose(ours["lr"], theirs["learning_rate"], rtol=1e-6)
    final_rate = float(trainer.optimizer.learning_rate)
    assert final_rate == pytest.approx(float(twin.optimizer.learning_rate)) and final_rate < 0.3  # a plateau was found
    assert [m.best for m in monitors] == pytest.approx([m.best for m in keras_monitors])
    assert all(m.mode == "auto" for m in monitors)  # left as given
    best, keras_best = _classifier(), _classifier()
    best.load_weights(tmp_path / "ours" / "best.weights.h5")
    keras_best.load_weights(tmp_path / "keras" / "best.weights.h5")
    helpers.assert_weights_close(best, keras_best)


def test_monitoring_an_outputs_metric_or_a_loss_component_in_auto_mode():
    """Several outputs: ``val_<output>/<metric>`` goes by the metric's direction, and a loss component (Keras'
    ``val_<output>_loss``, which Keras' auto mode cannot place) is minimised."""
    x, y = helpers.example1_data(96)
    compiled = {"loss": {"regression_output": "mse", "classification_output": "categorical_crossentropy"},
                "metrics": {"classification_output": ["accuracy"]}}  # fmt: skip
    args = {"batch_size": 16, "epochs": 8, "shuffle": False, "validation_split": 0.25, "progress": False}
    for key, mode in [("val_classification_output/accuracy", "max"), ("val_regression_output", "min")]:
        runs = {}
        for given in ("auto", mode):
            stop = keras.callbacks.EarlyStopping(monitor=key, patience=1, min_delta=0.005, mode=given)
            keras.utils.set_random_seed(0)
            trainer = Trainer(helpers.example1(), optimizer=keras.optimizers.SGD(0.05), **compiled)
            runs[given] = (trainer.fit(x, y, callbacks=[stop], **args).history[key], stop.best)
        assert runs["auto"] == runs[mode], key


def _refused(trainer: Trainer, x, y, callback, message: str, **args) -> None:
    before = helpers.weights(trainer.model)
    with pytest.raises(ValueError, match=message):
        trainer.fit(x, y, callbacks=[callback], epochs=2, progress=False, **args)
    assert all(np.array_equal(a, b) for a, b in zip(before, helpers.weights(trainer.model)))


def test_a_monitor_that_cannot_be_followed_is_named_before_any_update():
    x, y = helpers.example1_data(32)
    metrics = {"classification_output": ["accuracy"], "gap": lambda o, t: keras.ops.mean(o["regression_output"])}
    trainer = Trainer(helpers.example1(), loss={"regression_output": "mse"}, metrics=metrics)
    keras_name = keras.callbacks.EarlyStopping(monitor="val_classification_output_accuracy")
    hint = r"that is Keras' name for 'val_classification_output/accuracy'; logged keys: 'classification_output/acc"
    _refused(trainer, x, y, keras_name, "EarlyStopping monitors 'val_classification_output_accuracy': " + hint,
             validation_split=0.25)  # fmt: skip
    _refused(trainer, x, y, keras.callbacks.ModelCheckpoint("m.keras", monitor="val_loss", save_best_only=True),
             r"ModelCheckpoint monitors 'val_loss', which is logged only with validation data")  # fmt: skip
    unlogged = r"EarlyStopping monitors 'mAP', which tapeloop does not log \(a key your own callback adds to the logs"
    _refused(trainer, x, y, keras.callbacks.EarlyStopping(monitor="mAP"), unlogged)
    _refused(
        trainer,
        x,
        y,
        keras.callbacks.ReduceLROnPlateau(monitor="gap"),
        r"ReduceLROnPlateau cannot tell whether 'gap' should go up or down .* pass mode='min' or mode='max'",
    )


class _Score(keras.callbacks.Callback):
    """Adds ``val_score`` to every epoch's logs: 1, 3, 2, 2, ... (best at the second epoch)."""

    def on_epoch_end(self, epoch, logs=None):
        logs["val_score"] = [1.0, 3.0][epoch] if epoch < 2 else 2.0


def test_a_key_a_callback_adds_is_monitored_with_a_mode():
    x, y = helpers.example1_data(32)
    stop = keras.callbacks.EarlyStopping(monitor="val_score", mode="max", patience=1)
    trainer = Trainer(helpers.example1(), loss={"regression_output": "mse"})
    history = trainer.fit(x, y, epochs=6, callbacks=[_Score(), stop], progress=False).history
    assert history["val_score"] == [1.0, 3.0, 2.0] and stop.best == 3.0
