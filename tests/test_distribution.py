"""MirroredStrategy on 2 logical CPUs against one device on the same global batches: the same update, exactly.

Every case ends in a partial batch that splits unevenly over the replicas (87 examples in batches of 16: the last
7 go 4/3), or leaves one replica empty (81: the last example alone), and checks that the loss really ran on 2.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from losses import MultiBoxLoss, global_normalizer, global_sum, replica_share
from tests import helpers
from trainer import LossProtocolError, Trainer

TWO = ["/cpu:0", "/cpu:1"]


@functools.cache
def mirrored() -> tf.distribute.MirroredStrategy:
    """One strategy for the module: TensorFlow's collective ops cache their shapes by instance key per process, so
    two MirroredStrategy objects in one process can collide (one strategy per process, as in real programs)."""
    return tf.distribute.MirroredStrategy(TWO)


class Recorder:
    """Wraps a loss and records, at trace time, how many replicas each call ran on."""

    def __init__(self, loss) -> None:
        self.loss = loss
        self.replicas: list[int] = []

    def __call__(self, outputs, targets):
        context = tf.distribute.get_replica_context()
        if context is not None:
            self.replicas.append(context.num_replicas_in_sync)
        return self.loss(outputs, targets)


def _run(build, loss_fn, data, *, devices, optimizer=lambda: keras.optimizers.SGD(0.02), epochs=1, **kwargs):
    strategy = mirrored() if devices else tf.distribute.get_strategy()
    with strategy.scope():
        model = build()
        loss = loss_fn()
        trainer = Trainer(model, optimizer=optimizer(), loss=loss, strategy=strategy, steps_per_execution=3, **kwargs)
    history = trainer.fit(data, batch_size=16, epochs=epochs, shuffle=False, progress=False)
    return model, history.history, trainer, loss


def _compare(build, loss_fn, data, *, recorded=lambda loss: loss, **kwargs):
    keras.utils.set_random_seed(3)
    one, h1, t1, _ = _run(build, loss_fn, data, devices=None, **kwargs)
    keras.utils.set_random_seed(3)
    two, h2, t2, loss = _run(build, loss_fn, data, devices=TWO, **kwargs)
    assert t2.strategy.num_replicas_in_sync == 2
    assert set(recorded(loss).replicas) == {2}, "the loss did not run on 2 replicas"
    for a, b in zip(one.get_weights(), two.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert h1.keys() == h2.keys()
    for key in h1:
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-5, atol=1e-6, err_msg=key)
    return t1, t2


def test_model_fit_under_the_same_strategy_is_the_outside_reference():
    """Model.fit on the same 2 replicas, model, data and order (full batches: Keras 3.15's fit fails on a numpy batch
    that splits unevenly, "Inputs to operation AddN ... must have the same size and shape")."""
    losses = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}
    metrics = {"classification_output": ["accuracy"]}
    x, y = helpers.example1_data(64)
    args = {"batch_size": 16, "epochs": 2, "shuffle": False, "validation_split": 0.25}
    with mirrored().scope():
        keras.utils.set_random_seed(0)
        reference = helpers.example1()
        reference.compile(optimizer=keras.optimizers.Adam(1e-2), loss=losses, metrics=metrics)
        keras.utils.set_random_seed(0)
        model = helpers.example1()
        trainer = Trainer(model, optimizer=keras.optimizers.Adam(1e-2), loss=losses, metrics=metrics,
                          strategy=mirrored())  # fmt: skip
    theirs = reference.fit(x, y, verbose=0, **args).history
    ours = trainer.fit(x, y, progress=False, **args).history
    keys = {"loss": "loss", "classification_output/accuracy": "classification_output_accuracy"}
    keys.update({k: f"{k}_loss" for k in losses})
    for mine, keras_key in {**keys, **{f"val_{k}": f"val_{v}" for k, v in keys.items()}}.items():
        np.testing.assert_allclose(ours[mine], theirs[keras_key], rtol=1e-5, atol=1e-6, err_msg=mine)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_model_built_outside_the_strategys_scope_is_named():
    model = helpers.example1()  # outside: its variables are plain, not mirrored
    message = r"The model's variables \(dense\w*/kernel, dense\w*/bias, .* and 5 more\) were not created in the scope"
    with pytest.raises(ValueError, match=message):
        Trainer(model, optimizer="adam", loss={"regression_output": "mse"}, strategy=mirrored())


def test_an_optimizer_made_outside_the_strategys_scope_is_named():
    with mirrored().scope():
        model = helpers.example1()
    optimizer = keras.optimizers.Adam()  # outside: TensorFlow ties it to the default strategy
    with pytest.raises(ValueError, match="The optimizer Adam was created outside the strategy's scope"):
        Trainer(model, optimizer=optimizer, loss={"regression_output": "mse"}, strategy=mirrored())


@pytest.mark.parametrize("n", [87, 81], ids=["split-4-3", "one-replica-empty"])
def test_keras_style_losses_string_and_object(n):
    losses = {"regression_output": "mse", "classification_output": keras.losses.CategoricalCrossentropy()}

    def loss_fn():
        recorder = Recorder(None)
        wrapped = {name: value for name, value in losses.items()}
        wrapped["probe"] = recorder  # a zero-weight probe that records the replica count
        recorder.loss = lambda outputs, targets: tf.constant(0.0) * tf.reduce_mean(outputs["regression_output"])
        return wrapped

    t1, t2 = _compare(helpers.example1, loss_fn, helpers.example1_data(n), recorded=lambda loss: loss["probe"])
    x = helpers.example1_data(n)[0]
    for name, value in t1.predict(x, batch_size=16).items():  # outputs gathered in order
        np.testing.assert_allclose(value, t2.predict(x, batch_size=16)[name], rtol=1e-5, atol=1e-6)
    assert t1.evaluate(helpers.example1_data(n), batch_size=16) == pytest.approx(
        t2.evaluate(helpers.example1_data(n), batch_size=16), rel=1e-5
    )


def test_keras_loss_objects_are_not_scaled_twice():
    """Keras divides a Loss object's value by the replica count; tapeloop logs and optimises the plain mean."""
    keras.utils.set_random_seed(3)
    _, h1, _, _ = _run(helpers.example1, lambda: {"regression_output": keras.losses.MeanSquaredError()},
                       helpers.example1_data(32), devices=None)  # fmt: skip
    keras.utils.set_random_seed(3)
    _, h2, _, _ = _run(helpers.example1, lambda: {"regression_output": keras.losses.MeanSquaredError()},
                       helpers.example1_data(32), devices=TWO)  # fmt: skip
    assert h2["regression_output"][0] == pytest.approx(h1["regression_output"][0], rel=1e-5)


