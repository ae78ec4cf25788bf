"""The loop: one trace, in-graph blocks, evaluate/predict, every kind of model, XLA and eager modes."""

import logging
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer import Trainer
from trainer.data import Data

LOSSES = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}


def _linear(units: int = 2, seed: int = 0) -> keras.Model:
    inp = keras.layers.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(units, name="out")(inp))
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=(3, units)).astype("float32"), rng.normal(size=(units,)).astype("float32")])
    return model


def test_three_epochs_partial_batch_and_validation_trace_once_and_weight_change_does_not_retrace():
    trainer = Trainer(helpers.example1(), optimizer="sgd", loss=LOSSES, steps_per_execution=2)
    data, val = helpers.example1_data(70), helpers.example1_data(19, seed=1)  # partial batches: 6 and 3
    trainer.fit(data, batch_size=32, epochs=3, validation_data=val, progress=False)
    assert trainer.trace_counts == {"train": 1, "eval": 1}
    trainer.loss_weights["classification_output"].assign(0.25)
    history = trainer.fit(data, batch_size=32, epochs=1, validation_data=val, progress=False).history
    assert trainer.trace_counts == {"train": 1, "eval": 1}
    # The new weight is in effect: the logged total is the weighted sum of the logged components.
    np.testing.assert_allclose(
        history["val_loss"],
        np.add(history["val_regression_output"], 0.25 * np.array(history["val_classification_output"])),
        rtol=1e-5,
    )
    trainer.predict(data[0], batch_size=32)
    trainer.predict(val[0], batch_size=32)
    assert trainer.trace_counts["predict"] == 1


def test_many_trainers_in_one_process_do_not_warn_of_retracing():
    """A sweep makes a Trainer per trial, each tracing its own functions once. TensorFlow's retracing detector keys a
    function by its code, so from the fifth Trainer on it warned "5 out of the last 5 calls to <function
    BlockRunner.__init__.<locals>...> triggered tf.function retracing" (Keras' fit in the same loop does not)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    tf.get_logger().addHandler(handler)
    x, y = helpers.example1_data(32)
    try:
        for _ in range(7):
            trainer = Trainer(helpers.example1(), optimizer="sgd", loss=LOSSES)
            trainer.fit(x, y, batch_size=16, epochs=1, validation_data=(x, y), progress=False)
            trainer.evaluate(x, y, batch_size=16)
            trainer.predict(x, batch_size=16)
            assert trainer.trace_counts == {"train": 1, "eval": 1, "predict": 1}
    finally:
        tf.get_logger().removeHandler(handler)
    assert [m for m in messages if "retracing" in m] == []


@pytest.mark.parametrize("steps_per_execution", [4, 3])
def test_steps_per_execution_gives_identical_weights_and_logs(steps_per_execution):
    data = helpers.example1_data(70)
    model = helpers.example1()
    twin = helpers.clone(model)
    kwargs = dict(loss=LOSSES, metrics={"classification_output": ["accuracy"]})
    one = Trainer(model, optimizer=keras.optimizers.SGD(0.1), **kwargs)
    many = Trainer(twin, optimizer=keras.optimizers.SGD(0.1), steps_per_execution=steps_per_execution, **kwargs)
    h1 = one.fit(data, batch_size=16, epochs=2, shuffle=False, progress=False).history
    h2 = many.fit(data, batch_size=16, epochs=2, shuffle=False, progress=False).history
    assert h1 == h2  # bit-identical: the same ops run per step, only the loop around them differs
    for a, b in zip(helpers.weights(model), helpers.weights(twin)):
        np.testing.assert_array_equal(a, b)
    assert one.global_step == many.global_step == 2 * 5


def test_evaluate_and_predict_match_numpy():
    model = _linear()
    w, b = model.get_weights()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(23, 3)).astype("float32")
    y = rng.normal(size=(23, 2)).astype("float32")
    trainer = Trainer(model, loss={"output": "mse"}, metrics={"output": ["mae"]})
    predicted = trainer.predict(x, batch_size=5)
    expected = x.astype("float64") @ w + b
    assert list(predicted) == ["output"] and predicted["output"].shape == (23, 2)
    np.testing.assert_allclose(predicted["output"], expected, rtol=1e-5, atol=1e-6)
    logs = trainer.evaluate((x, {"output": y}), batch_size=5)
    assert logs["output"] == pytest.approx(np.mean((expected - y) ** 2), rel=1e-5)
    assert logs["loss"] == pytest.approx(logs["output"], rel=1e-7)
    assert logs["output/mae"] == pytest.approx(np.mean(np.abs(expected - y)), rel=1e-5)
    # The same from a tf.data pipeline (predict also accepts (inputs, targets) elements).
    ds = tf.data.Dataset.from_tensor_slices((x, {"output": y})).batch(7)
    assert trainer.evaluate(ds) == pytest.approx(logs, rel=1e-6)
    np.testing.assert_allclose(trainer.predict(ds)["output"], predicted["output"], rtol=1e-6)


class DictModule(tf.Module):
    """A tf.Module returning a dict: no Keras at all."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable([[1.0], [-1.0]])

    def __call__(self, x):
        y = tf.matmul(x, self.w)
        return {"y": y, "double": 2.0 * y}


