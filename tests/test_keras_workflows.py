"""Keras' callbacks, weighted metrics, EMA optimizers and the fine-tuning workflow, held against Model.fit on the
same model, data and order."""

import functools
import json
import os
import warnings

import keras
import numpy as np
import pytest
from keras import layers

from tests import helpers
from tests.helpers import assert_history_close, assert_weights_close
from trainer import NonFiniteLossError, Trainer


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = layers.Input((5,))
    return keras.Model(inp, layers.Dense(1)(layers.Dense(8, activation="relu")(inp)))


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype("float32")
    return x, (x @ rng.normal(size=(5, 1))).astype("float32")


TRAIN, VAL = _data(40, 3), _data(16, 4)
FIT = {"batch_size": 8, "shuffle": False, "validation_data": VAL}


def _pair(optimizer=lambda: keras.optimizers.SGD(0.05)):
    """(our model, its Trainer, Keras' twin compiled the same way)."""
    model = _model()
    twin = helpers.clone(model)
    twin.compile(optimizer=optimizer(), loss="mse")
    return model, Trainer(model, optimizer=optimizer(), loss="mse"), twin


CALLBACKS = {
    "early_stopping_restores_the_best_weights": lambda: keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=1, restore_best_weights=True
    ),
    "early_stopping_from_an_epoch": lambda: keras.callbacks.EarlyStopping(
        monitor="loss", patience=0, min_delta=10.0, start_from_epoch=3
    ),
    "reduce_lr_on_plateau": lambda: keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0),
    "learning_rate_scheduler": lambda: keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.7),
}


@pytest.mark.parametrize("make", CALLBACKS.values(), ids=CALLBACKS.keys())
def test_keras_callbacks_change_training_as_in_fit(make):
    model, trainer, twin = _pair()
    theirs = twin.fit(*TRAIN, epochs=8, verbose=0, callbacks=[make()], **FIT).history
    ours = trainer.fit(*TRAIN, epochs=8, progress=False, callbacks=[make()], **FIT).history
    assert len(ours["loss"]) == len(theirs["loss"])  # where it stopped
    keys = {k: k for k in theirs}  # loss, val_loss and, from the learning-rate callbacks, learning_rate
    assert_history_close(ours, theirs, keys)
    assert_weights_close(model, twin)
    assert float(trainer.optimizer.learning_rate) == float(twin.optimizer.learning_rate)


def test_model_checkpoint_saves_what_fit_saves(tmp_path):
    _, trainer, twin = _pair()

    def callbacks(directory):
        return [
            keras.callbacks.ModelCheckpoint(
                str(directory / "best.weights.h5"), monitor="val_loss", save_best_only=True, save_weights_only=True
            ),
            keras.callbacks.ModelCheckpoint(str(directory / "e{epoch:02d}.keras")),
        ]

    twin.fit(*TRAIN, epochs=4, verbose=0, callbacks=callbacks(tmp_path / "keras"), **FIT)
    trainer.fit(*TRAIN, epochs=4, progress=False, callbacks=callbacks(tmp_path / "ours"), **FIT)
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "keras"))
    for name in ("best.weights.h5", "e02.keras", "e04.keras"):
        if name.endswith(".keras"):
            saved = [keras.models.load_model(tmp_path / side / name) for side in ("ours", "keras")]
        else:
            saved = [_model(), _model()]
            for side, into in zip(("ours", "keras"), saved):
                into.load_weights(tmp_path / side / name)
        assert_weights_close(*saved)


