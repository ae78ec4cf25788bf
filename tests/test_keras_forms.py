"""Keras' argument forms, held against Model.fit: compile's list forms for a one-output model and class_weight with
a tf.data.Dataset or a PyDataset."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from tests import helpers
from tests.helpers import assert_history_close, assert_weights_close
from trainer import DataError, Trainer

RNG = np.random.default_rng(7)
X = RNG.normal(size=(64, 5)).astype("float32")
LABELS = RNG.integers(0, 3, 64)
TRAIN = (X, LABELS)
CLASS_WEIGHT = {0: 1.0, 1: 3.0, 2: 0.5}


def _one_output(kind: str) -> keras.Model:
    keras.utils.set_random_seed(1)
    if kind == "sequential":
        return keras.Sequential([layers.Input((5,)), layers.Dense(3)])
    inp = layers.Input((5,))
    out = layers.Dense(3, name="probs")(inp)
    return keras.Model(inp, [out] if kind == "listed" else out)


@pytest.mark.parametrize("kind", ["sequential", "functional", "listed"])
def test_compiles_one_entry_lists_for_a_one_output_model_match_fit(kind):
    """Keras takes ``loss=[...]``, ``loss_weights=[w]`` and ``metrics=[[...]]`` for a one-output model too (a
    Sequential has no ``output_names``); they were a TypeError."""
    x, y = TRAIN
    kwargs = {"loss": ["sparse_categorical_crossentropy"], "loss_weights": [2.0], "metrics": [["accuracy"]]}
    model = _one_output(kind)
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), **kwargs)
    theirs = twin.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), **kwargs)
    ours = trainer.fit(x, y, batch_size=8, epochs=2, shuffle=False, progress=False).history
    assert_history_close(ours, theirs, {"loss": "loss", "accuracy": "accuracy"})
    unweighted = keras.losses.sparse_categorical_crossentropy(y, model.predict(x, verbose=0)).numpy().mean()
    assert trainer.evaluate(x, y)["loss"] == pytest.approx(2.0 * unweighted, rel=1e-5)
    assert_weights_close(model, twin)


def test_one_number_of_loss_weights_needs_one_loss():
    loss = {"a": lambda o, t: o["output"][:, 0], "b": lambda o, t: o["output"][:, 1]}
    with pytest.raises(ValueError, match=r"`loss_weights` is one number but there are 2 losses \('a', 'b'\)"):
        Trainer(_one_output("functional"), loss=loss, loss_weights=[2.0])


def test_a_one_output_model_keyed_by_its_layer_name_says_the_output_is_named_output():
    """Keras names a one-output model's output after its layer; tapeloop names a returned tensor 'output' (the
    design card). The error said "'probs' is a layer inside the model but not one of its outputs", which is false."""
    trainer = Trainer(_one_output("functional"), loss={"probs": "sparse_categorical_crossentropy"})
    with pytest.raises(KeyError, match=r"'probs' makes the model's only output.*tapeloop names it 'output'") as err:
        trainer.fit(TRAIN[0], np.zeros(len(TRAIN[0])), batch_size=8, progress=False)
    assert "not one of its outputs" not in str(err.value)


def _classifier() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([layers.Input((5,)), layers.Dense(3, activation="softmax")])


@pytest.mark.parametrize(
    ("labels", "loss"),
    [
        (LABELS, "sparse_categorical_crossentropy"),
        (LABELS[:, None].astype("float32"), "sparse_categorical_crossentropy"),  # a trailing axis of 1, floats
        (np.eye(3, dtype="float32")[LABELS], "categorical_crossentropy"),  # one-hot: the argmax is the class
    ],
    ids=["sparse", "column", "one-hot"],
)
def test_class_weight_with_a_dataset_matches_fit(labels, loss):
    """Keras weighs a tf.data.Dataset's examples by class too; it was a DataError. Validation stays unweighted."""
    data = tf.data.Dataset.from_tensor_slices((X, labels)).batch(16)
    validation = tf.data.Dataset.from_tensor_slices((X[:24], labels[:24])).batch(8)
    kwargs = {"loss": loss, "metrics": ["accuracy"], "weighted_metrics": ["accuracy"]}
    model = _classifier()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.1), **kwargs)
    args = {"epochs": 2, "class_weight": CLASS_WEIGHT, "validation_data": validation}
    theirs = twin.fit(data, verbose=0, **args).history
    ours = Trainer(model, optimizer=keras.optimizers.SGD(0.1), **kwargs).fit(data, progress=False, **args).history
    keys = ["loss", "accuracy", "weighted_accuracy", "val_loss", "val_accuracy", "val_weighted_accuracy"]
    assert_history_close(ours, theirs, {k: k for k in keys})
    assert ours["weighted_accuracy"] != pytest.approx(ours["accuracy"])  # the weights did apply
    assert_weights_close(model, twin)


