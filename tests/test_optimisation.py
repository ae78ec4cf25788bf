"""Options of the one train step: gradient accumulation, mixed precision, per-component gradient norms, schedules."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tests.test_distribution import mirrored, two_output_loss
from trainer import LossWeightSchedule, Trainer

LOSSES = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}


def _weights_equal(a: keras.Model, b: keras.Model, tol: float = 1e-6) -> None:
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


# -- gradient accumulation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "spe"),
    [(64, 1), (60, 2), (44, "auto")],
    ids=["even", "short-last-micro-batch", "short-last-group"],
)
def test_k_micro_batches_equal_one_big_batch(n, spe):
    """4 micro-batches of 8 = one batch of 32, SGD; 44 examples end in a group of 2 micro-batches (8 + 4) = 12."""
    data = helpers.example1_data(n)
    big_model = helpers.example1()
    small_model = helpers.clone(big_model)
    big = Trainer(big_model, optimizer=keras.optimizers.SGD(0.1), loss=LOSSES, steps_per_execution=1)
    small = Trainer(small_model, optimizer=keras.optimizers.SGD(0.1), loss=LOSSES, steps_per_execution=spe,
                    gradient_accumulation_steps=4)  # fmt: skip
    h_big = big.fit(data, batch_size=32, epochs=2, shuffle=False, progress=False).history
    h_small = small.fit(data, batch_size=8, epochs=2, shuffle=False, progress=False).history
    _weights_equal(small_model, big_model)
    assert small.global_step == big.global_step == 4 and int(small.optimizer.iterations) == 4
    for key in h_big:  # trackers count every micro-batch: the same epoch means
        np.testing.assert_allclose(h_small[key], h_big[key], rtol=1e-6, err_msg=key)
    assert small.trace_counts["train"] == 1


def test_accumulation_equals_keras_optimizer_accumulation_under_fit():
    """The outside reference: Model.fit with Adam(gradient_accumulation_steps=3) on the same micro-batches (Adam's
    bias correction counts updates there too: 8 after 2 epochs of 4 groups)."""
    data = helpers.example1_data(96)
    ours = helpers.example1()
    theirs = helpers.clone(ours)
    theirs.compile(optimizer=keras.optimizers.Adam(0.01, gradient_accumulation_steps=3), loss=LOSSES)
    args = {"batch_size": 8, "epochs": 2, "shuffle": False}
    theirs.fit(*data, verbose=0, **args)
    trainer = Trainer(ours, optimizer=keras.optimizers.Adam(0.01), loss=LOSSES, gradient_accumulation_steps=3)
    trainer.fit(data, progress=False, **args)
    helpers.assert_weights_close(ours, theirs)
    assert int(trainer.optimizer.iterations) == int(theirs.optimizer.iterations) == 8


class _Shifted(keras.optimizers.schedules.LearningRateSchedule):
    """``schedule(k·step + k - 1)``: the rate Keras' accumulating optimizer uses at update ``step``."""

    def __init__(self, schedule, k):
        self.schedule, self.k = schedule, k

    def __call__(self, step):
        return self.schedule(self.k * step + self.k - 1)


def test_a_learning_rate_schedule_under_accumulation_counts_updates_where_keras_counts_batches():
    """Pinned difference: Keras' ``SGD(schedule, gradient_accumulation_steps=k)`` evaluates the schedule at the
    batch count (its docs: "the 'real' iterations value"), so update u gets schedule(k·u + k - 1); tapeloop's
    update u gets schedule(u), as the big batch of k·b does — the point of accumulation. Both held here."""
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)
    data = helpers.example1_data(64)
    model = helpers.example1()
    keras_twin, big_twin, shifted = helpers.clone(model), helpers.clone(model), helpers.clone(model)
    keras_twin.compile(optimizer=keras.optimizers.SGD(schedule, gradient_accumulation_steps=2), loss=LOSSES)
    keras_twin.fit(*data, batch_size=8, shuffle=False, verbose=0)
    big_twin.compile(optimizer=keras.optimizers.SGD(schedule), loss=LOSSES)
    big_twin.fit(*data, batch_size=16, shuffle=False, verbose=0)
    for net, rate in ((model, schedule), (shifted, _Shifted(schedule, 2))):
        trainer = Trainer(net, optimizer=keras.optimizers.SGD(rate), loss=LOSSES, gradient_accumulation_steps=2)
        trainer.fit(data, batch_size=8, shuffle=False, progress=False)
    helpers.assert_weights_close(model, big_twin)  # tapeloop: one update per big batch, the schedule by updates
    helpers.assert_weights_close(shifted, keras_twin)  # Keras: the schedule by batches
    assert not all(np.allclose(a, b) for a, b in zip(model.get_weights(), keras_twin.get_weights(), strict=True))