class _Crash(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("crash after the third epoch")


def test_backup_and_restore_resumes_after_the_last_backed_up_epoch_as_fit_does(tmp_path):
    """A run that crashed after epoch 3 of 5, restarted (a new model and optimizer) with the same BackupAndRestore:
    Model.fit restores the weights and the optimizer's state (Adam) and trains epochs 4 and 5 only. tapeloop used to
    restore them and then train all 5 epochs again."""
    histories, restarted = {}, {}
    for side in ("keras", "ours"):
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / side), delete_checkpoint=False)
        for attempt in ("crash", "restart"):
            model, trainer, twin = _pair(lambda: keras.optimizers.Adam(0.01))
            run = {"epochs": 5, **FIT}
            if side == "keras":
                fit = functools.partial(twin.fit, *TRAIN, verbose=0, **run)
            else:
                fit = functools.partial(trainer.fit, *TRAIN, progress=False, **run)
            if attempt == "crash":
                with pytest.raises(RuntimeError, match="crash after the third epoch"):
                    fit(callbacks=[backup, _Crash()])
                assert json.loads((tmp_path / side / "training_metadata.json").read_text())["epoch"] == 3
            else:
                histories[side] = fit(callbacks=[backup]).history
                restarted[side] = (model, trainer) if side == "ours" else twin
    assert len(histories["keras"]["loss"]) == 2
    assert_history_close(histories["ours"], histories["keras"], {"loss": "loss", "val_loss": "val_loss"})
    model, trainer = restarted["ours"]
    assert_weights_close(model, restarted["keras"])
    # The restored epoch counts for that fit only: the next one trains from epoch 0 (Keras keeps the model's
    # restored initial epoch, so its next fit(epochs=1) trains nothing).
    assert len(trainer.fit(*TRAIN, epochs=1, progress=False, **FIT).history["loss"]) == 1
    assert restarted["keras"].fit(*TRAIN, epochs=1, verbose=0, **FIT).history == {}


def test_backup_and_restore_with_a_checkpoint_dir_is_refused_before_training(tmp_path):
    model, trainer, _ = _pair()
    before = helpers.weights(model)
    with pytest.raises(ValueError, match=r"either checkpoint_dir or keras\.callbacks\.BackupAndRestore"):
        trainer.fit(*TRAIN, epochs=1, progress=False, checkpoint_dir=str(tmp_path / "ckpt"),
                    callbacks=keras.callbacks.BackupAndRestore(str(tmp_path / "backup")))  # fmt: skip
    for a, b in zip(helpers.weights(model), before):
        np.testing.assert_array_equal(a, b)


def test_fine_tuning_after_unfreezing_takes_a_new_trainer_as_fit_takes_a_new_compile():
    """keras.io's transfer-learning recipe: train the head on a frozen base, unfreeze it, train again at a lower rate.
    Keras needs compile() again (without it, fit silently keeps the base frozen); a Trainer keeps the variables it was
    built with, so the second fit on it is an error naming them, and a new Trainer matches the recompiled model."""

    def build():
        keras.utils.set_random_seed(0)
        base = keras.Sequential(
            [layers.Input((5,)), layers.Dense(8, activation="relu"), layers.BatchNormalization()], name="base"
        )
        inp = layers.Input((5,))
        return keras.Model(inp, layers.Dense(1)(base(inp))), base

    (model, base), (twin, twin_base) = build(), build()
    base.trainable = twin_base.trainable = False
    twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    args = {"batch_size": 8, "epochs": 2, "shuffle": False}
    theirs = twin.fit(*TRAIN, verbose=0, **args).history
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss="mse")
    assert_history_close(trainer.fit(*TRAIN, progress=False, **args).history, theirs, {"loss": "loss"})

    base.trainable = twin_base.trainable = True
    before = helpers.weights(model)
    changed = r"now trainable: \['base/dense(_\d+)?/kernel', 'base/dense(_\d+)?/bias', 'base/batch_normalization"
    with pytest.raises(ValueError, match=changed):
        trainer.fit(*TRAIN, progress=False, **args)
    for a, b in zip(helpers.weights(model), before):
        np.testing.assert_array_equal(a, b)

    twin.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    theirs = twin.fit(*TRAIN, verbose=0, **args).history
    ours = Trainer(model, optimizer=keras.optimizers.SGD(0.01), loss="mse").fit(*TRAIN, progress=False, **args).history
    assert_history_close(ours, theirs, {"loss": "loss"})
    assert_weights_close(model, twin)