def test_class_weight_with_a_pydataset_matches_fit():
    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return X[i * 16 : (i + 1) * 16], LABELS[i * 16 : (i + 1) * 16]

    model = _classifier()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    args = {"epochs": 2, "class_weight": CLASS_WEIGHT, "shuffle": False}
    theirs = twin.fit(Batches(), verbose=0, **args).history
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    assert_history_close(trainer.fit(Batches(), progress=False, **args).history, theirs, {"loss": "loss"})
    assert_weights_close(model, twin)


def test_class_weight_on_a_dataset_in_tapeloops_form_weighs_a_missing_class_1():
    """``(x, {name: y})`` elements are weighed as ``(x, y)``; a class missing from class_weight weighs 1, as with
    arrays (Keras' dataset path fails on it), i.e. as explicit NumPy sample weights."""
    partial = {1: 3.0}
    weights = np.where(LABELS == 1, 3.0, 1.0).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((X, {"output": LABELS})).batch(16)
    runs = [
        ((dataset,), {"class_weight": partial}),
        ((X, LABELS), {"sample_weight": weights, "batch_size": 16, "shuffle": False}),
    ]
    histories = []
    for args, kwargs in runs:
        trainer = Trainer(_classifier(), optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        histories.append(trainer.fit(*args, epochs=2, progress=False, **kwargs).history["loss"])
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-6)


@pytest.mark.parametrize(
    ("element", "class_weight", "message"),
    [
        ((X, LABELS, np.ones(64, "float32")), CLASS_WEIGHT, "class_weight and sample_weight exclude each other"),
        ((X, LABELS), {"a": 1.0}, "class_weight keys must be class indices (ints >= 0); got 'a'"),
        ((X, LABELS), {0: "high"}, "class_weight values must be numbers; those of classes 0 are not"),
        ((X,), CLASS_WEIGHT, "class_weight needs targets"),
    ],
)
def test_class_weight_with_a_dataset_errors(element, class_weight, message):
    data = tf.data.Dataset.from_tensor_slices(element).batch(16)
    trainer = Trainer(_classifier(), loss="sparse_categorical_crossentropy")
    with pytest.raises(DataError, match=re.escape(message)):
        trainer.fit(data, class_weight=class_weight, progress=False)
    assert trainer.global_step == 0


def test_a_keras_loss_without_reduction_is_refused_because_fit_trains_its_sum_but_logs_its_mean():
    """Pinned difference: ``Model.fit`` with ``MeanSquaredError(reduction="none")`` updates exactly as with
    ``reduction="sum"`` but logs the mean; tapeloop refuses it (in the constructor) and names both choices."""
    x, y = X, X[:, :1] * 2
    trained = {}
    for reduction in ("none", "sum"):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([layers.Input((5,)), layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.005), loss=keras.losses.MeanSquaredError(reduction=reduction))
        history = model.fit(x, y, batch_size=16, shuffle=False, verbose=0).history
        trained[reduction] = model.get_weights(), history["loss"][0]
    for a, b in zip(trained["none"][0], trained["sum"][0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert trained["none"][1] == pytest.approx(trained["sum"][1] / 16, rel=1e-5)  # logged: the mean of 16
    for reduction in ("none", None):
        with pytest.raises(ValueError, match=r"Model.fit would log their mean but differentiate their sum.*'sum'"):
            Trainer(_classifier(), loss=keras.losses.MeanSquaredError(reduction=reduction))


def test_one_keras_loss_for_a_model_with_several_outputs_applies_to_each_as_fit():
    """``compile(loss="mse")`` on a two-output model is the loss on every output (Keras logs ``<output>_loss``);
    tapeloop asked for a dict."""
    x, y = helpers.example1_data(32)
    model = helpers.example1()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    theirs = twin.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss="mse")
    ours = trainer.fit(x, y, batch_size=8, epochs=2, shuffle=False, progress=False).history
    keys = {k: f"{k}_loss" for k in ("regression_output", "classification_output")}
    assert_history_close(ours, theirs, {"loss": "loss", **keys})
    assert_weights_close(model, twin)


def test_loss_weights_by_output_with_one_keras_loss_weigh_that_output_where_fit_scales_the_total():
    """Pinned difference: with one loss for two outputs, Keras 3.15 reads ``loss_weights={"classification_output":
    0.5}`` as one weight and scales the whole total by it; tapeloop weighs that output's component, as the key says."""
    x, y = helpers.example1_data(32)
    weights = {"classification_output": 0.5}
    model = helpers.example1()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", loss_weights=weights)
    theirs = twin.fit(x, y, batch_size=32, shuffle=False, verbose=0).history
    parts = theirs["regression_output_loss"][0], theirs["classification_output_loss"][0]
    assert theirs["loss"][0] == pytest.approx(0.5 * (parts[0] + parts[1]), rel=1e-5)
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss="mse", loss_weights=weights)
    ours = trainer.fit(x, y, batch_size=32, shuffle=False, progress=False).history
    assert ours["regression_output"][0] == pytest.approx(parts[0], rel=1e-5)  # one batch: the same start
    assert ours["loss"][0] == pytest.approx(parts[0] + 0.5 * parts[1], rel=1e-5)


