"""Multi-task balancing inside the step, against steps computed by hand (one tape per component, the aggregator on
the flattened Jacobian — itself held against quadprog and TorchJD in test_aggregators.py), and across
accumulation, resume, mixed precision, nan_policy and the loss weightings GradNorm and DWA."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from losses import DWA, GradNorm, UPGrad
from losses.aggregators import get_aggregator
from tests import helpers
from trainer import Trainer

LR = 0.05


def heads_apart(outputs, targets):
    """Two components, one per head: only the trunk is shared."""
    mse = tf.reduce_mean(tf.square(outputs["regression_output"] - targets["regression_output"]))
    ce = tf.reduce_mean(keras.losses.categorical_crossentropy(targets["classification_output"],
                                                              outputs["classification_output"]))  # fmt: skip
    return {"mse": 100.0 * mse, "ce": ce}


def three_components(outputs, targets):
    """Three components; ``agreement`` reads both heads, so they are shared too."""
    parts = heads_apart(outputs, targets)
    gap = outputs["regression_output"][:, 0] - outputs["classification_output"][:, 0]
    return {**parts, "agreement": tf.reduce_mean(tf.square(gap))}


def by_hand(model, x, y, loss, aggregator, weights=None, regularization=False):
    """One SGD step as the issue defines it: the aggregated direction on the shared variables, each other
    variable its component's gradient, model.losses added as an ordinary term. Returns (new weights, G, w)."""
    weights = weights or {}
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        outputs = dict(zip(model.output_names, model(x, training=True)))
        parts = loss(outputs, y)
        terms = [weights.get(key, 1.0) * value for key, value in parts.items()]
        extra = tf.add_n(model.losses) if regularization else None
    per_key = [tape.gradient(term, variables) for term in terms]
    rest = tape.gradient(extra, variables) if regularization else [None] * len(variables)
    shared = [j for j in range(len(variables)) if sum(g[j] is not None for g in per_key) > 1]
    flat = [[np.zeros(variables[j].shape) if g[j] is None else g[j].numpy() for j in shared] for g in per_key]
    J = np.stack([np.concatenate([part.ravel() for part in row]) for row in flat]).astype(np.float64)
    G = J @ J.T
    w = get_aggregator(aggregator).weights(tf.constant(G), seed=None).numpy() if aggregator != "pcgrad" else None
    direction = get_aggregator(aggregator)(tf.constant(J), seed=tf.constant([7, 0], tf.int64)).numpy()
    new, offset = [], 0
    for j, var in enumerate(variables):
        grad = np.zeros(var.shape)
        if j in shared:
            size = int(np.prod(var.shape))
            grad += direction[offset : offset + size].reshape(var.shape)
            offset += size
        else:
            grad += sum(g[j].numpy() for g in per_key if g[j] is not None)
        if rest[j] is not None:
            grad += rest[j].numpy()
        new.append(var.numpy() - LR * grad)
    return new, G, w


@pytest.mark.parametrize(
    ("aggregator", "loss"),
    [("upgrad", heads_apart), ("mgda", three_components), ("cagrad", three_components), ("imtlg", heads_apart),
     ("pcgrad", three_components), ("dualproj", heads_apart), ("alignedmtl", three_components)],
)  # fmt: skip
def test_one_step_equals_the_aggregated_step_by_hand(aggregator, loss):
    x, y = helpers.example1_data(32)
    keras.utils.set_random_seed(0)
    model = helpers.example1()
    expected, G, w = by_hand(model, x, y, loss, aggregator, weights={"ce": 3.0})
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(LR), loss=loss, loss_weights={"ce": 3.0},
                      aggregator=aggregator, seed=7)  # fmt: skip
    history = trainer.fit((x, y), batch_size=32, shuffle=False, progress=False).history
    for a, b in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    keys = list(loss(dict(zip(model.output_names, model(x))), y))
    if w is not None:  # agg_weight/<key>: the step's weights (one step: the epoch mean)
        np.testing.assert_allclose([history[f"agg_weight/{k}"][0] for k in keys], w, rtol=1e-4, atol=1e-6)
    for a, b in [(0, 1), (0, 2), (1, 2)][: len(keys) * (len(keys) - 1) // 2]:
        assert history[f"conflict/{keys[a]}|{keys[b]}"] == [float(G[a, b] < 0)]
    assert trainer.trace_counts["train"] == 1


def test_regularization_is_added_to_the_aggregated_direction():
    x, y = helpers.example1_data(32)
    keras.utils.set_random_seed(0)
    model = helpers.example1(regularizer=0.05)
    expected, _, _ = by_hand(model, x, y, heads_apart, "upgrad", regularization=True)
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(LR), loss=heads_apart, aggregator=UPGrad())
    history = trainer.fit((x, y), batch_size=32, shuffle=False, progress=False).history
    for a, b in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    assert "agg_weight/regularization" not in history and history["regularization"][0] > 0


