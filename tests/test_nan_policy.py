"""nan_policy, hostile loss returns and seeded determinism: non-finite steps skipped or named, never applied."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer import LossProtocolError, NonFiniteLossError, Trainer


def _poisoned(bad_batches: set[int], batch: int = 4, n: int = 32):
    """Targets with NaN in the given batches (NaN in the data shows as a non-finite loss at that step)."""
    x, y = helpers.small_data(n)
    y = {"output": y["output"].copy()}
    for b in bad_batches:
        y["output"][b * batch] = np.nan
    return x, y


@pytest.mark.parametrize("metrics", [None, {"output": ["mae"]}])
def test_skip_policy_skips_bad_steps_exactly_and_logs_them(metrics):
    """Skipping batches 2 and 5 equals training with SGD on the other batches only. The skipped steps are not
    tracked: batch means are masked, Keras metric objects (mae) are not updated."""
    x, y = _poisoned({2, 5})
    model = helpers.small_model(dropout=0.0)  # a skipped step still draws dropout masks: no dropout, to compare exactly
    clean = helpers.clone(model)
    options = {"optimizer": keras.optimizers.SGD(0.05), "loss": {"output": "mse"}, "metrics": metrics}
    trainer = Trainer(model, nan_policy="skip", **options)
    history = trainer.fit((x, y), batch_size=4, shuffle=False, progress=False)
    assert history.history["skipped_steps"] == [2.0] and trainer.global_step == 8
    assert trainer.optimizer.iterations.numpy() == 6
    keep = np.concatenate([np.arange(b * 4, b * 4 + 4) for b in range(8) if b not in {2, 5}])
    ref = Trainer(clean, steps_per_execution=1, **{**options, "optimizer": keras.optimizers.SGD(0.05)})
    ref_history = ref.fit((x[keep], {"output": y["output"][keep]}), batch_size=4, shuffle=False, progress=False)
    for a, b in zip(model.get_weights(), clean.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for key in ("loss", "output/mae") if metrics else ("loss",):
        assert np.isfinite(history.history[key][0])
        assert history.history[key][0] == pytest.approx(ref_history.history[key][0], rel=1e-5)  # bad steps untracked


def test_skip_policy_raises_after_too_many_consecutive_skips():
    x, y = _poisoned({1, 2, 3, 4})
    model = helpers.small_model()
    trainer = Trainer(model, loss={"output": "mse"}, nan_policy="skip", max_consecutive_skips=3)
    with pytest.raises(NonFiniteLossError, match=r"4 consecutive non-finite training steps, up to step 5") as info:
        trainer.fit((x, y), batch_size=4, shuffle=False, progress=False)
    assert info.value.keys == ["loss", "output"]
    assert trainer.optimizer.iterations.numpy() == 1


def test_nan_in_targets_raises_by_default_naming_component_and_step():
    x, y = _poisoned({3})
    model = helpers.small_model()
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss={"output": "mse"})
    with pytest.raises(NonFiniteLossError, match="Non-finite loss at training step 4: loss=nan, output=nan"):
        trainer.fit((x, y), batch_size=4, shuffle=False, progress=False)
    assert trainer.optimizer.iterations.numpy() == 3


def test_unknown_nan_policy_is_rejected():
    with pytest.raises(ValueError, match="`nan_policy` must be one of 'raise', 'skip'; got 'ignore'"):
        Trainer(helpers.small_model(), loss={"output": "mse"}, nan_policy="ignore")


# -- hostile loss returns -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (lambda o: None, "loss 'bad' returned None"),
        (lambda o: o["output"], r"loss 'bad' returned shape \(4, 1\)"),
        (lambda o: tf.constant(3), "loss 'bad' returned a int32 tensor"),
        (lambda o: {"a": {"b": tf.reduce_mean(o["output"])}}, "loss 'bad' .*returned a nested dict"),
        (lambda o: {}, "loss 'bad' returned an empty dict"),
        (lambda o: {1: tf.reduce_mean(o["output"])}, r"loss 'bad' returned component keys \[1\]"),
        (lambda o: "0.5", "loss 'bad' returned a string tensor"),
    ],
    ids=["None", "non-scalar", "int", "nested", "empty", "int-key", "str"],
)
def test_hostile_loss_returns_are_named_before_any_update(value, message):
    model = helpers.small_model()
    before = [w.copy() for w in model.get_weights()]
    trainer = Trainer(model, loss={"output": "mse", "bad": lambda outputs, targets: value(outputs)})
    with pytest.raises(LossProtocolError, match=message):
        trainer.fit(helpers.small_data(8), batch_size=4, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before, strict=True))


def test_seeded_runs_are_identical():
    """keras.utils.set_random_seed (what --seed does) fixes initial weights, dropout and shuffling."""

    def run():
        keras.utils.set_random_seed(11)
        model = helpers.small_model()
        Trainer(model, loss={"output": "mse"}, seed=11).fit(
            helpers.small_data(), batch_size=8, epochs=2, progress=False
        )
        return model.get_weights()

    assert all(np.array_equal(a, b) for a, b in zip(run(), run(), strict=True))


def _unknown_length(x, y, batch):
    """The same batches from a pipeline whose length TensorFlow does not know (a filter)."""
    data = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True)
    return data.batch(batch)


@pytest.mark.parametrize("known_length", [True, False])
@pytest.mark.parametrize("bad_step", [1, 2, 4, 5, 7])
def test_a_non_finite_step_anywhere_in_a_block_changes_no_weight(bad_step, known_length):
    """In blocks of 4 steps, a NaN at a block's first (step 1, 5), a middle (2, 7) or its last step (4), from data
    of known or unknown length, stops before that step's update: the weights are those of a run over the steps
    before it, bit for bit (also a guard for any restructuring of the in-graph loop)."""
    x, y = _poisoned({bad_step - 1})
    model, reference = helpers.small_model(), helpers.small_model()
    data = (x, y) if known_length else _unknown_length(x, y, 4)
    trainer = Trainer(model, optimizer=keras.optimizers.Adam(0.05), loss={"output": "mse"}, steps_per_execution=4)
    with pytest.raises(NonFiniteLossError, match=f"Non-finite loss at training step {bad_step}: loss=nan"):
        trainer.fit(data, batch_size=4 if known_length else None, shuffle=False, progress=False)
    assert trainer.global_step == trainer.optimizer.iterations.numpy() == bad_step - 1
    clean = (x[: 4 * (bad_step - 1)], {"output": y["output"][: 4 * (bad_step - 1)]})
    if bad_step > 1:
        Trainer(reference, optimizer=keras.optimizers.Adam(0.05), loss={"output": "mse"}).fit(
            clean, batch_size=4, shuffle=False, progress=False
        )
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [32, 28, 20, 4])
def test_data_ending_inside_a_block_applies_every_step_once(n):
    """A pipeline of unknown length ends inside a block (or fills its blocks exactly): every step is applied once,
    bit-identical to one step per call, and the logs are the same."""
    x, y = helpers.small_data(n)
    runs = []
    for steps in (1, 3, 4):
        model = helpers.small_model()
        trainer = Trainer(
            model, optimizer=keras.optimizers.Adam(0.05), loss={"output": "mse"}, steps_per_execution=steps
        )
        history = trainer.fit(_unknown_length(x, y, 4), epochs=2, progress=False).history
        runs.append((history, model.get_weights(), trainer.global_step))
    for history, weights, global_step in runs[1:]:
        assert history == runs[0][0] and global_step == runs[0][2] == 2 * (n // 4)
        for a, b in zip(weights, runs[0][1], strict=True):
            np.testing.assert_array_equal(a, b)
