"""The loss protocol: losses over several outputs, named components, weights, loss layers — against NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from losses import LossProtocolError, components
from tests import helpers
from trainer import Trainer


def _two_heads(seed: int = 0) -> keras.Model:
    """x (4) -> a = x·Wa (box-like regression), c = x·Wc (a gate logit); no biases, so the algebra stays small."""
    inp = keras.layers.Input((4,))
    a = keras.layers.Dense(1, use_bias=False, name="a")(inp)
    c = keras.layers.Dense(1, use_bias=False, name="c")(inp)
    model = keras.Model(inp, {"a": a, "c": c})
    rng = np.random.default_rng(seed)
    model.get_layer("a").set_weights([rng.normal(size=(4, 1)).astype("float32")])
    model.get_layer("c").set_weights([rng.normal(size=(4, 1)).astype("float32")])
    return model


def gated(outputs, targets):
    """The regression error counts as much as the gate believes in it: reads both outputs (SSD's loc-needs-conf)."""
    gate = tf.sigmoid(outputs["c"])
    return {
        "gated": tf.reduce_mean(gate * tf.square(outputs["a"] - targets["y"])),
        "gate_bce": tf.reduce_mean(keras.losses.binary_crossentropy(targets["label"], outputs["c"], from_logits=True)),
    }


def _numpy_gated(x, wa, wc, y, label):
    a, c = x @ wa, x @ wc
    s = 1 / (1 + np.exp(-c))
    n = len(x)
    gated_value = np.mean(s * (a - y) ** 2)
    bce = np.mean(-(label * np.log(s) + (1 - label) * np.log(1 - s)))
    d_a = 2 * s * (a - y) / n
    d_c = s * (1 - s) * (a - y) ** 2 / n + (s - label) / n
    return gated_value, bce, x.T @ d_a, x.T @ d_c


def test_loss_reading_two_outputs_value_and_one_sgd_step_match_numpy():
    model = _two_heads()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    label = rng.integers(0, 2, (8, 1)).astype("float32")
    wa, wc = (model.get_layer(n).get_weights()[0].astype("float64") for n in "ac")
    g, b, grad_a, grad_c = _numpy_gated(x.astype("float64"), wa, wc, y, label)

    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.1), loss=gated)
    logs = trainer.evaluate((x, {"y": y, "label": label}), batch_size=8)
    assert logs == pytest.approx({"loss": g + b, "gated": g, "gate_bce": b}, rel=1e-5)

    history = trainer.fit((x, {"y": y, "label": label}), batch_size=8, epochs=1, progress=False).history
    assert history["gated"] == pytest.approx([g], rel=1e-5)  # logged before the update of this step
    np.testing.assert_allclose(model.get_layer("a").get_weights()[0], wa - 0.1 * grad_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_layer("c").get_weights()[0], wc - 0.1 * grad_c, rtol=1e-5, atol=1e-6)


def test_named_losses_give_prefixed_keys_and_weights_multiply():
    model = _two_heads()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 4)).astype("float32")
    targets = {"y": rng.normal(size=(10, 1)).astype("float32"), "label": np.ones((10, 1), "float32")}
    trainer = Trainer(
        model,
        loss={"det": gated, "aux": lambda o, t: tf.reduce_mean(tf.abs(o["a"]))},
        loss_weights={"det": 2.0, "det/gate_bce": 0.5, "aux": 3.0},
    )
    logs = trainer.evaluate((x, targets), batch_size=4)
    assert list(logs) == ["loss", "det/gated", "det/gate_bce", "aux"]
    wa, wc = (model.get_layer(n).get_weights()[0] for n in "ac")
    g, b, _, _ = _numpy_gated(x.astype("float64"), wa, wc, targets["y"], targets["label"])
    aux = np.mean(np.abs(x @ wa))
    assert logs["det/gated"] == pytest.approx(g, rel=1e-5)
    assert logs["aux"] == pytest.approx(aux, rel=1e-5)
    assert logs["loss"] == pytest.approx(2.0 * g + 2.0 * 0.5 * b + 3.0 * aux, rel=1e-5)


def test_seed002_combined_bce_mse_parts_logged_and_total_is_weighted_sum():
    """Seed 002: 0.5·BCE + 0.5·MSE on one output, both parts watched. SGD with lr 0 keeps weights fixed, so each
    epoch value is the dataset mean, computed here with NumPy (30 examples, batch 8: a partial batch of 6)."""
    inp = keras.layers.Input((5,))
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(inp))

    def bce_mse(outputs, targets):
        y, p = targets["output"], outputs["output"]
        return {
            "bce": tf.reduce_mean(keras.losses.binary_crossentropy(y, p)),
            "mse": tf.reduce_mean(keras.losses.mean_squared_error(y, p)),
        }

    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 5)).astype("float32")
    y = rng.integers(0, 2, (30, 1)).astype("float32")
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.0), loss=bce_mse, loss_weights={"bce": 0.5, "mse": 0.5})
    history = trainer.fit((x, {"output": y}), batch_size=8, epochs=2, progress=False).history
    p = np.clip(model.predict(x, verbose=0).astype("float64"), 1e-7, 1 - 1e-7)
    bce = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
    mse = np.mean((p - y) ** 2)
    assert set(history) == {"loss", "bce", "mse", "lr"}
    np.testing.assert_allclose(history["bce"], [bce, bce], rtol=1e-5)
    np.testing.assert_allclose(history["mse"], [mse, mse], rtol=1e-5)
    np.testing.assert_allclose(history["loss"], [0.5 * bce + 0.5 * mse] * 2, rtol=1e-5)


