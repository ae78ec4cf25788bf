"""Reliability: exact resume after a crash, damaged checkpoints, nan_policy, hostile loss returns (killed processes:
test_kill_resume.py)."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer import Trainer


def _fit(model, directory, *, crash_at=None, dataset=False, epochs=3, global_seed=5, callbacks=(), **kwargs):
    keras.utils.set_random_seed(global_seed)
    trainer = Trainer(
        model, optimizer=keras.optimizers.Adam(0.02), loss={"output": "mse"}, steps_per_execution=2, seed=9
    )
    x, y = helpers.small_data()
    train = (x, y)
    if dataset == "PyDataset":
        train = helpers.Batches(x, y["output"], 6)
    elif dataset:
        shuffled = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(44, seed=2, reshuffle_each_iteration=False)
        train = shuffled.batch(6).cache().prefetch(2)
    callbacks = [*(callbacks() if callbacks else ()), *([helpers.Crash(trainer, crash_at)] if crash_at else [])]
    fit_kwargs = {} if dataset else {"batch_size": 6}
    history = trainer.fit(
        train, epochs=epochs, callbacks=callbacks, progress=False, checkpoint_dir=directory, **fit_kwargs, **kwargs
    )
    return trainer, history


@pytest.mark.parametrize("dataset", [False, True, "PyDataset"], ids=["numpy", "tf.data", "PyDataset"])
def test_crash_mid_epoch_then_fit_again_resumes_exactly(dataset, tmp_path):
    """Numpy input and a PyDataset: shuffle seed + position; a tf.data dataset (shuffle buffer, cache): its
    iterator's state."""
    reference = helpers.small_model()
    _, ref_history = _fit(reference, tmp_path / "ref", dataset=dataset, checkpoint_every=4)
    model = helpers.small_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(model, tmp_path / "run", crash_at=14, dataset=dataset, checkpoint_every=4)  # 8 steps per epoch
    # Other weights and dropout seed: everything must come from the checkpoint (ckpt-12: mid-epoch 2). Numpy input
    # is shuffled from (seed, epoch) alone: even TensorFlow's global seed may differ. A tf.data shuffle's order
    # depends on the global seed, so that run resumes with the same one (as a rerun with the same --seed does).
    resumed = helpers.small_model(seed=1)
    global_seed = 5 if dataset is True else 6
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the same data: no warning that it changed
        trainer, history = _fit(resumed, tmp_path / "run", dataset=dataset, checkpoint_every=4, global_seed=global_seed)
    assert trainer.global_step == 24
    assert all(np.array_equal(a, b) for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True))
    assert history.history == ref_history.history


def test_early_stopping_and_reduce_lr_on_plateau_resume_with_their_state(tmp_path):
    """Both see no improvement after epoch 0 (min_delta 10): the plateau halves the rate after epoch 1, early
    stopping stops after epoch 2 and restores epoch 0's weights. A crash inside epoch 2 and a resume must do the
    same: without their state, both would start counting again from the resumed epoch."""

    def callbacks():
        return [
            keras.callbacks.EarlyStopping(monitor="loss", patience=2, min_delta=10.0, restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=1, min_delta=10.0, factor=0.5, cooldown=1),
        ]

    reference = helpers.small_model()
    _, ref_history = _fit(reference, tmp_path / "ref", epochs=6, callbacks=callbacks, checkpoint_every=4)
    assert len(ref_history.history["loss"]) == 3  # stopped after epoch 2 (0-based)
    model = helpers.small_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(model, tmp_path / "run", epochs=6, callbacks=callbacks, crash_at=19, checkpoint_every=4)
    resumed = helpers.small_model(seed=1)
    _, history = _fit(resumed, tmp_path / "run", epochs=6, callbacks=callbacks, checkpoint_every=4)
    assert history.history == ref_history.history and history.history["lr"][-1] == pytest.approx(0.01)
    assert all(np.array_equal(a, b) for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True))


class Counting(keras.callbacks.Callback):
    """A user's callback with state: the state_dict/load_state_dict protocol, arrays included."""

    def __init__(self):
        super().__init__()
        self.epochs_seen, self.last = 0, np.zeros(3)

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_seen += 1
        self.last = self.last + logs["loss"]

    def state_dict(self):
        return {"epochs_seen": self.epochs_seen, "last": self.last}

    def load_state_dict(self, state):
        self.epochs_seen, self.last = state["epochs_seen"], state["last"]