def test_a_compiled_model_keeps_its_own_optimizer_after_a_trainer_ran_on_it():
    """Callbacks see the Trainer's optimizer as ``self.model.optimizer`` during fit; it stayed on the model after, so
    the model's own compiled ``fit`` afterwards trained with the Trainer's Adam, not its SGD (loss 0.339 against
    0.212). Also after ``evaluate`` with callbacks; an uncompiled model gets no optimizer."""
    model, _, twin = _pair()
    own = keras.optimizers.SGD(0.1)
    model.compile(optimizer=own, loss="mse")
    trainer = Trainer(model, optimizer=keras.optimizers.Adam(0.01), loss="mse")
    seen = []
    watch = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: seen.append(watch.model.optimizer))
    trainer.fit(*TRAIN, batch_size=8, shuffle=False, progress=False, callbacks=[watch])
    trainer.evaluate(*TRAIN, callbacks=[keras.callbacks.LambdaCallback()])
    assert seen == [trainer.optimizer] and model.optimizer is own
    twin.set_weights(model.get_weights())
    twin.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    args = {"batch_size": 8, "epochs": 1, "shuffle": False, "verbose": 0}
    np.testing.assert_allclose(model.fit(*TRAIN, **args).history["loss"], twin.fit(*TRAIN, **args).history["loss"])
    assert_weights_close(model, twin)
    fresh, _, _ = _pair()
    Trainer(fresh, optimizer="adam", loss="mse").fit(*TRAIN, batch_size=8, progress=False)
    assert getattr(fresh, "optimizer", None) is None
    for call in (trainer.fit, trainer.evaluate):  # a callback that is not one: refused before the model is lent
        with pytest.raises(TypeError, match=r"keras\.callbacks\.Callback objects, got str"):
            call(*TRAIN, callbacks=["print"])
        assert model.optimizer is own


def test_weighted_metrics_use_the_sample_weights_as_in_fit():
    """A metric in both lists is logged twice, the weighted one as ``weighted_<name>`` — Keras' names."""
    x, y = TRAIN
    weights = np.random.default_rng(5).uniform(0.1, 3.0, len(x)).astype("float32")
    val = (*VAL, np.linspace(0.2, 2.0, len(VAL[0]), dtype="float32"))
    model, _, twin = _pair()
    compiled = {"loss": "mse", "metrics": ["mae"], "weighted_metrics": ["mae", keras.metrics.MeanSquaredError()]}
    twin.compile(optimizer=keras.optimizers.SGD(0.05), **compiled)
    args = {"batch_size": 8, "epochs": 2, "shuffle": False, "sample_weight": weights, "validation_data": val}
    theirs = twin.fit(x, y, verbose=0, **args).history
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), **compiled)
    ours = trainer.fit(x, y, progress=False, **args).history
    keys = ["loss", "mae", "weighted_mae", "mean_squared_error"]
    assert set(ours) - {"lr"} == set(theirs) == {*keys, *(f"val_{k}" for k in keys)}
    assert_history_close(ours, theirs, {k: k for k in theirs})
    assert ours["mae"] != ours["weighted_mae"]
    assert_weights_close(model, twin)
    assert_history_close(
        trainer.evaluate(*VAL, sample_weight=val[2]),
        twin.evaluate(*VAL, sample_weight=val[2], verbose=0, return_dict=True),
        {k: k for k in keys},
    )


def test_batch_hooks_see_the_logs_fit_gives_them_and_the_last_batch_run():
    """Per-batch logs (what a callback sends to an experiment tracker) are Keras' running means, and every hook gets a
    dict (on_epoch_begin got None). With several steps per call both report once per block; Keras 3.15 numbers a block
    by its nominal end (batch 3 of a 3-batch epoch, batch 1 of a 1-batch evaluation), tapeloop by the last batch run."""

    def recorder(seen):
        def note(kind):
            return lambda index, logs: seen.append((kind, index, {k: round(float(v), 6) for k, v in logs.items()}))

        return keras.callbacks.LambdaCallback(
            on_epoch_begin=note("epoch"), on_train_batch_end=note("train"), on_test_batch_end=note("test")
        )

    x, y = _data(48, 3)
    for spe, renumbered in ((1, {}), (2, {("train", 3): 2, ("test", 1): 0})):
        model, _, twin = _pair()
        twin.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"], steps_per_execution=spe)
        theirs, ours = [], []
        args = {"batch_size": 16, "epochs": 2, "shuffle": False, "validation_data": (x[:16], y[:16])}
        twin.fit(x, y, verbose=0, callbacks=[recorder(theirs)], **args)
        trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"],
                          steps_per_execution=spe)  # fmt: skip
        trainer.fit(x, y, progress=False, callbacks=[recorder(ours)], **args)
        expected = [(kind, renumbered.get((kind, index), index), logs) for kind, index, logs in theirs]
        assert ours == expected