def test_accumulation_under_a_strategy_equals_one_device_big_batch():
    data = helpers.example1_data(60)
    keras.utils.set_random_seed(3)
    with mirrored().scope():
        small_model = helpers.example1()
        small = Trainer(small_model, optimizer=keras.optimizers.SGD(0.02), loss=two_output_loss,
                        strategy=mirrored(), gradient_accumulation_steps=2, steps_per_execution=2)  # fmt: skip
    big_model = helpers.example1()
    big_model.set_weights(small_model.get_weights())
    big = Trainer(big_model, optimizer=keras.optimizers.SGD(0.02), loss=two_output_loss)
    big.fit(data, batch_size=32, epochs=2, shuffle=False, progress=False)
    small.fit(data, batch_size=16, epochs=2, shuffle=False, progress=False)
    _weights_equal(small_model, big_model, 1e-5)


def test_accumulation_option_is_validated():
    with pytest.raises(ValueError, match="`gradient_accumulation_steps` must be a positive int, got 0"):
        Trainer(helpers.example1(), loss=LOSSES, gradient_accumulation_steps=0)


# -- mixed precision ----------------------------------------------------------------------------------------------


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def _mixed_run(name: str):
    keras.mixed_precision.set_global_policy(name)
    keras.utils.set_random_seed(0)
    model = helpers.example1()
    trainer = Trainer(model, optimizer=keras.optimizers.Adam(1e-3), loss=two_output_loss)
    history = trainer.fit(helpers.example1_data(256), batch_size=32, epochs=3, shuffle=False, progress=False)
    return trainer, history.history


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_close_to_float32(name, policy):
    _, reference = _mixed_run("float32")
    trainer, history = _mixed_run(name)
    scaled = isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (name == "mixed_float16")  # loss scaling only where float16 needs it
    assert trainer.runner.trackers["train"].variables()[0].dtype == tf.float32
    tolerance = 2e-2 if name == "mixed_float16" else 6e-2  # bfloat16 keeps 8 bits of mantissa
    for key in ("loss", "mse", "ce", "agreement"):
        np.testing.assert_allclose(history[key], reference[key], rtol=tolerance, atol=1e-3, err_msg=key)


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_matches_model_fit_under_the_same_policy(name, policy):
    """Model.fit is the outside reference: the same model, data and order under the policy, its loss scaling
    (a LossScaleOptimizer for float16, as compile wraps it) included."""
    policy(name)
    x, y = helpers.example1_data(256)
    losses = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}
    keras.utils.set_random_seed(0)
    twin = helpers.example1()
    twin.compile(optimizer=keras.optimizers.Adam(1e-3), loss=losses)
    theirs = twin.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0).history
    keras.utils.set_random_seed(0)
    model = helpers.example1()
    trainer = Trainer(model, optimizer=keras.optimizers.Adam(1e-3), loss=losses)
    ours = trainer.fit(x, y, batch_size=32, epochs=3, shuffle=False, progress=False).history
    assert type(trainer.optimizer) is type(twin.optimizer)
    for mine, keras_key in {"loss": "loss", **{k: f"{k}_loss" for k in losses}}.items():
        np.testing.assert_allclose(ours[mine], theirs[keras_key], rtol=1e-6, err_msg=mine)
    for a, b in zip(helpers.weights(model), helpers.weights(twin), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("built", "trained"), [("mixed_float16", "float32"), ("float32", "mixed_float16")])