def test_variables_of_one_component_keep_its_gradient():
    """Two towers that share nothing: every variable gets its own component's gradient, as with the sum; and a
    single component is its own direction."""
    x, y = helpers.example1_data(32)

    def towers():
        inp = keras.Input((100,))
        regression = keras.layers.Dense(1, name="regression_output")(keras.layers.Dense(8)(inp))
        classification = keras.layers.Dense(3, activation="softmax", name="classification_output")(inp)
        return keras.Model(inp, [regression, classification])

    def single(outputs, targets):
        return heads_apart(outputs, targets)["mse"]

    for loss in (heads_apart, single):
        found = []
        for aggregator in (None, "upgrad"):
            keras.utils.set_random_seed(0)
            model = towers()
            Trainer(model, optimizer=keras.optimizers.SGD(0.01), loss=loss, aggregator=aggregator).fit(
                (x, y), batch_size=16, shuffle=False, progress=False
            )
            found.append(model.get_weights())
        for a, b in zip(*found, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _train(aggregator="upgrad", loss=three_components, n=64, epochs=2, **kwargs):
    keras.utils.set_random_seed(0)
    model = helpers.example1()
    fit = {key: kwargs.pop(key) for key in ("batch_size", "checkpoint_dir", "callbacks") if key in kwargs}
    kwargs = {"optimizer": keras.optimizers.SGD(0.002), **kwargs}
    trainer = Trainer(model, loss=loss, aggregator=aggregator, seed=3, **kwargs)
    history = trainer.fit(helpers.example1_data(n), epochs=epochs, shuffle=False, progress=False,
                          **{"batch_size": 16, **fit})  # fmt: skip
    return model, history.history, trainer


@pytest.mark.parametrize("aggregator", ["upgrad", "mgda"])
def test_accumulated_micro_batches_aggregate_once_like_one_big_batch(aggregator):
    """Each component's gradient is summed over the micro-batches, then aggregated: 4 x 8 = one batch of 32."""
    big, h_big, _ = _train(aggregator, batch_size=32)
    small, h_small, _ = _train(aggregator, batch_size=8, gradient_accumulation_steps=4)
    for a, b in zip(big.get_weights(), small.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for key in h_big:
        np.testing.assert_allclose(h_small[key], h_big[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_pcgrad_resumes_bit_identically(tmp_path):
    """PCGrad's orders come from (seed, optimizer step): a crashed and resumed run draws the same ones."""
    reference, ref_history, _ = _train("pcgrad", epochs=3, checkpoint_dir=tmp_path / "ref")
    crash = []

    def callbacks(trainer):
        crash.append(helpers.Crash(trainer, 6))  # mid-epoch 2 (4 steps an epoch)
        return crash

    keras.utils.set_random_seed(0)
    model = helpers.example1()
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.002), loss=three_components, aggregator="pcgrad", seed=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(helpers.example1_data(64), batch_size=16, epochs=3, shuffle=False, progress=False,
                    checkpoint_dir=tmp_path / "run", checkpoint_every=1, callbacks=callbacks(trainer))  # fmt: skip
    resumed, history, _ = _train("pcgrad", epochs=3, checkpoint_dir=tmp_path / "run")
    assert all(np.array_equal(a, b) for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True))
    assert history == ref_history


def test_the_default_builds_no_jacobian_and_names_are_checked():
    _, history, trainer = _train(None, epochs=1)
    assert trainer.runner.steps.math.balance is None and not any("/" in key for key in history if key != "lr")
    with pytest.raises(ValueError, match=r"Unknown aggregator 'upgradd'.*'upgrad'"):
        Trainer(helpers.example1(), loss=heads_apart, aggregator="upgradd")


def test_overflowing_steps_under_loss_scaling_are_not_tracked():
    """A loss scale of 2^24 overflows float16 gradients: the loss scaler skips those steps, and the aggregator's
    statistics skip them too (an identity Gramian stands in: the solvers stay defined)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.002), initial_scale=2.0**24)
        _, history, trainer = _train("upgrad", loss=heads_apart, epochs=1, optimizer=scaled, n=256)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    halvings = np.log2(2.0**24 / float(trainer.optimizer.dynamic_scale))  # each overflow halves the scale
    steps = float(trainer.runner.trackers["train"].variables()[3].numpy())  # steps whose statistics were tracked
    assert halvings > 0 and steps == 16 - halvings
    assert history["agg_weight/mse"][0] != 0.5


def test_a_skipped_non_finite_step_changes_nothing():
    x, y = helpers.example1_data(48)
    bad = {key: value.copy() for key, value in y.items()}
    bad["regression_output"][16:32] = np.nan
    keras.utils.set_random_seed(0)
    model = helpers.example1()
    Trainer(model, optimizer=keras.optimizers.SGD(LR), loss=heads_apart, aggregator="alignedmtl",
            nan_policy="skip").fit((x, bad), batch_size=16, shuffle=False, progress=False)  # fmt: skip
    keras.utils.set_random_seed(0)
    reference = helpers.example1()
    keep = np.r_[0:16, 32:48]
    Trainer(reference, optimizer=keras.optimizers.SGD(LR), loss=heads_apart, aggregator="alignedmtl").fit(
        (x[keep], {k: v[keep] for k, v in y.items()}), batch_size=16, shuffle=False, progress=False
    )
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_mixed_precision_takes_the_loss_scale_out_of_the_gramian():
    """The same run under loss scales 1 and 2^4 logs the same aggregation weights (a Gramian left scaled by 2^8 would
    change them completely); not to the last bit: at scale 1 float16 gradients below 2^-14 lose bits that 2^4 keeps,
    and the first step's weight already differs in the 8th digit. And it trains like float32 (the weights themselves
    are sensitive to float16 rounding: 13 % on ce here)."""
    _, reference, _ = _train("upgrad", loss=heads_apart, epochs=1)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        runs = []
        for scale in (1.0, 2.0**4):
            scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.002), initial_scale=scale)
            runs.append(_train("upgrad", loss=heads_apart, epochs=1, optimizer=scaled)[1])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for key in runs[0]:
        np.testing.assert_allclose(runs[0][key], runs[1][key], rtol=1e-6, err_msg=key)
    for key in ("mse", "ce", "agg_weight/mse"):
        np.testing.assert_allclose(runs[0][key], reference[key], rtol=2e-2, err_msg=key)


# -- loss weightings ----------------------------------------------------------------------------------------------


def test_gradnorm_first_step_by_hand():
    x, y = helpers.example1_data(32)
    keras.utils.set_random_seed(0)
    model = helpers.example1()
    _, G, _ = by_hand(model, x, y, heads_apart, "sum")
    weighting = GradNorm(alpha=1.5, learning_rate=0.1)
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(LR), loss=heads_apart, aggregator=weighting)
    history = trainer.fit((x, y), batch_size=32, shuffle=False, progress=False).history
    # Step 1: every loss ratio is 1, so the target is the mean norm; one step of 0.1 on |G_i - target|.
    norms = np.sqrt(np.diag(G))
    factors = np.maximum(1.0 - 0.1 * np.sign(norms - norms.mean()) * norms, 1e-3)
    np.testing.assert_allclose(weighting.factors.numpy(), 2 * factors / factors.sum(), rtol=1e-5)
    assert history["loss_weight/mse"] == [1.0] and history["loss_weight/ce"] == [1.0]  # the step used 1, 1
    assert "grad_norm/mse" not in history and "conflict/mse|ce" in history


def test_dwa_weights_follow_the_last_two_epoch_losses():
    _, history, trainer = _train(DWA(temperature=2.0), loss=three_components, epochs=4)
    keys = ["mse", "ce", "agreement"]
    for epoch in (0, 1):
        assert [history[f"loss_weight/{k}"][epoch] for k in keys] == [1.0, 1.0, 1.0]
    for epoch in (2, 3):
        ratios = np.array([history[k][epoch - 1] / history[k][epoch - 2] for k in keys])
        expected = 3 * np.exp(ratios / 2.0) / np.exp(ratios / 2.0).sum()
        np.testing.assert_allclose([history[f"loss_weight/{k}"][epoch] for k in keys], expected, rtol=1e-5)
    assert "loss_weighting" in trainer.checkpoint_state()


@pytest.mark.parametrize(("m", "name"), [(2, "mean"), (2, "upgrad"), (4, "upgrad")])
def test_the_benchs_hand_written_floors_do_the_trainers_work(m, name):
    """scripts/bench_aggregators.py times a hand-written step as the floor under each aggregator's cost: it must update
    the weights as the Trainer does (m = 4 takes the stacked rows' Gramian)."""
    bench = helpers.script_module("bench_aggregators")
    hand_step, heads_loss, trunk_model = bench.hand_step, bench.heads_loss, bench.trunk_model
    rng = np.random.default_rng(0)
    x = rng.random((96, 100), dtype=np.float32)
    y = {f"task{i}": rng.normal(size=(96, 1)).astype(np.float32) * (i + 1) * (-1) ** i for i in range(m)}
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    keras.utils.set_random_seed(0)
    trained = trunk_model(m)
    keras.utils.set_random_seed(0)
    by_hand_model = trunk_model(m)
    Trainer(trained, optimizer=keras.optimizers.SGD(1e-3), loss=heads_loss(m), aggregator=name).fit(data, verbose=0)
    step = hand_step(by_hand_model, m, jacobian=True, aggregator=UPGrad() if name == "upgrad" else None)
    step(iter(data), tf.constant(3))
    for ours, theirs in zip(trained.trainable_variables, by_hand_model.trainable_variables, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=1e-7)


def _embedding_model(sparse: bool) -> keras.Model:
    """Token ids -> a shared embedding, averaged -> two heads. ``sparse=False``: the same model with the embedding
    as a matrix product of one-hot rows (dense gradients; the same numbers)."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((6,), dtype="int32")
    if sparse:
        embedded = keras.layers.Embedding(50, 8, name="embedding")(ids)
    else:
        one_hot = keras.layers.Lambda(lambda t: tf.one_hot(t, 50), output_shape=(6, 50))(ids)
        embedded = keras.layers.Dense(8, use_bias=False, name="embedding")(one_hot)
    pooled = keras.layers.GlobalAveragePooling1D()(embedded)
    heads = {name: keras.layers.Dense(1, name=name)(pooled) for name in ("a", "b")}
    model = keras.Model(ids, heads)
    if not sparse:  # the embedding's initial table
        model.get_layer("embedding").kernel.assign(_embedding_model(True).get_layer("embedding").embeddings)
    return model


@pytest.mark.parametrize(
    "options",
    [lambda: {"aggregator": "upgrad"}, lambda: {"aggregator": "mgda", "gradient_accumulation_steps": 2},
     lambda: {"log_grad_norms": True}, lambda: {"aggregator": GradNorm(1.5)}],
    ids=["upgrad", "mgda-accumulated", "log_grad_norms", "gradnorm"],
)  # fmt: skip
def test_an_embeddings_sparse_gradients_are_aggregated_as_the_same_dense_ones(options):
    """An Embedding's gradient is an IndexedSlices: the Gramian and the direction failed with "unsupported operand
    type(s) for *: 'IndexedSlices' and 'IndexedSlices'" while tracing."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (64, 6)).astype("int32")
    y = {"a": rng.random((64, 1), dtype=np.float32), "b": 10.0 * rng.random((64, 1), dtype=np.float32)}
    found = []
    for sparse in (True, False):
        model = _embedding_model(sparse)
        trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.1), loss={"a": "mse", "b": "mse"}, **options())
        history = trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, progress=False).history
        found.append((model.get_weights(), history))
    (sparse_weights, sparse_history), (dense_weights, dense_history) = found
    for a, b in zip(sparse_weights, dense_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert sparse_history.keys() == dense_history.keys()
    for key in dense_history:
        np.testing.assert_allclose(sparse_history[key], dense_history[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("make", [lambda: GradNorm(1.5), DWA], ids=["gradnorm", "dwa"])
def test_a_loss_weighting_learns_for_one_model_and_continues_only_there(make):
    """A weighting object reused for a new model (a sweep over seeds with one config) started from the weights the
    last run learned (GradNorm: first epoch 7.017 against 8.371), or failed with a bare 'slice index 2 of dimension
    0 out of bounds' for other components. Now an error; a new Trainer on the same model continues it, as an
    optimizer object does."""
    x, y = helpers.example1_data(64)
    weighting = make()

    def run(model, loss=heads_apart):
        trainer = Trainer(model, optimizer=keras.optimizers.SGD(5e-4), loss=loss, aggregator=weighting, seed=1)
        return trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, progress=False).history

    keras.utils.set_random_seed(0)
    model = helpers.example1()
    first = run(model)
    with pytest.raises(ValueError, match=rf"This {type(weighting).__name__} already holds what it learned training "
                                         r"another model.*one for each Trainer"):  # fmt: skip
        run(helpers.example1())
    with pytest.raises(ValueError, match=r"weighs the components \['mse', 'ce'\].*\['mse', 'ce', 'agreement'\]"):
        run(model, three_components)
    keras.utils.set_random_seed(0)
    twin = helpers.example1()
    keras.utils.set_random_seed(0)
    other = make()
    expected = Trainer(twin, optimizer=keras.optimizers.SGD(5e-4), loss=heads_apart, aggregator=other, seed=1)
    expected.fit(x, y, batch_size=16, epochs=4, shuffle=False, progress=False)
    run(model)  # the same model: epochs 3 and 4 continue the weighting's state
    np.testing.assert_allclose(weighting.factors.numpy(), other.factors.numpy(), rtol=1e-5)
    assert first.keys() >= {"loss_weight/mse", "loss_weight/ce"}


def test_a_loss_with_trainable_variables_is_not_carried_into_another_models_training():
    """UncertaintyWeighting's log-variances, reused for a new model, started where the last run ended; a loss whose
    variables are not trainable (a frozen feature extractor) is shared freely."""
    from losses import UncertaintyWeighting, per_output

    x, y = helpers.example1_data(32)
    parts = {"mse": per_output("mse", output="regression_output"),
             "ce": per_output("categorical_crossentropy", output="classification_output")}  # fmt: skip
    weighting = UncertaintyWeighting(parts, regression={"mse"})
    model = helpers.example1()
    Trainer(model, optimizer="sgd", loss=weighting).fit(x, y, batch_size=16, progress=False)
    Trainer(model, optimizer="sgd", loss=weighting)  # the same model: continues
    with pytest.raises(ValueError, match=r"The loss \(UncertaintyWeighting\) owns trainable variables .*another model"):
        Trainer(helpers.example1(), optimizer="sgd", loss=weighting)
    with pytest.raises(ValueError, match=r"The loss 'uw' \(UncertaintyWeighting\) owns trainable variables"):
        Trainer(helpers.example1(), optimizer="sgd", loss={"uw": weighting})
    frozen = keras.Sequential([keras.layers.Dense(3, trainable=False)])

    def features(outputs, targets):
        gap = frozen(outputs["classification_output"]) - frozen(targets["classification_output"])
        return tf.reduce_mean(tf.square(gap))

    for _ in range(2):
        Trainer(helpers.example1(), optimizer="sgd", loss=features).fit(x, y, batch_size=16, progress=False)