@pytest.mark.parametrize("steps_per_execution", ["auto", 4])
def test_model_checkpoint_every_n_batches_saves_at_the_steps_fit_saves_at(tmp_path, steps_per_execution):
    """save_freq=3 over 10-batch epochs: Keras (one step per call) saves after global steps 3, 6, 9, 12, 15, 18. The
    blocks used to end where the block sizes fell (ours saved e1b4, e1b8 and e2b8); now they end on multiples of 3."""
    x, y = _data(160, 7)

    def saving(directory):
        path = str(directory / "e{epoch}b{batch}.weights.h5")
        return [keras.callbacks.ModelCheckpoint(path, save_weights_only=True, save_freq=3)]

    model, _, twin = _pair()
    twin.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=saving(tmp_path / "keras"))
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss="mse", steps_per_execution=steps_per_execution)
    trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, progress=False, callbacks=saving(tmp_path / "ours"))
    names = sorted(os.listdir(tmp_path / "keras"))
    assert names == [f"e{e}b{b}.weights.h5" for e, b in ((1, 3), (1, 6), (1, 9), (2, 2), (2, 5), (2, 8))]
    assert sorted(os.listdir(tmp_path / "ours")) == names
    for name in names:
        saved = [_model(), _model()]
        for side, into in zip(("ours", "keras"), saved):
            into.load_weights(tmp_path / side / name)
        assert_weights_close(*saved)


def test_keras_tensorboard_with_batch_scalars_is_told_it_counts_blocks(tmp_path):
    _, trainer, _ = _pair()
    with warnings.catch_warnings():  # one step per call: it counts steps, nothing to say
        warnings.simplefilter("error", UserWarning)
        board = keras.callbacks.TensorBoard(str(tmp_path / "one"), update_freq=2)
        Trainer(_model(), loss="mse", steps_per_execution=1).fit(*TRAIN, progress=False, callbacks=[board])
    with pytest.warns(UserWarning, match=r"TensorBoard\(update_freq=2\) counts calls, not steps"):
        trainer.fit(
            *TRAIN, epochs=1, progress=False, callbacks=[keras.callbacks.TensorBoard(str(tmp_path), update_freq=2)]
        )


def test_model_checkpoint_every_n_batches_saves_at_the_same_steps_after_a_resume(tmp_path):
    """Its batch counters are part of tapeloop's checkpoint, as EarlyStopping's state is: a run resumed mid-epoch
    saves after the same steps, with the same weights, as one never interrupted."""
    x, y = _data(160, 7)

    def run(directory, crash_at=None):
        _, trainer, _ = _pair()
        path = str(directory / "saved" / "e{epoch}b{batch}.weights.h5")
        callbacks = [keras.callbacks.ModelCheckpoint(path, save_weights_only=True, save_freq=3)]
        if crash_at is not None:
            callbacks.append(helpers.Crash(trainer, crash_at))
        args = {"batch_size": 16, "epochs": 2, "shuffle": False, "progress": False}
        trainer.fit(x, y, checkpoint_dir=str(directory / "ckpt"), checkpoint_every=4, callbacks=callbacks, **args)

    run(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "resumed", crash_at=14)  # the last checkpoint: step 12, epoch 2's third batch
    run(tmp_path / "resumed")
    names = sorted(os.listdir(tmp_path / "straight" / "saved"))
    assert sorted(os.listdir(tmp_path / "resumed" / "saved")) == names and len(names) == 6
    for name in names:
        saved = [_model(), _model()]
        for side, into in zip(("straight", "resumed"), saved):
            into.load_weights(tmp_path / side / "saved" / name)
        assert_weights_close(*saved)