def test_tf_module_returning_a_dict_trains():
    module = DictModule()
    x = np.array([[1.0, 2.0], [3.0, 1.0], [0.5, 0.5]], "float32")
    target = {"y": np.array([[0.0], [1.0], [2.0]], "float32")}

    def loss(outputs, targets):
        return tf.reduce_mean(tf.square(outputs["y"] - targets["y"])) + 0.0 * tf.reduce_mean(outputs["double"])

    trainer = Trainer(module, optimizer=keras.optimizers.SGD(0.05), loss=loss)
    before = trainer.evaluate((x, target))["loss"]
    trainer.fit((x, target), epochs=20, progress=False)
    assert trainer.evaluate((x, target))["loss"] < before


def test_single_tensor_output_is_keyed_output():
    trainer = Trainer(_linear(1), loss="mse", optimizer="sgd")
    x = np.ones((4, 3), "float32")
    logs = trainer.fit((x, {"output": np.zeros((4, 1), "float32")}), progress=False).history
    assert list(logs) == ["loss", "lr"]
    assert list(trainer.predict(x)) == ["output"]


def test_seed001_example3_with_names_on_the_output_layers_trains():
    model = helpers.example3(as_printed=False)
    losses = {"output_1": "mse", "output_2": "categorical_crossentropy"}
    trainer = Trainer(model, loss=losses, metrics={"output_1": ["mae"], "output_2": ["accuracy"]})
    history = trainer.fit(helpers.example3_data(40), batch_size=16, epochs=2, progress=False).history
    assert set(history) == {"loss", "output_1", "output_2", "output_1/mae", "output_2/accuracy", "lr"}


