"""Held against code nobody here wrote: Model.fit/evaluate/predict on the same model, data and order.

Keras' epoch trackers weight batches by the *static* batch size, None in its graph, so with a partial last batch its
epoch values are unweighted means of batch means (see test_keras_parity.py). Every case here uses full batches.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers, ops

from tests import helpers
from tests.helpers import ATOL, RTOL, assert_history_close, assert_weights_close
from trainer import Trainer


def _single_output(seed: int = 0, units: int = 1, activation=None) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = layers.Input((5,))
    hidden = layers.Dense(8, activation="relu")(inp)
    return keras.Model(inp, layers.Dense(units, activation=activation)(hidden))


def _regression(n: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 5)).astype("float32")
    return x, (x @ rng.normal(size=(5, 1))).astype("float32"), rng.uniform(0.2, 2.0, n).astype("float32")


# -- fit(x, y, ...) as Keras takes it ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss", ["mse", keras.losses.MeanSquaredError(), keras.losses.mean_squared_error], ids=["str", "Loss", "fn"]
)
def test_single_output_loss_string_metric_list_sample_weight_and_validation_split_match_fit(loss):
    x, y, weights = _regression()
    model = _single_output()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss, metrics=["mae"])
    args = {"batch_size": 8, "epochs": 3, "shuffle": False, "sample_weight": weights, "validation_split": 0.2}
    theirs = twin.fit(x, y, verbose=0, **args).history
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss=loss, metrics=["mae"])
    ours = trainer.fit(x, y, progress=False, **args).history
    assert set(ours) == {"loss", "mae", "val_loss", "val_mae", "lr"}
    assert_history_close(ours, theirs, {k: k for k in ("loss", "mae", "val_loss", "val_mae")})
    assert_weights_close(model, twin)


def test_class_weight_matches_fit():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(48, 5)).astype("float32")
    y = rng.integers(0, 3, 48)
    model = _single_output(units=3, activation="softmax")
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    class_weight = {0: 1.0, 1: 3.0, 2: 0.25}  # the training examples only: the validation split is unweighted
    args = {"batch_size": 16, "epochs": 3, "shuffle": False, "class_weight": class_weight, "validation_split": 0.25}
    theirs = twin.fit(x, y, verbose=0, **args).history
    trainer = Trainer(
        model, optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    ours = trainer.fit(x, y, progress=False, **args).history
    assert_history_close(ours, theirs, {k: k for k in ("loss", "accuracy", "val_loss", "val_accuracy")})
    assert_weights_close(model, twin)


def _two_inputs() -> keras.Model:
    keras.utils.set_random_seed(0)
    first, second = layers.Input((5,), name="first"), layers.Input((3,), name="second")
    return keras.Model([first, second], layers.Dense(1)(layers.Concatenate()([first, second])))


def test_a_list_of_input_arrays_is_the_models_inputs_as_in_fit():
    """``fit([x1, x2], y)``: Keras' multi-input form (tf.data alone would stack the list into one tensor)."""
    x, y, _ = _regression()
    inputs = [x, x[:, :3] ** 2]
    model = _two_inputs()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    theirs = twin.fit(inputs, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss="mse")
    ours = trainer.fit(inputs, y, batch_size=8, epochs=2, shuffle=False, progress=False).history
    assert_history_close(ours, theirs, {"loss": "loss"})
    assert_weights_close(model, twin)
    assert trainer.evaluate(inputs, y, batch_size=8)["loss"] == pytest.approx(twin.evaluate(inputs, y, verbose=0))
    np.testing.assert_allclose(trainer.predict(inputs, batch_size=8)["output"], twin.predict(inputs, verbose=0),
                               rtol=RTOL, atol=ATOL)  # fmt: skip