def _two_heads_by_dict():
    keras.utils.set_random_seed(0)
    inp = layers.Input((100,))
    hidden = layers.Dense(4)(inp)
    return keras.Model(
        inp, {"zeta": layers.Dense(1, name="zeta")(hidden), "alpha": layers.Dense(3, name="alpha")(hidden)}
    )


def _one_head():
    keras.utils.set_random_seed(0)
    inp = layers.Input((100,))
    return keras.Model(inp, layers.Dense(1)(layers.Dense(4)(inp)))


def _one_head_by_dict():
    keras.utils.set_random_seed(0)
    inp = layers.Input((100,))
    return keras.Model(inp, {"y": layers.Dense(1, name="y")(inp)})


_X1, _Y1 = helpers.example1_data(32)
_W = np.linspace(0.5, 1.5, 32)
_HEADS = ("regression_output", "classification_output")
_EVALUATE_CASES = {
    "two outputs": (
        helpers.example1,
        {"loss": {"classification_output": "categorical_crossentropy", "regression_output": "mse"},
         "metrics": {"regression_output": ["mse", "mae"], "classification_output": ["accuracy"]},
         "weighted_metrics": {"classification_output": ["accuracy"], "regression_output": ["mae"]}},
        [_Y1[k] for k in _HEADS], [_W, _W],
    ),
    "dict outputs": (
        _two_heads_by_dict,
        {"loss": {"zeta": "mse", "alpha": "mae"}, "metrics": {"zeta": ["mae"], "alpha": ["mse"]}},
        {"zeta": _Y1["regression_output"], "alpha": _Y1["classification_output"]}, None,
    ),
    "one output": (
        _one_head,
        {"loss": "mse", "metrics": ["mse", "mae"], "weighted_metrics": ["mae", "mape"]},
        _Y1["regression_output"], _W,
    ),
    "loss alone": (_one_head, {"loss": "mse"}, _Y1["regression_output"], None),
    "one output by name": (  # Keras logs no per-output loss for one output: the list is [loss, mae]
        _one_head_by_dict, {"loss": {"y": "mse"}, "metrics": {"y": ["mae"]}}, {"y": _Y1["regression_output"]}, None,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_EVALUATE_CASES))
def test_evaluates_list_is_in_evaluates_order(case):
    """``evaluate(return_dict=False)`` followed the logging order; Keras lists ``loss``, each output's loss in the
    model's order, then the rest sorted by name (its metrics' order, not compile's), so unpacking it gave other
    values (and with a metric in both lists, Keras lists that name twice: reproduced)."""
    build, kwargs, y, weights = _EVALUATE_CASES[case]
    model = build()
    twin = helpers.clone(model)
    twin.compile(optimizer="sgd", **kwargs)
    theirs = twin.evaluate(_X1, y, sample_weight=weights, verbose=0)
    ours_weights = dict(zip(_HEADS, weights, strict=True)) if isinstance(weights, list) else weights
    ours = Trainer(model, optimizer="sgd", **kwargs).evaluate(_X1, y, sample_weight=ours_weights, return_dict=False)
    assert type(ours) is type(theirs) and np.shape(ours) == np.shape(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_zero_epochs_train_nothing_as_fit():
    """``fit(epochs=0)`` (a sweep's empty setting) was a ValueError; Keras returns an empty history."""
    model = _one_head()
    before = model.get_weights()
    twin = helpers.clone(model)
    twin.compile(optimizer="sgd", loss="mse")
    theirs = twin.fit(_X1, _Y1["regression_output"], epochs=0, verbose=0)
    trainer = Trainer(model, optimizer="sgd", loss="mse")
    ours = trainer.fit(_X1, _Y1["regression_output"], epochs=0, progress=False)
    assert (ours.history, ours.epoch) == (theirs.history, theirs.epoch) == ({}, [])
    assert trainer.global_step == 0
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="`epochs` must be a non-negative int, got -1"):
        trainer.fit(_X1, _Y1["regression_output"], epochs=-1, progress=False)