def test_ema_optimizer_ends_with_the_averaged_weights_as_fit_does():
    x, y = helpers.example1_data(64)
    losses = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}
    model = helpers.example1()
    twin = helpers.clone(model)
    twin.compile(optimizer=keras.optimizers.SGD(0.05, use_ema=True), loss=losses)
    twin.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05, use_ema=True), loss=losses)
    trainer.fit((x, y), batch_size=16, epochs=3, shuffle=False, progress=False)
    assert_weights_close(model, twin)


class _TestSetEvaluation(keras.callbacks.Callback):
    """A user's callback as people write them: evaluate on a held-out set at each epoch's end, log the result."""

    def on_epoch_end(self, epoch, logs=None):
        logs["test_loss"] = self.model.evaluate(*VAL, batch_size=8, verbose=0)


def test_a_callback_calling_self_model_evaluate_gets_the_trainers_as_fit_gives_its_own():
    """``self.model.evaluate`` in a callback was Keras' "You must call `compile()` before using the model"."""
    model, trainer, twin = _pair()
    args = {"batch_size": 8, "shuffle": False, "epochs": 2}
    theirs = twin.fit(*TRAIN, callbacks=[_TestSetEvaluation()], verbose=0, **args).history
    ours = trainer.fit(*TRAIN, callbacks=[_TestSetEvaluation()], progress=False, **args).history
    assert_history_close(ours, theirs, {"loss": "loss", "test_loss": "test_loss"})
    assert_weights_close(model, twin)
    assert "evaluate" not in vars(model)  # the model's own method again after fit


class _EvaluateEachBatch(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(self.model.evaluate(*VAL, batch_size=8, verbose=0))


def test_evaluating_in_a_batch_hook_leaves_the_training_means_alone_where_fit_reports_the_evaluations():
    """Pinned difference: the per-batch evaluations equal Model.fit's, but Keras' evaluate shares the model's
    trackers with training, so Model.fit's epoch loss is the last evaluation's; tapeloop's stays the training mean."""
    model, _, twin = _pair()
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss="mse", steps_per_execution=1)  # every batch
    args = {"batch_size": 8, "shuffle": False, "epochs": 1}
    theirs, ours = _EvaluateEachBatch(), _EvaluateEachBatch()
    keras_loss = twin.fit(*TRAIN, callbacks=[theirs], verbose=0, **args).history["loss"][0]
    history = trainer.fit(*TRAIN, callbacks=[ours], progress=False, **args).history
    np.testing.assert_allclose(ours.seen, theirs.seen, rtol=1e-5)
    assert keras_loss == pytest.approx(theirs.seen[-1], rel=1e-6)
    unaided = _pair()[1].fit(*TRAIN, progress=False, **args).history["loss"][0]  # no callback: the training mean
    assert history["loss"][0] == pytest.approx(unaided, rel=1e-6) and unaided != pytest.approx(keras_loss, rel=1e-2)
    assert_weights_close(model, twin)


def test_terminate_on_nan_is_preceded_by_nan_policy_which_keeps_the_last_good_weights():
    """Pinned difference: with ``TerminateOnNaN`` Model.fit applies the NaN batch's update, then stops quietly with
    non-finite weights; tapeloop's default ``nan_policy="raise"`` stops first, with an error naming the step and the
    weights of the step before (equal to a run on the batches before it)."""
    x, y = TRAIN[0], TRAIN[1].copy()
    y[20] = np.nan  # in the third batch of 8
    model, _, twin = _pair()
    twin.fit(x, y, batch_size=8, shuffle=False, callbacks=[keras.callbacks.TerminateOnNaN()], verbose=0)
    assert int(twin.optimizer.iterations) == 3 and not all(np.isfinite(w).all() for w in twin.get_weights())
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss="mse", steps_per_execution=1)
    with pytest.raises(NonFiniteLossError, match="Non-finite loss at training step 3"):
        trainer.fit(x, y, batch_size=8, shuffle=False, callbacks=[keras.callbacks.TerminateOnNaN()], progress=False)
    before, _, _ = _pair()
    Trainer(before, optimizer=keras.optimizers.SGD(0.05), loss="mse").fit(x[:16], y[:16], batch_size=8,
                                                                         shuffle=False, progress=False)  # fmt: skip
    assert_weights_close(model, before)