class TripletNet(keras.Model):
    """Model.fit's side of a loss that reads no target: the mean triplet margin loss over the batch."""

    def __init__(self, network: keras.Model) -> None:
        super().__init__()
        self.network = network

    def call(self, x):
        return self.network(x)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kwargs):
        return ops.mean(ops.maximum(y_pred["ap"] - y_pred["an"] + 0.5, 0.0))


def _triplet_network() -> keras.Model:
    keras.utils.set_random_seed(0)
    embed = keras.Sequential([layers.Input((6,)), layers.Dense(8, "relu"), layers.Dense(4)])
    inputs = [layers.Input((6,), name=name) for name in ("anchor", "positive", "negative")]
    anchor, positive, negative = (embed(i) for i in inputs)
    distance = lambda a, b: ops.sum(ops.square(a - b), axis=-1)  # noqa: E731
    return keras.Model(inputs, {"ap": distance(anchor, positive), "an": distance(anchor, negative)})


@pytest.mark.parametrize("form", ["list", "dict", "pair-with-no-targets", "dataset-of-inputs"])
def test_inputs_alone_train_a_loss_that_reads_no_target_as_fit_x_does(form):
    rng = np.random.default_rng(4)
    a, p, n = (rng.normal(size=(48, 6)).astype("float32") for _ in range(3))
    reference = TripletNet(_triplet_network())
    reference.compile(optimizer=keras.optimizers.Adam(1e-2))
    theirs = reference.fit([a, p, n], batch_size=16, epochs=3, shuffle=False, verbose=0).history
    data = {
        "list": [a, p, n],
        "dict": {"anchor": a, "positive": p, "negative": n},
        "pair-with-no-targets": ([a, p, n], {}),
        "dataset-of-inputs": tf.data.Dataset.from_tensor_slices(((a, p, n),)).batch(16),
    }[form]
    model = _triplet_network()

    def triplet(outputs, targets):
        return tf.reduce_mean(tf.maximum(outputs["ap"] - outputs["an"] + 0.5, 0.0))

    batch = None if form == "dataset-of-inputs" else 16
    ours = Trainer(model, optimizer=keras.optimizers.Adam(1e-2), loss=triplet).fit(
        data, batch_size=batch, epochs=3, shuffle=False, progress=False
    )
    assert_history_close(ours.history, theirs, {"loss": "loss"})
    assert_weights_close(model, reference.network)


def test_per_output_sample_weights_and_y_as_a_list_match_fit():
    x, y = helpers.example1_data(32)
    rng = np.random.default_rng(5)
    weights = {"regression_output": rng.uniform(0, 2, 32), "classification_output": rng.uniform(0, 2, 32)}
    losses = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}
    model = helpers.example1()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss=losses)
    args = {"batch_size": 8, "epochs": 2, "shuffle": False}
    as_list = [y["regression_output"], y["classification_output"]]  # in the model's output order
    in_order = [weights["regression_output"], weights["classification_output"]]  # Keras: y's structure
    theirs = twin.fit(x, as_list, sample_weight=in_order, verbose=0, **args).history
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss=losses)
    ours = trainer.fit(x, as_list, sample_weight=weights, progress=False, **args).history
    keys = {"loss": "loss", "regression_output": "regression_output_loss"}
    assert_history_close(ours, theirs, {**keys, "classification_output": "classification_output_loss"})
    assert_weights_close(model, twin)