def test_a_users_callback_gets_its_state_back_through_state_dict(tmp_path):
    counting = Counting()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(
            helpers.small_model(), tmp_path, callbacks=lambda: [counting], crash_at=19, checkpoint_every=4
        )  # in epoch 2
    assert counting.epochs_seen == 2
    resumed = Counting()
    _, history = _fit(helpers.small_model(), tmp_path, callbacks=lambda: [resumed], checkpoint_every=4)
    assert resumed.epochs_seen == 3
    np.testing.assert_allclose(resumed.last, np.full(3, sum(history.history["loss"])), rtol=1e-6)


def test_a_resume_mid_epoch_with_another_batch_size_warns(tmp_path):
    """A rerun with another batch size (after an out-of-memory error, say) resumed mid-epoch at the saved step of
    an epoch that now has other batches, silently; the resume is the user's to judge, so it warns."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(helpers.small_model(), tmp_path, crash_at=13, checkpoint_every=4)  # 8 steps per epoch; ckpt-12
    x, y = helpers.small_data()
    trainer = Trainer(helpers.small_model(), optimizer=keras.optimizers.Adam(0.02), loss={"output": "mse"}, seed=9)
    message = r"saved after step 4 of epoch 2, of 8 steps per epoch; the data now gives 4 \(another batch size"
    with pytest.warns(RuntimeWarning, match=message):
        trainer.fit((x, y), batch_size=12, epochs=3, progress=False, checkpoint_dir=tmp_path)
    assert trainer.global_step == 12 + 0 + 4  # epoch 2 had no step left at 4 of 4, epoch 3 ran its 4


def test_a_resume_with_another_learning_rate_or_loss_weights_warns_and_continues_with_the_checkpoints(tmp_path):
    """The checkpoint's optimizer (its learning rate) and loss weights were restored over the new Trainer's, silently:
    a user resuming "with a lower learning rate" trained at the old one. Resuming exactly stays the rule (as Keras'
    BackupAndRestore restores the optimizer); the warning names both values and how to change them."""
    x, y = helpers.small_data()

    def trainer(lr, weight):
        return Trainer(helpers.small_model(), optimizer=keras.optimizers.Adam(lr), loss={"output": "mse"},
                       loss_weights={"output": weight}, seed=9)  # fmt: skip

    trainer(0.02, 1.0).fit((x, y), batch_size=6, epochs=1, progress=False, checkpoint_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the same settings: no warning
        trainer(0.02, 1.0).fit((x, y), batch_size=6, epochs=2, progress=False, checkpoint_dir=tmp_path)
    resumed = trainer(0.001, 3.0)
    message = (
        r"the checkpoint was given learning_rate=0\.02 and loss_weights=\{'output': 1\.0\}; this Trainer was given "
        r"learning_rate=0\.001 and loss_weights=\{'output': 3\.0\}\. Training continues with the checkpoint's"
    )
    with pytest.warns(RuntimeWarning, match=message):
        history = resumed.fit((x, y), batch_size=6, epochs=3, progress=False, checkpoint_dir=tmp_path).history
    assert history["lr"][-1] == pytest.approx(0.02)
    assert float(resumed.loss_weights["output"].numpy()) == 1.0
    again = trainer(0.001, 1.0)  # the way to change it: after the restore

    def lower(logs):
        again.optimizer.learning_rate = 0.001

    with pytest.warns(RuntimeWarning, match="learning_rate=0.001"):
        history = again.fit((x, y), batch_size=6, epochs=4, progress=False, checkpoint_dir=tmp_path,
                            callbacks=[keras.callbacks.LambdaCallback(on_train_begin=lower)]).history  # fmt: skip
    assert history["lr"][-1] == pytest.approx(0.001)


def test_finished_run_resumes_to_nothing_and_epochs_is_absolute(tmp_path):
    model = helpers.small_model()
    trainer, _ = _fit(model, tmp_path, epochs=2)
    assert trainer.global_step == 16
    again = helpers.small_model(seed=1)
    trainer, history = _fit(again, tmp_path, epochs=2)  # nothing left to do
    assert trainer.global_step == 16 and len(history.history["loss"]) == 2
    assert all(np.array_equal(a, b) for a, b in zip(again.get_weights(), model.get_weights(), strict=True))
    trainer, history = _fit(helpers.small_model(), tmp_path, epochs=3)  # one more epoch
    assert trainer.global_step == 24 and len(history.history["loss"]) == 3


def test_damaged_latest_checkpoint_warns_and_falls_back(tmp_path):
    reference = helpers.small_model()
    _fit(reference, tmp_path / "ref", checkpoint_every=4)
    model = helpers.small_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(model, tmp_path / "run", crash_at=13, checkpoint_every=4)  # checkpoints 4, 8, 12
    latest = tf.train.latest_checkpoint(str(tmp_path / "run"))
    assert latest.endswith("ckpt-12")
    data = Path(latest + ".data-00000-of-00001")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated
    (tmp_path / "run" / "ckpt-16_temp").mkdir()  # what a kill during a save leaves behind
    (tmp_path / "run" / "ckpt-16_temp" / "part").write_bytes(b"\0" * 10)
    resumed = helpers.small_model(seed=1)
    with pytest.warns(RuntimeWarning, match=r"ckpt-12 could not be restored .* falling back"):
        _fit(resumed, tmp_path / "run", checkpoint_every=4)
    assert not (tmp_path / "run" / "ckpt-16_temp").exists()
    assert all(np.array_equal(a, b) for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True))


def test_no_readable_checkpoint_is_an_error_naming_them(tmp_path):
    _fit(helpers.small_model(), tmp_path, epochs=1)
    for data in tmp_path.glob("*.data-*"):
        data.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match=r"No checkpoint in .* could be restored"):
        _fit(helpers.small_model(), tmp_path, epochs=2)


def test_checkpoint_every_needs_a_directory():
    trainer = Trainer(helpers.small_model(), loss={"output": "mse"})
    with pytest.raises(ValueError, match="`checkpoint_every` needs `checkpoint_dir`"):
        trainer.fit(helpers.small_data(), batch_size=4, checkpoint_every=3, progress=False)


# -- nan_policy ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "garbled"])
def test_a_missing_or_garbled_index_warns_and_resumes_from_the_files_present(damage, tmp_path):
    reference = helpers.small_model()
    _, ref_history = _fit(reference, tmp_path / "ref", checkpoint_every=4)
    model = helpers.small_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(model, tmp_path / "run", crash_at=14, checkpoint_every=4)  # ckpt-4, 8, 12 on disk
    index = tmp_path / "run" / "checkpoint"
    index.unlink() if damage == "deleted" else index.write_text("garbage{{{")
    resumed = helpers.small_model(seed=1)
    with pytest.warns(RuntimeWarning, match=r"checkpoint is missing or unreadable; .* ckpt-12, ckpt-8, ckpt-4"):
        _, history = _fit(resumed, tmp_path / "run", checkpoint_every=4)
    assert history.history == ref_history.history
    assert all(np.array_equal(a, b) for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True))


def test_tensorboard_writes_each_step_and_epoch_once_across_a_resume(tmp_path):
    """TensorBoard every 2 steps, a checkpoint every 8 (= one epoch): a crash at step 14 leaves steps 10 and 12 and
    epoch 0... on disk after ckpt-8; the resumed run recomputes them and must not write them twice."""
    from trainer import TensorBoardWriter, WriterCallback

    board = tmp_path / "tb"

    def callbacks():
        return [WriterCallback(TensorBoardWriter(board, every_n_steps=2))]

    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(helpers.small_model(), tmp_path / "run", callbacks=callbacks, crash_at=14, checkpoint_every=8)
    _fit(helpers.small_model(), tmp_path / "run", callbacks=callbacks, checkpoint_every=8)
    seen = []
    for path in board.glob("*/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            seen += [(value.tag, event.step) for value in event.summary.value if value.tag.endswith("_loss")]
    assert sorted(seen) == sorted([("epoch_loss", e) for e in range(3)] + [("batch_loss", s) for s in range(2, 25, 2)])


def test_generator_input_with_checkpoints_warns_saves_and_resumes_by_replaying(tmp_path):
    """from_generator holds Python state tf.data cannot save: no iterator in the checkpoints (saving one would
    fail), a warning at the start, and a resume that replays the epoch's batches — still exact."""
    x, y = helpers.small_data()

    def generator():
        yield from zip(x, y["output"])

    def fit(model, directory, crash_at=None):
        keras.utils.set_random_seed(5)
        signature = (tf.TensorSpec((5,), tf.float32), tf.TensorSpec((1,), tf.float32))
        source = tf.data.Dataset.from_generator(generator, output_signature=signature)
        data = source.map(lambda a, b: (a, {"output": b})).batch(6).apply(tf.data.experimental.assert_cardinality(8))
        trainer = Trainer(model, optimizer=keras.optimizers.Adam(0.02), loss={"output": "mse"}, steps_per_execution=2)
        crash = [helpers.Crash(trainer, crash_at)] if crash_at else []
        with pytest.warns(RuntimeWarning, match=r"with Python state \(from_generator, py_function"):
            return trainer.fit(data, epochs=3, progress=False, checkpoint_dir=directory, checkpoint_every=4,
                               callbacks=crash)  # fmt: skip

    reference = helpers.small_model()
    ref_history = fit(reference, tmp_path / "ref")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(helpers.small_model(), tmp_path / "run", crash_at=14)
    names = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "run"))).get_variable_to_shape_map()
    assert not any(name.startswith("iterator") for name in names)
    resumed = helpers.small_model(seed=1)
    history = fit(resumed, tmp_path / "run")
    assert history.history == ref_history.history
    assert all(np.array_equal(a, b) for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True))