@pytest.mark.parametrize("n", [87, 81], ids=["split-4-3", "one-replica-empty"])
def test_a_sum_reduced_keras_loss_is_the_global_batchs_sum(n):
    """``reduction="sum"``: each replica's sum was scaled by b/B like a mean, so 2 replicas trained and logged about
    half the one-device sum (14.23 against 23.29 in the first epoch)."""

    def loss_fn():
        probe = Recorder(lambda outputs, targets: 0.0 * tf.reduce_mean(outputs["regression_output"]))
        return {"regression_output": keras.losses.MeanSquaredError(reduction="sum"), "probe": probe}

    slow = lambda: keras.optimizers.SGD(0.001)  # noqa: E731  (a sum over 16 examples: 16x the mean's gradient)
    _compare(helpers.example1, loss_fn, helpers.example1_data(n), recorded=lambda loss: loss["probe"], optimizer=slow)


def test_a_sum_reduced_keras_loss_matches_fit_under_the_same_strategy():
    x, y = helpers.example1_data(64)
    loss = {
        "regression_output": keras.losses.MeanSquaredError(reduction="sum"),
        "classification_output": keras.losses.CategoricalCrossentropy(reduction="sum"),
    }
    args = {"batch_size": 16, "epochs": 2, "shuffle": False}
    with mirrored().scope():
        keras.utils.set_random_seed(0)
        reference = helpers.example1()
        reference.compile(optimizer=keras.optimizers.SGD(0.002), loss=loss)
        keras.utils.set_random_seed(0)
        model = helpers.example1()
        trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.002), loss=loss, strategy=mirrored())
    theirs = reference.fit(x, y, verbose=0, **args).history
    ours = trainer.fit(x, y, progress=False, **args).history
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-5)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def two_output_loss(outputs, targets):
    mse = tf.reduce_mean(tf.square(outputs["regression_output"] - targets["regression_output"]))
    ce = tf.reduce_mean(
        keras.losses.categorical_crossentropy(targets["classification_output"], outputs["classification_output"])
    )
    agreement = tf.reduce_mean(tf.square(outputs["regression_output"][:, 0] - outputs["classification_output"][:, 0]))
    return {"mse": mse, "ce": ce, "agreement": agreement}