def test_compiles_list_forms_of_loss_loss_weights_and_metrics_match_fit():
    """``compile(loss=[...], loss_weights=[...], metrics=[[...], [...]])``: one entry per output, in output order."""
    x, y = helpers.example1_data(32)
    kwargs = {
        "loss": ["mse", "categorical_crossentropy"],
        "loss_weights": [2.0, 0.5],
        "metrics": [["mae"], ["accuracy"]],
    }
    model = helpers.example1()
    ours, theirs, twin = helpers.fit_both(model, x, y, **kwargs)
    keys = {"loss": "loss", "regression_output/mae": "regression_output_mae"}
    keys.update({"classification_output/accuracy": "classification_output_accuracy"})
    keys.update({k: f"{k}_loss" for k in ("regression_output", "classification_output")})
    assert_history_close(ours, theirs, keys)
    assert_weights_close(model, twin)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"loss": ["mse"]}, ValueError, "`loss` is a list of 1 but the model has 2 outputs"),
        ({"loss": {"regression_output": "mse"}, "loss_weights": [1.0, 2.0, 3.0]}, ValueError, "list of 3"),
        ({"loss": {"output": "mse"}, "metrics": [["mae"], ["mae"]], "one": True}, TypeError, "several outputs"),
    ],
)
def test_compiles_list_forms_need_one_entry_per_output(kwargs, exc, message):
    model = _single_output() if kwargs.pop("one", False) else helpers.example1()
    with pytest.raises(exc, match=re.escape(message)):
        Trainer(model, **kwargs)


def test_initial_epoch_validation_freq_batch_size_and_steps_match_fit():
    x, y, _ = _regression(48)
    xv, yv, _ = _regression(40)
    yv = yv * np.arange(40)[:, None]  # later validation batches differ: validation_steps must take the first ones
    model = _single_output()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.02), loss="mse", metrics=["mae"])
    args = {
        "batch_size": 16,
        "epochs": 5,
        "initial_epoch": 1,
        "shuffle": False,
        "validation_data": (xv, yv),
        "validation_freq": 2,
        "validation_batch_size": 8,
        "validation_steps": 3,
    }
    keras_history = twin.fit(x, y, verbose=0, **args)
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.02), loss="mse", metrics=["mae"])
    history = trainer.fit(x, y, progress=False, **args)
    assert history.epoch == keras_history.epoch == [1, 2, 3, 4]
    assert len(history.history["val_loss"]) == 2  # epochs 2 and 4 (1-based), as Keras
    assert_history_close(history.history, keras_history.history, {k: k for k in ("loss", "mae", "val_loss", "val_mae")})
    assert_weights_close(model, twin)


def test_steps_per_epoch_on_arrays_matches_fit_until_the_data_runs_out_then_restarts_it():
    """One iterator across epochs, as Keras. Where Keras 3 runs out of data it warns and ends training in the middle
    of an epoch; tapeloop restarts the data and runs every step asked for (a deliberate difference)."""
    x, y, _ = _regression(40)  # 5 batches of 8
    model = _single_output()
    twin, four_steps = helpers.clone(model), helpers.clone(model)
    args = {"batch_size": 8, "steps_per_epoch": 2, "shuffle": False, "verbose": 0}
    for reference in (twin, four_steps):
        reference.compile(optimizer=keras.optimizers.SGD(0.02), loss="mse")
    four_steps.fit(x, y, epochs=2, **args)  # batches 1-2, 3-4: the data suffices
    with pytest.warns(UserWarning, match="ran out of data"):
        theirs = twin.fit(x, y, epochs=3, **args).history  # then batch 5, and Keras stops
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.02), loss="mse")
    ours = trainer.fit(x, y, epochs=3, progress=False, **{k: v for k, v in args.items() if k != "verbose"}).history
    assert_history_close({"loss": ours["loss"][:2]}, {"loss": theirs["loss"][:2]}, {"loss": "loss"})
    batch5 = float(np.mean(keras.losses.mean_squared_error(y[32:], four_steps(x[32:])).numpy()))
    assert theirs["loss"][2] == pytest.approx(batch5, rel=1e-5)  # Keras' third epoch: batch 5 alone
    assert int(twin.optimizer.iterations) == 5 and trainer.global_step == 6  # ours: batches 5 and 1
    assert ours["loss"][2] != pytest.approx(batch5, rel=1e-3)