def test_loss_scaling_follows_the_models_policy_as_compile_does(built, trained, policy):
    """compile wraps the optimizer when the *model* computes in float16 (its dtype_policy, fixed when it was built),
    whatever the global policy is by then. A model built under mixed_float16 and trained after the global policy
    went back to float32 lost its float16 gradients below 6e-8 without loss scaling (unchanged weights where fit
    moved them); a float32 model got a LossScaleOptimizer it does not need."""
    x, y = helpers.example1_data(64)
    losses = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}
    tiny = {"regression_output": 1e-6, "classification_output": 1e-6}  # gradients that underflow float16
    policy(built)
    keras.utils.set_random_seed(0)
    model, twin = helpers.example1(), None
    keras.utils.set_random_seed(0)
    twin = helpers.example1()
    policy(trained)
    twin.compile(optimizer=keras.optimizers.SGD(100.0), loss=losses, loss_weights=tiny)
    twin.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(100.0), loss=losses, loss_weights=tiny)
    trainer.fit(x, y, batch_size=32, epochs=1, shuffle=False, progress=False)
    for a, b in zip(helpers.weights(model), helpers.weights(twin), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert type(trainer.optimizer) is type(twin.optimizer)


def test_steps_the_loss_scaler_skips_are_not_non_finite_losses(policy):
    """An absurd initial scale overflows float16 gradients: the scaler skips and lowers the scale; the losses are
    finite, so nan_policy="raise" says nothing."""
    policy("mixed_float16")
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=2.0**60)
    trainer = Trainer(helpers.example1(), optimizer=optimizer, loss=two_output_loss)
    history = trainer.fit(helpers.example1_data(64), batch_size=8, epochs=2, shuffle=False, progress=False).history
    assert float(optimizer.dynamic_scale) < 2.0**60 and np.isfinite(history["loss"]).all()


# -- per-component gradient norms ---------------------------------------------------------------------------------


def _heads_apart(outputs, targets):
    parts = two_output_loss(outputs, targets)
    return {"mse": parts["mse"], "ce": parts["ce"]}  # each head in one component: only the trunk is shared


@pytest.mark.parametrize(("loss", "shared_count"), [(two_output_loss, 8), (_heads_apart, 4)], ids=["all", "trunk"])
def test_grad_norms_match_one_tape_per_component(loss, shared_count):
    model = helpers.example1()
    x, y = helpers.example1_data(32)
    weights = {"ce": 0.5, "agreement": 2.0} if loss is two_output_loss else {"ce": 0.5}
    expected = {}
    tapes = {}
    for key in ("mse", "ce", "agreement") if loss is two_output_loss else ("mse", "ce"):
        with tf.GradientTape() as tape:
            value = loss(dict(zip(model.output_names, model(x, training=True))), y)[key]
            value = value * weights.get(key, 1.0)
        tapes[key] = tape.gradient(value, model.trainable_variables)
    users = [sum(tapes[k][j] is not None for k in tapes) for j in range(len(model.trainable_variables))]
    shared = [j for j, n in enumerate(users) if n > 1]
    for key, grads in tapes.items():
        expected[key] = np.sqrt(sum(float(tf.reduce_sum(tf.square(grads[j]))) for j in shared if grads[j] is not None))
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.0), loss=loss, loss_weights=weights,
                      log_grad_norms=True)  # fmt: skip
    history = trainer.fit((x, y), batch_size=32, shuffle=False, progress=False).history
    for key, value in expected.items():
        assert history[f"grad_norm/{key}"][0] == pytest.approx(value, rel=1e-5)
    assert "val_grad_norm/mse" not in history and len(shared) == shared_count


def test_grad_norms_are_off_by_default():
    history = Trainer(helpers.example1(), loss=LOSSES).fit(helpers.example1_data(16), progress=False).history
    assert not any(key.startswith("grad_norm/") for key in history)


# -- schedules ----------------------------------------------------------------------------------------------------


def test_learning_rate_schedule_works_and_lr_is_logged_each_epoch():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    trainer = Trainer(helpers.example1(), optimizer=keras.optimizers.SGD(schedule), loss=LOSSES)
    history = trainer.fit(helpers.example1_data(32), batch_size=8, epochs=3, progress=False).history
    assert history["lr"] == pytest.approx([0.1 * 0.5 ** (4 * e / 2) for e in (1, 2, 3)], rel=1e-6)


def test_loss_weight_schedule_per_epoch_without_retracing():
    trainer = Trainer(helpers.example1(), optimizer=keras.optimizers.SGD(0.01), loss=two_output_loss)
    schedule = LossWeightSchedule(trainer, {"agreement": lambda epoch: 0.5 * epoch})
    history = trainer.fit(helpers.example1_data(32), batch_size=8, epochs=3, callbacks=[schedule], progress=False)
    h = history.history
    assert trainer.trace_counts["train"] == 1
    assert float(trainer.loss_weights["agreement"].numpy()) == 1.0  # epochs 0, 1, 2 -> weights 0, 0.5, 1.0
    evaluated = trainer.evaluate(helpers.example1_data(32), batch_size=8)
    assert evaluated["loss"] == pytest.approx(evaluated["mse"] + evaluated["ce"] + evaluated["agreement"], rel=1e-5)
    assert h["loss"][0] == pytest.approx(h["mse"][0] + h["ce"][0], rel=1e-5)  # agreement weighted 0 in epoch 0