@pytest.mark.parametrize("n", [87, 81], ids=["split-4-3", "one-replica-empty"])
def test_a_loss_reading_two_outputs(n):
    _compare(helpers.example1, lambda: Recorder(two_output_loss), helpers.example1_data(n))


@pytest.mark.parametrize("aggregator", ["upgrad", "pcgrad", "gradnorm"])
def test_aggregators_see_the_gradients_summed_over_replicas(aggregator):
    """The aggregators are not linear: each component's gradient is summed over the replicas first, so 2 replicas
    give one device's direction (PCGrad's orders come from the seed and the step, the same on both)."""
    _compare(
        helpers.example1,
        lambda: Recorder(two_output_loss),
        helpers.example1_data(87),
        aggregator=aggregator,
        seed=5,
    )


def test_global_clipnorm_clips_the_summed_gradient():
    """Keras clips each replica's gradient before the sum; tapeloop sums first, as one device would."""
    _compare(
        helpers.example1,
        lambda: Recorder(two_output_loss),
        helpers.example1_data(87),
        optimizer=lambda: keras.optimizers.SGD(0.1, global_clipnorm=0.05),
        epochs=2,
    )


def _detector() -> keras.Model:
    inp = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu")(inp)
    boxes = keras.layers.Reshape((6, 4), name="boxes")(keras.layers.Dense(24)(hidden))
    classes = keras.layers.Reshape((6, 3), name="classes")(keras.layers.Dense(18)(hidden))
    return keras.Model(inp, {"boxes": boxes, "classes": classes})