def _reshuffling_fit(model, directory, callbacks=(), epochs=3):
    """A tf.data pipeline reshuffled every epoch (the default), a validation set, a checkpoint at each epoch's end."""
    keras.utils.set_random_seed(5)
    x, y = helpers.small_data()
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(44, seed=2).batch(6)
    trainer = Trainer(model, optimizer=keras.optimizers.Adam(0.02), loss={"output": "mse"}, steps_per_execution=2)
    callbacks = [cb(trainer) for cb in callbacks]
    validation = (x[:12], {"output": y["output"][:12]})
    fit = {"validation_data": validation, "progress": False, "checkpoint_dir": directory, "callbacks": callbacks}
    return trainer.fit(train, epochs=epochs, **fit)


def test_a_fallback_to_an_epoch_boundary_checkpoint_resumes_a_reshuffling_dataset_exactly(tmp_path):
    reference = helpers.small_model()
    ref_history = _reshuffling_fit(reference, tmp_path / "ref")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _reshuffling_fit(helpers.small_model(), tmp_path / "run", [lambda t: helpers.Crash(t, 20)])  # in epoch 3
    assert tf.train.get_checkpoint_state(str(tmp_path / "run")).all_model_checkpoint_paths[-2:] == [
        str(tmp_path / "run" / "ckpt-8"), str(tmp_path / "run" / "ckpt-16")]  # fmt: skip
    data = tmp_path / "run" / "ckpt-16.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    resumed = helpers.small_model(seed=1)
    with pytest.warns(RuntimeWarning, match=r"ckpt-16 could not be restored .* falling back"):
        history = _reshuffling_fit(resumed, tmp_path / "run")  # from ckpt-8: the end of epoch 1
    assert history.history == ref_history.history
    assert all(np.array_equal(a, b) for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True))


class TermDuringValidation(keras.callbacks.Callback):
    """SIGTERM to this process once, during the first epoch's validation."""

    def __init__(self, trainer):
        super().__init__()
        self.sent = False

    def on_test_batch_end(self, batch, logs=None):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_validation_finishes_the_epoch_saves_and_resumes_exactly(tmp_path):
    from trainer import TrainingInterrupted

    reference = helpers.small_model()
    ref_history = _reshuffling_fit(reference, tmp_path / "ref")
    with pytest.raises(TrainingInterrupted, match="SIGTERM after step 8") as stopped:
        _reshuffling_fit(helpers.small_model(), tmp_path / "run", [TermDuringValidation])
    assert stopped.value.checkpoint == str(tmp_path / "run" / "ckpt-8")
    resumed = helpers.small_model(seed=1)
    history = _reshuffling_fit(resumed, tmp_path / "run")
    assert history.history == ref_history.history  # epoch 1's row (its validation included) was kept, not redone
    assert all(np.array_equal(a, b) for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True))