def _fraud_detector():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [layers.Input((5,)), layers.Dense(8, activation="relu"), layers.Dropout(0.3), layers.Dense(1, "sigmoid")]
    )


@pytest.mark.parametrize("loss", ["binary_crossentropy", "mse", "mae"])
def test_one_dimensional_labels_against_a_column_output_weigh_each_example_as_fit(loss):
    """keras.io's imbalanced-classification recipe: labels ``(B,)``, a sigmoid output ``(B, 1)``, ``class_weight``, a
    loss by name. The rank alignment dropped the output's axis, so the loss function averaged over the batch before
    the weights applied: every class weight came out as their mean (first epoch 0.679 against Model.fit's 1.052)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 5)).astype("float32")
    y = (x[:, 0] + 0.3 * rng.normal(size=256) > 1.2).astype("float32")
    class_weight = {0: 128 / np.sum(y == 0), 1: 128 / np.sum(y == 1)}
    metrics = lambda: [keras.metrics.Precision(name="precision"), keras.metrics.Recall(name="recall")]  # noqa: E731
    args = {"batch_size": 32, "epochs": 2, "shuffle": False, "class_weight": class_weight, "validation_data": (x, y)}
    model, twin = _fraud_detector(), _fraud_detector()  # built alike: a clone's Dropout would draw other seeds
    twin.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, metrics=metrics())
    theirs = twin.fit(x, y, verbose=0, **args).history
    trainer = Trainer(model, optimizer=keras.optimizers.Adam(1e-2), loss=loss, metrics=metrics())
    ours = trainer.fit(x, y, progress=False, **args).history
    assert_history_close(ours, theirs, {k: k for k in theirs})
    assert_weights_close(model, twin)


@pytest.mark.parametrize(
    ("loss", "activation"),
    [("mse", None), ("huber", None), ("log_cosh", None), ("poisson", "softplus"), ("hinge", "tanh"),
     ("mape", None), ("msle", "softplus")],
)  # fmt: skip
def test_keras_loss_names_with_sample_weights_and_labels_of_rank_one_match_fit(loss, activation):
    """Each of these was off before (first epoch, sample weights, labels (B,), output (B, 1)): mse 2.962 against
    3.010, mape 159.4 against 155.3, ..."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = {"hinge": np.sign(rng.normal(size=64)), "mape": rng.random(64) + 1}.get(loss, rng.random(64)).astype("float32")
    weights = np.linspace(0.2, 2.0, 64).astype("float32")
    model = keras.Sequential([layers.Input((5,)), layers.Dense(1, activation=activation)])
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
    args = {"sample_weight": weights, "batch_size": 16, "epochs": 2, "shuffle": False}
    theirs = twin.fit(x, y, verbose=0, **args).history
    ours = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss=loss).fit(x, y, progress=False, **args).history
    assert_history_close(ours, theirs, {"loss": "loss"})
    assert_weights_close(model, twin)


@pytest.fixture
def float64():
    """floatx float64, and the layers' policy with it (a global policy set by an earlier test would otherwise stay)."""
    policy = keras.mixed_precision.global_policy().name
    keras.config.set_floatx("float64")
    keras.mixed_precision.set_global_policy("float64")
    yield
    keras.config.set_floatx("float32")
    keras.mixed_precision.set_global_policy(policy)


@pytest.mark.parametrize("form", ["numpy", "dataset", "py_dataset"])
def test_under_floatx_float64_inputs_and_targets_stay_float64_as_in_fit(form, float64):
    """A float64 model (``keras.config.set_floatx("float64")``): Keras keeps NumPy's float64; tapeloop cast x and y to
    float32 first — the weights came out 1.3e-9 away from fit's after 8 steps, a float32 rounding of the data."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(40, 1))
    data = {"numpy": (x, y), "dataset": (tf.data.Dataset.from_tensor_slices((x, y)).batch(8),),
            "py_dataset": (helpers.Batches(x, y, batch_size=8),)}[form]  # fmt: skip
    batch = {"batch_size": 8, "shuffle": False} if form == "numpy" else {"shuffle": False}
    keras.utils.set_random_seed(0)
    model = keras.Sequential([layers.Input((5,)), layers.Dense(8, activation="relu"), layers.Dense(1)])
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    theirs = twin.fit(*data, epochs=2, verbose=0, **batch).history
    seen = []

    def loss(outputs, targets):
        seen.append((outputs["output"].dtype, targets["output"].dtype))
        return tf.reduce_mean(tf.square(outputs["output"] - targets["output"]))

    ours = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss=loss).fit(*data, epochs=2, verbose=0, **batch)
    assert set(seen) == {(tf.float64, tf.float64)}
    np.testing.assert_allclose(ours.history["loss"], theirs["loss"], rtol=1e-6)  # logged as float32
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