def _detection_data(n: int):
    """Positives concentrated in the first half of each batch: the replicas see very different counts."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, 8)).astype("float32")
    labels = np.zeros((n, 6), "int32")
    for i in range(n):
        k = 4 if (i % 16) < 8 else int(i % 3 == 0)
        labels[i, rng.choice(6, k, replace=False)] = rng.integers(1, 3, k)
    labels[rng.random((n, 6)) < 0.1] = -1  # ignored anchors
    boxes = rng.normal(size=(n, 6, 4)).astype("float32") * 0.5
    return x, {"boxes": boxes, "classes": labels}


@pytest.mark.parametrize("n", [87, 81], ids=["split-4-3", "one-replica-empty"])
def test_multibox_normalises_by_the_global_positive_count(n):
    _compare(_detector, lambda: Recorder(MultiBoxLoss()), _detection_data(n), epochs=2)


def test_helpers_are_the_identity_on_one_device_and_global_under_a_strategy():
    assert float(global_sum(3.0)) == 3.0 and float(replica_share(5)) == 1.0
    assert float(global_normalizer(0.0, 4)) == 1.0 and float(global_normalizer(6.0, 4)) == 6.0
    strategy = mirrored()

    def replica(b):
        return global_sum(1.0), replica_share(b), global_normalizer(2.0, b)

    @tf.function
    def run():
        def per_replica():
            context = tf.distribute.get_replica_context()
            return replica(tf.reshape(tf.cast(context.replica_id_in_sync_group, tf.float32), []) + 1.0)

        return strategy.run(per_replica)

    shares = run()
    total, share, divisor = (strategy.experimental_local_results(v) for v in shares)
    assert [float(t) for t in total] == [2.0, 2.0]
    assert [float(s) for s in share] == pytest.approx([1 / 3, 2 / 3])  # replica batch sizes 1 and 2
    assert [float(d) for d in divisor] == pytest.approx([4 / 3, 8 / 3])  # max(2+2, 1) x b/B


def test_component_keys_that_differ_between_replicas_are_an_error_not_a_hang():
    calls = []

    def moody(outputs, targets):
        calls.append(1)
        mse = tf.reduce_mean(tf.square(outputs["regression_output"] - targets["regression_output"]))
        return {"mse": mse} if len(calls) % 2 else {"mse": mse, "extra": mse}

    strategy = mirrored()
    with strategy.scope():
        trainer = Trainer(helpers.example1(), optimizer="sgd", loss=moody, strategy=strategy)
    with pytest.raises(LossProtocolError, match="Component keys must be the same at every step and on every replica"):
        trainer.fit(helpers.example1_data(32), batch_size=16, progress=False)


@pytest.mark.parametrize("dataset", [False, True], ids=["numpy", "tf.data"])
def test_resume_mid_epoch_on_two_replicas_is_exact(dataset, tmp_path):
    """The distributed iterator and the replicas' tracker sums come back from the checkpoint."""
    x, y = helpers.example1_data(87)
    if dataset:  # a fixed order per epoch; the global seed is the same at resume (see README, Reliability)
        data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(87, seed=1, reshuffle_each_iteration=False).batch(16)
    else:
        data = (x, y)
    fit = {"epochs": 2, "progress": False, "checkpoint_every": 2, **({} if dataset else {"batch_size": 16})}

    def trainer(seed):
        keras.utils.set_random_seed(seed)
        with mirrored().scope():
            model = helpers.example1()
            trainer = Trainer(model, optimizer=keras.optimizers.Adam(0.01), loss=two_output_loss,
                              strategy=mirrored(), steps_per_execution=2, seed=4)  # fmt: skip
        keras.utils.set_random_seed(0)
        return model, trainer

    reference, straight = trainer(0)
    expected = straight.fit(data, checkpoint_dir=tmp_path / "a", **fit).history
    _, crashing = trainer(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit(data, checkpoint_dir=tmp_path / "b", callbacks=[helpers.Crash(crashing, 9)], **fit)  # epoch 2
    resumed_model, resumed = trainer(1)
    history = resumed.fit(data, checkpoint_dir=tmp_path / "b", **fit).history
    for key in expected:
        np.testing.assert_allclose(history[key], expected[key], rtol=1e-6, err_msg=key)
    for a, b in zip(resumed_model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("metrics", [None, {"output": ["mae"]}])
def test_a_step_skipped_for_one_replica_is_tracked_on_none(metrics):
    """nan_policy="skip" with 2 replicas, a NaN in the second replica's half of batches 1 and 4 only: the step is
    skipped for all, so no replica tracks it — the epoch's loss and mae equal one device's, which skips the batch
    whole (each replica used to mask with its own flag, so the first replica's half of a skipped step was logged)."""
    x, y = helpers.small_data(32)
    y = {"output": y["output"].copy()}
    for b in (1, 4):
        y["output"][b * 4 + 3] = np.nan  # batches of 4 split 2/2: the second replica's half
    logs = []
    for strategy in (tf.distribute.get_strategy(), mirrored()):
        with strategy.scope():
            model = helpers.small_model(dropout=0.0)
            trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss={"output": "mse"}, metrics=metrics,
                              nan_policy="skip", strategy=strategy)  # fmt: skip
        history = trainer.fit((x, y), batch_size=4, shuffle=False, progress=False)
        assert history.history["skipped_steps"] == [2.0] and trainer.optimizer.iterations.numpy() == 6
        logs.append(history.history)
    for key in ("loss", "output/mae") if metrics else ("loss",):
        assert np.isfinite(logs[1][key][0])
        assert logs[1][key][0] == pytest.approx(logs[0][key][0], rel=1e-5)


def keras_objects_inside(outputs, targets):
    """A loss callable written with Keras Loss objects — which divide their value by the strategy's replica count."""
    mse = keras.losses.MeanSquaredError()(targets["regression_output"], outputs["regression_output"])
    ce = keras.losses.CategoricalCrossentropy()(targets["classification_output"], outputs["classification_output"])
    return {"mse": mse, "ce": ce}


@pytest.mark.parametrize("n", [87, 81], ids=["split-4-3", "one-replica-empty"])
def test_keras_loss_objects_inside_a_loss_callable_or_a_metric_are_not_scaled_by_the_replica_count(n):
    """They were: on 2 replicas the logged and optimised loss was about half one device's (1.05 against 1.85)."""
    huber = {"huber": lambda o, t: keras.losses.Huber()(t["regression_output"], o["regression_output"])}
    _compare(helpers.example1, lambda: Recorder(keras_objects_inside), helpers.example1_data(n), metrics=huber)


def test_the_keras_io_endpoint_layers_own_loss_and_metric_on_two_replicas_equal_one_device():
    from tests.test_keras_io_examples import _endpoint_model

    rng = np.random.default_rng(0)
    data = {
        "inputs": rng.random((87, 3)).astype("float32"),
        "targets": rng.integers(0, 2, (87, 10)).astype("float32"),
        "sample_weights": rng.random((87, 1)).astype("float32"),
    }
    runs = []
    for strategy in (tf.distribute.get_strategy(), mirrored()):
        with strategy.scope():
            model, optimizer = _endpoint_model(), keras.optimizers.Adam(0.05)
        trainer = Trainer(model, optimizer=optimizer, strategy=strategy)
        history = trainer.fit(data, batch_size=16, epochs=2, shuffle=False, progress=False, validation_data=(data,))
        runs.append((history.history, model.get_weights()))
    (h1, w1), (h2, w2) = runs
    for key in ("loss", "binary_accuracy", "val_loss", "val_binary_accuracy"):
        np.testing.assert_allclose(h2[key], h1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(w1, w2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_plain_function_model_under_a_strategy_is_named_before_any_update():
    """Its variables would be found as per-device copies (the run failed with 'nothing to train')."""
    with mirrored().scope():
        w = tf.Variable(tf.zeros([3, 1]))
    trainer = Trainer(lambda x: {"y": tf.matmul(x, w)}, loss={"y": "mse"}, strategy=mirrored())
    with pytest.raises(TypeError, match=r"A plain function as the model cannot be distributed.*tf\.Module"):
        trainer.fit(np.ones((8, 3), "float32"), {"y": np.ones((8, 1), "float32")}, progress=False)
    assert np.all(w.numpy() == 0.0)


def test_model_fit_after_a_trainer_under_the_same_strategy_trains_as_before():
    """The replica threads each put Keras' loss scaling back on leaving, the last one out the un-scaled one: Model.fit
    afterwards trained on 2x its loss (first epoch 0.678 against 0.452 before the Trainer ran)."""
    x, y = helpers.example1_data(64)
    losses = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}

    def keras_fit() -> list[float]:
        with mirrored().scope():
            keras.utils.set_random_seed(0)
            model = helpers.example1()
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss=losses)
        return model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history["loss"]

    before = keras_fit()
    for _ in range(3):  # the replica threads leave in any order: a few runs
        with mirrored().scope():
            model, optimizer = helpers.example1(), keras.optimizers.SGD(0.05)
        Trainer(model, optimizer=optimizer, loss=losses, strategy=mirrored()).fit(
            x, y, batch_size=16, shuffle=False, progress=False, validation_data=(x, y)
        )
    mean = mirrored().run(tf.function(lambda: keras.losses.MeanSquaredError()(tf.ones([4, 1]), tf.zeros([4, 1]))))
    assert [float(v) for v in mirrored().experimental_local_results(mean)] == [0.5, 0.5]  # Keras' 1/replicas
    np.testing.assert_allclose(keras_fit(), before, rtol=1e-6)