def test_loss_weight_schedule_per_step_lands_on_exact_steps():
    trainer = Trainer(helpers.example1(), optimizer=keras.optimizers.SGD(0.01), loss=two_output_loss)
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append((trainer.global_step, float(trainer.loss_weights["mse"].numpy())))

    schedule = LossWeightSchedule(trainer, {"mse": lambda step: 1.0 + step}, per="step", every_n_steps=3)
    trainer.fit(helpers.example1_data(80), batch_size=8, epochs=1, callbacks=[schedule, Probe()], progress=False)
    starts = [step for step, _ in seen]
    assert {3, 6, 9} <= set(starts)  # blocks end on multiples of 3, whatever size "auto" picks
    assert all(weight == 1.0 + step - step % 3 for step, weight in seen)
    assert trainer.trace_counts["train"] == 1


def test_loss_weight_schedule_rejects_unknown_keys():
    trainer = Trainer(helpers.example1(), loss=two_output_loss)
    schedule = LossWeightSchedule(trainer, {"nosuch": lambda e: 1.0})
    with pytest.raises(ValueError, match="'nosuch' that are not loss weights; they are 'agreement', 'ce', 'mse'"):
        trainer.fit(helpers.example1_data(16), callbacks=[schedule], progress=False)


# -- Keras' optimizers ----------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "Adafactor": lambda: keras.optimizers.Adafactor(0.01),
    "Ftrl": lambda: keras.optimizers.Ftrl(0.1, l1_regularization_strength=0.01),
    "Lamb": lambda: keras.optimizers.Lamb(0.01),
    "Lion": lambda: keras.optimizers.Lion(0.001),
    "Muon": lambda: keras.optimizers.Muon(0.01),
    "RMSprop-centered": lambda: keras.optimizers.RMSprop(0.01, centered=True, momentum=0.9),
    "AdamW-global_clipnorm": lambda: keras.optimizers.AdamW(0.05, weight_decay=0.1, global_clipnorm=0.1),
}


def _regression_net() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    hidden = keras.layers.BatchNormalization()(keras.layers.Dense(8, activation="relu")(inp))
    return keras.Model(inp, keras.layers.Dense(2)(hidden)), x, (x @ rng.normal(size=(6, 2))).astype("float32")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_keras_optimizers_train_as_in_fit(name):
    model, x, y = _regression_net()
    ours, theirs, twin = helpers.fit_both(model, x, y, optimizer=OPTIMIZERS[name], loss="mse")
    helpers.assert_history_close(ours, theirs, {"loss": "loss"})
    helpers.assert_weights_close(model, twin)


def test_schedule_free_adamw_starts_its_momentum_at_the_weights_where_fit_starts_it_at_zero():
    """Pinned difference: ``ScheduleFreeAdamW.build`` sets each momentum to its variable's value. ``Model.fit``
    (Keras 3.15, no distribution strategy) builds the optimizer inside the traced train function, in the trace
    TensorFlow runs only to create variables, so that assignment never runs and the momentum starts at zero.
    tapeloop builds it eagerly: it equals the optimizer's own ``apply_gradients`` step by step, as documented."""

    def by_hand(zero_momentum: bool) -> list[np.ndarray]:
        model, x, y = _regression_net()
        optimizer = keras.optimizers.ScheduleFreeAdamW(0.01)
        optimizer.build(model.trainable_variables)
        for slot in optimizer.variables:
            if zero_momentum and "momentum" in slot.path:
                slot.assign(tf.zeros_like(slot))
        for start in range(0, len(x), 8):
            with tf.GradientTape() as tape:
                loss = keras.losses.MeanSquaredError()(y[start : start + 8], model(x[start : start + 8], training=True))
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return helpers.weights(model)

    model, x, y = _regression_net()
    Trainer(model, optimizer=keras.optimizers.ScheduleFreeAdamW(0.01), loss="mse").fit(
        x, y, batch_size=8, shuffle=False, progress=False
    )
    twin, _, _ = _regression_net()
    twin.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(0.01), loss="mse")
    twin.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    for mine, theirs, documented, zero_start in zip(
        helpers.weights(model), helpers.weights(twin), by_hand(False), by_hand(True), strict=True
    ):
        np.testing.assert_allclose(mine, documented, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(theirs, zero_start, rtol=1e-5, atol=1e-6)
    assert not np.allclose(helpers.weights(model)[0], helpers.weights(twin)[0], atol=1e-3)