class LearnedScale(keras.layers.Layer):
    """A loss that owns a trainable variable: exp(-s)·MSE + s (one term of uncertainty weighting)."""

    def build(self, input_shape=None):
        self.s = self.add_weight(shape=(), initializer="zeros", name="log_variance")

    def call(self, outputs, targets):
        mse = tf.reduce_mean(tf.square(outputs["output"] - targets["output"]))
        return {"mse": mse, "s": tf.identity(self.s)}


def test_loss_layer_with_trainable_variable_is_trained():
    inp = keras.layers.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    layer = LearnedScale()

    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = (3.0 * x[:, :1]).astype("float32")
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss={"main": layer})
    trainer.fit((x, {"output": y}), batch_size=8, epochs=2, progress=False)
    assert layer.s.numpy() != 0.0  # the gradient of `s` is exp(-s)·0 + 1 on the "s" component: it moves
    assert any(v is layer.s for v in trainer.trainable_variables)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "returned None"),
        (tf.ones([3]), "returned shape (3,)"),
        (tf.constant(1), "int32 tensor"),
        ({"a": {"b": tf.constant(1.0)}}, "nested dict"),
        ({}, "empty dict"),
        ({1: tf.constant(1.0)}, "component keys [1]"),
        ("text", "string tensor"),
        (object(), "not a tensor"),
    ],
)
def test_components_rejects_what_the_protocol_does_not_allow(value, message):
    with pytest.raises(LossProtocolError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        components("det", value)


def test_components_key_rules():
    one = tf.constant(1.0)
    assert list(components(None, one)) == ["loss"]
    assert list(components(None, {"loc": one, "conf": one})) == ["loc", "conf"]
    assert list(components("det", one)) == ["det"]
    assert list(components("det", {"loc": one})) == ["det/loc"]
    assert components("x", 2.5)["x"].dtype == tf.float32


def test_dict_entries_keras_function_and_exec_defined_function():
    """A Keras loss *function* is per-output; a function made by exec (``__module__`` None) is a protocol loss."""
    namespace = {"tf": tf}
    exec("def mean_output(outputs, targets):\n    return tf.reduce_mean(outputs['output'])", namespace)
    inp = keras.layers.Input((2,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    x = np.random.default_rng(6).normal(size=(12, 2)).astype("float32")
    y = np.random.default_rng(7).normal(size=(12, 1)).astype("float32")
    trainer = Trainer(model, loss={"output": keras.losses.mean_squared_error, "mean": namespace["mean_output"]})
    logs = trainer.evaluate((x, {"output": y}), batch_size=5)
    p = model.predict(x, verbose=0).astype("float64")
    assert logs["output"] == pytest.approx(np.mean((p - y) ** 2), rel=1e-5)
    assert logs["mean"] == pytest.approx(np.mean(p), rel=1e-5, abs=1e-6)


def _gated(outputs, targets):
    error = tf.reduce_mean(tf.square(outputs["output"] - targets["output"]))
    if error > 1.0:  # a Python `if` on a tensor: autograph turns it into a tf.cond
        return {"mse": error, "big": tf.ones(())}
    return {"mse": error, "big": tf.zeros(())}


class _Gated:  # the same, as a callable object
    def __call__(self, outputs, targets):
        return _gated(outputs, targets)


@pytest.mark.parametrize("loss", [_gated, _Gated()], ids=["function", "callable object"])
def test_a_loss_with_python_control_flow_on_tensors_runs_in_the_compiled_step(loss):
    """The compiled blocks are traced without autograph (converting tapeloop's own code cost ~3 s at a process's
    first fit); a user's loss is converted alone, so its `if` on a tensor still works — as it does eagerly."""
    x, y = helpers.small_data()
    histories = []
    for eager in (False, True):
        trainer = Trainer(helpers.small_model(dropout=0.0), optimizer=keras.optimizers.SGD(0.05), loss=loss,
                          run_eagerly=eager)  # fmt: skip
        histories.append(trainer.fit((x, y), batch_size=11, epochs=3, shuffle=False, progress=False).history)
    compiled, eager = histories
    assert compiled["big"] == eager["big"] and compiled["big"][0] > 0.0  # the branch taken per step, as eagerly
    np.testing.assert_allclose(compiled["mse"], eager["mse"], rtol=1e-5)