def test_evaluate_with_sample_weight_matches_keras_and_return_dict_false_is_its_list():
    x, y, weights = _regression()
    model = _single_output()
    twin = helpers.clone(model)
    twin.compile(loss="mse", metrics=["mae"])
    trainer = Trainer(model, loss="mse", metrics=["mae"])
    theirs = twin.evaluate(x, y, sample_weight=weights, batch_size=8, verbose=0, return_dict=True)
    ours = trainer.evaluate(x, y, sample_weight=weights, batch_size=8)
    assert ours == pytest.approx(theirs, rel=RTOL)
    listed = trainer.evaluate(x, y, sample_weight=weights, batch_size=8, return_dict=False)
    assert listed == pytest.approx(twin.evaluate(x, y, sample_weight=weights, batch_size=8, verbose=0), rel=RTOL)
    assert trainer.evaluate(x, y, batch_size=8, steps=2) == pytest.approx(
        twin.evaluate(x, y, batch_size=8, steps=2, verbose=0, return_dict=True), rel=RTOL
    )


@pytest.mark.parametrize("element", ["x", "(x,)", "(x, y)", "(x, y, sample_weight)", "(x, {name: y})"])
def test_predict_on_a_dataset_reads_the_inputs_as_keras_does(element):
    x, y, weights = _regression(24)
    model = _single_output()
    parts = {"x": x, "(x,)": (x,), "(x, y)": (x, y), "(x, y, sample_weight)": (x, y, weights),
             "(x, {name: y})": (x, {"output": y})}[element]  # fmt: skip
    dataset = tf.data.Dataset.from_tensor_slices(parts).batch(8)
    trainer = Trainer(model, optimizer="sgd", loss="mse")
    np.testing.assert_allclose(trainer.predict(dataset)["output"], model.predict(dataset, verbose=0), rtol=RTOL)


def test_a_dataset_of_keras_x_y_sample_weight_batches_matches_fit():
    x, y, weights = _regression()
    dataset = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(8)
    model = _single_output()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    theirs = twin.fit(dataset, epochs=2, verbose=0).history
    ours = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss="mse").fit(dataset, epochs=2, verbose=0).history
    assert_history_close(ours, theirs, {"loss": "loss"})
    assert_weights_close(model, twin)


def test_a_dataset_of_float64_arrays_reaches_a_callable_loss_as_float32_as_fit_gives_its_losses():
    """``from_tensor_slices`` on NumPy's float64: Keras' losses cast the targets to float32 (and numpy input is cast
    by both); a callable reading ``outputs["output"] - targets["output"]`` failed on float32 - float64."""
    x, y, _ = _regression()
    dataset = tf.data.Dataset.from_tensor_slices((x.astype("float64"), y.astype("float64"))).batch(8)
    model = _single_output()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss=lambda t, p: tf.reduce_mean(tf.square(p - t)))
    theirs = twin.fit(dataset, epochs=2, verbose=0).history

    def loss(outputs, targets):
        return tf.reduce_mean(tf.square(outputs["output"] - targets["output"]))

    ours = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss=loss).fit(dataset, epochs=2, verbose=0).history
    assert_history_close(ours, theirs, {"loss": "loss"})
    assert_weights_close(model, twin)


def test_a_keras_py_dataset_trains_evaluates_and_predicts_as_in_fit():
    x, y, _ = _regression(44)  # 6 batches of 8, the last of 4
    xv, yv, _ = _regression(20)
    model = _single_output()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    theirs_data, theirs_val = helpers.Batches(x, y, 8), helpers.Batches(xv, yv, 8)
    theirs = twin.fit(theirs_data, validation_data=theirs_val, epochs=3, shuffle=False, verbose=0).history
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    data, val = helpers.Batches(x, y, 8), helpers.Batches(xv, yv, 8)
    ours = trainer.fit(data, validation_data=val, epochs=3, shuffle=False, progress=False).history
    assert_history_close(ours, theirs, {k: k for k in ("loss", "mae", "val_loss", "val_mae")})
    assert_weights_close(model, twin)
    assert (data.ends, val.ends) == (3, 3)  # once per pass (Keras 3.15 calls it 4 and 6 times here)
    assert trainer.evaluate(val)["loss"] == pytest.approx(twin.evaluate(theirs_val, verbose=0)[0], rel=RTOL)
    np.testing.assert_allclose(trainer.predict(val)["output"], twin.predict(theirs_val, verbose=0), rtol=RTOL)