@pytest.mark.parametrize("mode", ["jit_compile", "run_eagerly"])
def test_xla_and_eager_modes_match_the_default_graph(mode):
    data = helpers.example1_data(40)
    model = helpers.example1()
    twin = helpers.clone(model)
    ref = Trainer(model, optimizer=keras.optimizers.SGD(0.1), loss=LOSSES, steps_per_execution=2)
    other = Trainer(twin, optimizer=keras.optimizers.SGD(0.1), loss=LOSSES, steps_per_execution=2, **{mode: True})
    h1 = ref.fit(data, batch_size=16, epochs=2, shuffle=False, progress=False).history
    h2 = other.fit(data, batch_size=16, epochs=2, shuffle=False, progress=False).history
    for key in h1:
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-5, err_msg=key)
    for a, b in zip(helpers.weights(model), helpers.weights(twin)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_numpy_input_is_shuffled_each_epoch_with_all_examples_and_a_kept_partial_batch():
    x = np.arange(12, dtype="float32").reshape(12, 1)
    data = Data((x, {"output": x}), what="training data", batch_size=5, shuffle=True, seed=7)
    epochs = [[b[0].numpy().ravel().tolist() for b in data.dataset(e)] for e in range(2)]
    assert [len(b) for b in epochs[0]] == [5, 5, 2]
    flat = [[v for batch in e for v in batch] for e in epochs]
    assert sorted(flat[0]) == sorted(flat[1]) == list(range(12))
    assert flat[0] != flat[1] and flat[0] != list(range(12))
    again = Data((x, {"output": x}), what="training data", batch_size=5, shuffle=True, seed=7)
    assert [b[0].numpy().ravel().tolist() for b in again.dataset(1)] == epochs[1]


def test_large_numpy_input_gathered_by_index_gives_the_same_batches_as_a_permuted_copy(monkeypatch):
    """Above COPY_LIMIT bytes, batches are gathered from the arrays by index (no copy of the data): the same batches,
    structure, dtypes and static shapes as slicing a permuted copy, from any resume point."""
    import trainer.data

    rng = np.random.default_rng(0)
    source = ({"a": rng.normal(size=(23, 3)).astype("float32"), "b": rng.integers(0, 9, (23, 2, 2))},
              {"output": rng.normal(size=(23, 1)).astype("float32")})  # fmt: skip

    def batches(limit, epoch, skip):
        monkeypatch.setattr(trainer.data, "COPY_LIMIT", limit)
        data = Data(source, what="training data", batch_size=4, shuffle=True, seed=3)
        dataset = data.dataset(epoch, skip_batches=skip)
        return dataset.element_spec, [tf.nest.map_structure(lambda t: t.numpy(), b) for b in dataset]

    for epoch, skip in ((0, 0), (2, 3)):
        (copy_spec, copied), (index_spec, gathered) = batches(2**40, epoch, skip), batches(0, epoch, skip)
        assert copy_spec == index_spec and len(copied) == len(gathered) == 6 - skip
        for a, b in zip(copied, gathered, strict=True):
            tf.nest.map_structure(np.testing.assert_array_equal, a, b)


def test_same_seed_same_weights_different_seed_different_weights():
    data = helpers.example1_data(40)
    model = helpers.example1()
    runs = []
    for seed in (3, 3, 4):
        twin = helpers.clone(model)
        Trainer(twin, optimizer="sgd", loss=LOSSES, seed=seed).fit(data, batch_size=8, epochs=2, progress=False)
        runs.append(helpers.weights(twin))
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_steps_per_epoch_runs_on_across_epochs_and_restarts_finite_data():
    x = np.arange(10, dtype="float32").reshape(10, 1)
    inp = keras.layers.Input((1,))
    trainer = Trainer(keras.Model(inp, keras.layers.Dense(1)(inp)), loss="mse", steps_per_execution=2)
    ds = tf.data.Dataset.from_tensor_slices((x, {"output": x})).batch(4)  # 3 batches per pass
    trainer.fit(ds, epochs=3, steps_per_epoch=2, progress=False)
    assert trainer.global_step == 6
    infinite = ds.repeat()
    trainer.fit(infinite, epochs=2, steps_per_epoch=5, progress=False)
    assert trainer.global_step == 16


def test_mirrored_strategy_on_one_device_matches_the_default_strategy():
    """The step sums replica gradients in cross-replica context, then applies one guarded update (no merge_call
    inside control flow). On one device this must equal the default strategy exactly."""
    data = helpers.example1_data(40)
    model = helpers.example1()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        twin = helpers.clone(model)
        mirrored = Trainer(twin, optimizer=keras.optimizers.SGD(0.1), loss=LOSSES, strategy=strategy)
    plain = Trainer(model, optimizer=keras.optimizers.SGD(0.1), loss=LOSSES)
    h1 = plain.fit(data, batch_size=16, epochs=2, shuffle=False, progress=False).history
    h2 = mirrored.fit(data, batch_size=16, epochs=2, shuffle=False, progress=False).history
    for key in h1:
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-6, err_msg=key)
    for a, b in zip(helpers.weights(model), helpers.weights(twin)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        mirrored.predict(data[0])["regression_output"], plain.predict(data[0])["regression_output"], rtol=1e-6
    )