def test_verbose_zero_prints_nothing_and_two_prints_a_line_per_epoch(capsys):
    x, y, _ = _regression()
    trainer = Trainer(_single_output(), loss="mse")
    trainer.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert capsys.readouterr().err == ""
    trainer.fit(x, y, batch_size=8, epochs=2, verbose=2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" - ")[:2] for line in lines] == [["Epoch 1/2", "5 steps"], ["Epoch 2/2", "5 steps"]]


def test_evaluate_and_predict_take_keras_verbose_and_predict_takes_steps(capsys):
    x, y, _ = _regression()
    model = _single_output()
    trainer = Trainer(model, loss="mse", metrics=["mae"])
    logs = trainer.evaluate(x, y, verbose=0)
    assert capsys.readouterr() == ("", "")  # the default, too
    assert trainer.evaluate(x, y, verbose=2) == logs
    assert capsys.readouterr().out == f"loss: {logs['loss']:.4g} - mae: {logs['mae']:.4g}\n"
    ours = trainer.predict(x, batch_size=8, steps=2, verbose=0)["output"]
    np.testing.assert_allclose(ours, model.predict(x, batch_size=8, steps=2, verbose=0), rtol=RTOL)
    assert ours.shape == (16, 1) and capsys.readouterr() == ("", "")


def test_callbacks_take_one_callback_as_keras_does():
    x, y, _ = _regression()
    seen = []
    one = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(epoch))
    trainer = Trainer(_single_output(), loss="mse")
    trainer.fit(x, y, batch_size=8, epochs=2, callbacks=one, progress=False)
    trainer.evaluate(x, y, callbacks=one)
    assert seen == [0, 1]
    with pytest.raises(TypeError, match=re.escape("callbacks must be a list of keras.callbacks.Callback, got str")):
        trainer.fit(x, y, epochs=3, callbacks="EarlyStopping", progress=False)


def test_keras_argument_mistakes_are_named():
    x, y, weights = _regression()
    trainer = Trainer(helpers.example1(), loss={"regression_output": "mse", "classification_output": "mse"})
    with pytest.raises(ValueError, match="y is one array but the model has 2 outputs"):
        trainer.fit(np.zeros((8, 100), "float32"), y[:8], progress=False)
    single = Trainer(_single_output(), loss="mse")
    with pytest.raises(ValueError, match="class_weight and sample_weight exclude each other"):
        single.fit(x, y, sample_weight=weights, class_weight={0: 1.0}, progress=False)
    with pytest.raises(ValueError, match=r"`validation_freq` must be a positive int or a list"):
        single.fit(x, y, validation_freq=0, progress=False)
    with pytest.raises(ValueError, match=r"`verbose` must be one of 'auto', 0, 1, 2; got 3"):
        single.fit(x, y, verbose=3)
    with pytest.raises(TypeError, match=r"`shuffle` must be True or False, got 'batch'"):
        single.fit(x, y, shuffle="batch", progress=False)  # Keras 3 shuffles within each batch; it was a full shuffle
    with pytest.raises(ValueError, match=r"validation_split=0.99 leaves no training or no validation example of 40"):
        single.fit(x, y, validation_split=0.99, progress=False)
    with pytest.raises(ValueError, match=r"`metrics` is a list, which applies to a single-output model"):
        Trainer(helpers.example1(), loss={"regression_output": "mse", "classification_output": "mse"},
                metrics=["mae"]).fit(*helpers.example1_data(8), progress=False)  # fmt: skip
    assert single.global_step == 0