def test_plain_function_model_trains_like_numpy_sgd_and_resumes(tmp_path):
    """DESIGN: the model may be any callable. A function closing over variables has no `trainable_variables`:
    the Trainer finds the variables it reads on its first call, trains them, and checkpoints them."""
    rng = np.random.RandomState(0)
    x = rng.randn(16, 3).astype("float32")
    t = (x @ np.array([[1.0], [2.0], [-1.0]]) + 0.5).astype("float32")

    def make():
        w, b = tf.Variable(tf.zeros([3, 1])), tf.Variable(tf.zeros([1]))
        return (lambda inputs: {"y": tf.matmul(inputs, w) + b}), w, b

    model, w, b = make()
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.1), loss={"y": "mse"})
    trainer.fit((x, {"y": t}), epochs=3, batch_size=16, progress=False, checkpoint_dir=str(tmp_path))
    rw, rb = np.zeros((3, 1)), np.zeros(1)
    for _ in range(5):  # full-batch gradient descent on the mean squared error, by hand
        err = x @ rw + rb - t
        rw, rb = rw - 0.1 * 2 * x.T @ err / len(x), rb - 0.1 * 2 * err.mean(0)
        if _ == 2:
            np.testing.assert_allclose(w.numpy(), rw, rtol=1e-5)
            np.testing.assert_allclose(b.numpy(), rb, rtol=1e-5)
    model2, w2, b2 = make()  # a new process's fresh variables: resumed from the checkpoint, two epochs more
    again = Trainer(model2, optimizer=keras.optimizers.SGD(0.1), loss={"y": "mse"})
    again.fit((x, {"y": t}), epochs=5, batch_size=16, progress=False, checkpoint_dir=str(tmp_path))
    np.testing.assert_allclose(w2.numpy(), rw, rtol=1e-5)
    np.testing.assert_allclose(b2.numpy(), rb, rtol=1e-5)


def test_plain_function_model_without_variables_is_named():
    trainer = Trainer(lambda inputs: {"y": 2.0 * inputs}, loss={"y": "mse"})
    x = np.ones((4, 1), "float32")
    with pytest.raises(ValueError, match="read no trainable variable"):
        trainer.fit((x, {"y": x}), progress=False)


@pytest.mark.parametrize(
    "rate", [0.05, keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)], ids=["float", "schedule"]
)
def test_fit_evaluate_and_predict_run_under_warnings_as_errors(rate):
    """``python -W error`` (or pytest's ``-W error``): reading the learning rate for ``lr`` went through Keras'
    ``convert_to_numpy``, whose ``np.array`` on a variable NumPy 2 deprecates (a DeprecationWarning every epoch)."""
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    trainer = Trainer(_linear(), optimizer=keras.optimizers.SGD(rate), loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = trainer.fit(x, x[:, :2], batch_size=8, epochs=2, progress=False, validation_split=0.5).history
        trainer.evaluate(x, x[:, :2]), trainer.predict(x)
    assert history["lr"] == pytest.approx([0.05, 0.05] if rate == 0.05 else [0.05, 0.025])  # decay: 0.1·0.5^(step/2)


def test_an_embedding_on_data_of_unknown_length_gives_the_same_run_for_any_block_length():
    """An Embedding's gradient is an IndexedSlices carried between loop iterations; with 8 batches of unknown count
    and blocks of 4 or 8 the data ends exactly at a block's end, so the next block finds none (its empty gradients
    are IndexedSlices of no rows). Bit-identical to one step per call."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 50, (64, 6)), rng.normal(size=(64, 1)).astype("float32")
    runs = []
    for steps in (1, 4, 8):
        keras.utils.set_random_seed(0)
        inp = keras.Input((6,), dtype="int32")
        model = keras.Model(
            inp, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 8)(inp)))
        )
        data = tf.data.Dataset.from_tensor_slices((x, {"output": y})).filter(lambda a, b: True).batch(8)
        trainer = Trainer(model, optimizer=keras.optimizers.Adam(0.01), loss="mse", steps_per_execution=steps)
        runs.append((trainer.fit(data, epochs=3, progress=False).history, model.get_weights()))
    for history, weights in runs[1:]:
        assert history == runs[0][0]
        for a, b in zip(weights, runs[0][1], strict=True):
            np.testing.assert_array_equal(a, b)
