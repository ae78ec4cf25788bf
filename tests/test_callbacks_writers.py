"""Keras callbacks run unchanged; writers (progress, CSV, TensorBoard) all show the same numbers as History."""

import csv
import io

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer import CSVWriter, Every, ProgressWriter, TensorBoardWriter, Trainer, WriterCallback

LOSSES = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}


def _trainer(lr=0.05, **kwargs):
    return Trainer(helpers.example1(), optimizer=keras.optimizers.SGD(lr), loss=LOSSES, **kwargs)


def test_early_stopping_stops_when_the_monitored_value_stops_improving():
    # lr 0: nothing changes, so val_loss never improves after epoch 0 and patience 1 stops after epoch 1.
    trainer = _trainer(lr=0.0)
    data = helpers.example1_data(32)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=1)
    history = trainer.fit(data, batch_size=16, epochs=10, validation_data=data, callbacks=[stop], progress=False)
    assert history.epoch == [0, 1]
    assert stop.stopped_epoch == 1


def test_history_is_a_keras_history_set_on_the_model_as_fit_does():
    model = helpers.example1()
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.05), loss=LOSSES)
    history = trainer.fit(helpers.example1_data(16), batch_size=8, epochs=2, progress=False)
    assert isinstance(history, keras.callbacks.History) and model.history is history
    assert history.epoch == [0, 1] and history.params == {"epochs": 2, "steps": 2, "verbose": 0}


def test_reduce_lr_on_plateau_lowers_the_optimizer_learning_rate():
    const = {"const": lambda o, t: tf.constant(1.0)}  # a metric that never improves
    trainer = _trainer(lr=0.1, metrics=const)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="const", mode="min", factor=0.5, patience=1, min_delta=0.0)
    history = trainer.fit(helpers.example1_data(16), batch_size=8, epochs=5, callbacks=[plateau], progress=False)
    assert history.history["const"] == [1.0] * 5
    # epochs 1, 2, 3, 4 see no improvement; with patience 1 the rate halves after each of them
    assert float(trainer.optimizer.learning_rate.numpy()) == pytest.approx(0.1 * 0.5**4)


def test_learning_rate_scheduler_sets_the_rate_used_by_the_step():
    data = helpers.example1_data(16)
    model = helpers.example1()
    twin = helpers.clone(model)
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: [0.1, 0.0][epoch])
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.5), loss=LOSSES)
    history = trainer.fit(data, batch_size=8, epochs=2, callbacks=[schedule], shuffle=False, progress=False)
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.0])
    # Reference: one epoch at 0.1 (the second, at 0.0, changes nothing).
    Trainer(twin, optimizer=keras.optimizers.SGD(0.1), loss=LOSSES).fit(
        data, batch_size=8, epochs=1, shuffle=False, progress=False
    )
    for a, b in zip(helpers.weights(model), helpers.weights(twin)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_terminate_on_nan_lambda_callback_and_csv_logger(tmp_path):
    seen = []
    log = tmp_path / "keras.csv"
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append((epoch, logs["loss"]))),
        keras.callbacks.CSVLogger(str(log)),
    ]
    history = _trainer().fit(helpers.example1_data(16), batch_size=8, epochs=2, callbacks=callbacks, progress=False)
    assert [e for e, _ in seen] == [0, 1] and [v for _, v in seen] == history.history["loss"]
    rows = list(csv.DictReader(log.open()))
    assert [float(r["loss"]) for r in rows] == pytest.approx(history.history["loss"])


def test_batch_hooks_run_once_per_block_with_the_last_step_index():
    calls = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            calls.append(("begin", batch))

        def on_train_batch_end(self, batch, logs=None):
            calls.append(("end", batch, sorted(logs)))

    _trainer(steps_per_execution=2).fit(
        helpers.example1_data(40), batch_size=8, epochs=1, callbacks=[Record()], progress=False
    )  # 5 steps: blocks of 2, 2, 1
    keys = ["classification_output", "loss", "regression_output"]
    assert calls == [("begin", 0), ("end", 1, keys), ("begin", 2), ("end", 3, keys), ("begin", 4), ("end", 4, keys)]


def test_stop_training_from_a_callback_stops_at_the_next_block():
    class StopAtStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch >= 3:
                self.model.stop_training = True

    trainer = _trainer(steps_per_execution=2)
    history = trainer.fit(helpers.example1_data(80), batch_size=8, epochs=3, callbacks=[StopAtStep()], progress=False)
    assert trainer.global_step == 4 and history.epoch == [0]


def test_progress_line_per_epoch_when_not_a_terminal():
    stream = io.StringIO()
    history = _trainer().fit(
        helpers.example1_data(24),
        batch_size=8,
        epochs=2,
        validation_data=helpers.example1_data(8),
        callbacks=[WriterCallback(ProgressWriter(stream))],
        progress=False,
    )
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Epoch 1/2 - 3 steps - ")
    last = history.history
    assert f"loss: {last['loss'][1]:.4g} - regression_output: {last['regression_output'][1]:.4g}" in lines[1]
    assert f"val_classification_output: {last['val_classification_output'][1]:.4g}" in lines[1]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_shows_every_component():
    stream = _Terminal()
    _trainer(steps_per_execution=2).fit(
        helpers.example1_data(24),
        batch_size=8,
        epochs=1,
        callbacks=[WriterCallback(ProgressWriter(stream))],
        progress=False,
    )
    text = stream.getvalue()
    assert "Epoch 1/1" in text and "3/3" in text
    for key in ("loss", "regression_output", "classification_output"):
        assert f"{key}: " in text


def test_csv_and_tensorboard_writers_hold_the_history_values(tmp_path):
    csv_path, tb_dir = tmp_path / "history.csv", tmp_path / "tb"
    writers = WriterCallback(CSVWriter(csv_path), TensorBoardWriter(tb_dir, every_n_steps=2))
    history = (
        _trainer(steps_per_execution=3)
        .fit(
            helpers.example1_data(40),
            batch_size=8,
            epochs=2,
            validation_data=helpers.example1_data(8),
            callbacks=[writers],
            progress=False,
        )
        .history
    )
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == ["epoch", *history]
    for key, values in history.items():  # the shortest decimal of each float32 value reads back to it exactly
        assert [np.float32(r[key]) for r in rows] == [np.float32(v) for v in values]

    events = {}
    for path in sorted(tb_dir.glob("*/events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tag = f"{path.parent.name}/{value.tag}"
                events.setdefault(tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    for key, values in history.items():  # as Keras' TensorBoard: val_<key> is epoch_<key> in the validation run
        tag = f"validation/epoch_{key[4:]}" if key.startswith("val_") else f"train/epoch_{key}"
        assert events[tag] == [(0, pytest.approx(values[0])), (1, pytest.approx(values[1]))]
    # 5 steps per epoch, blocks of up to 3, cut so that they end on multiples of 2: written at exactly 2, 4, 6, ...
    assert [s for s, _ in events["train/batch_loss"]] == [2, 4, 6, 8, 10]


def test_every_fires_when_a_block_crosses_a_multiple():
    every = Every(4)
    assert [every.due(a, b) for a, b in [(0, 3), (3, 4), (4, 7), (7, 9), (9, 16)]] == [False, True, False, True, True]
    assert not Every(None).due(0, 100)
    with pytest.raises(ValueError, match="positive int"):
        Every(0)


def test_writers_close_when_training_fails(tmp_path):
    class Boom(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("boom")

    class Closing(CSVWriter):
        closed = False

        def close(self):
            type(self).closed = True
            super().close()

    with pytest.raises(RuntimeError, match="boom"):
        _trainer().fit(
            helpers.example1_data(8),
            batch_size=8,
            callbacks=[Boom(), WriterCallback(Closing(tmp_path / "h.csv"))],
            progress=False,
        )
    assert Closing.closed


def test_plot_writer_throttles_and_always_writes_at_the_end(tmp_path, monkeypatch):
    from trainer import plots

    drawn = []
    monkeypatch.setattr(
        plots, "plot_history", lambda history, path: drawn.append({k: len(v) for k, v in history.items()})
    )
    writer = plots.PlotWriter(tmp_path / "curves.png", min_interval=3600)
    for epoch in range(3):
        writer.write_epoch(epoch, {"loss": 1.0 / (epoch + 1)})
    assert drawn == [{"loss": 1}]  # the first epoch at once, then at most once an hour
    writer.close()
    writer.close()  # idempotent
    assert drawn == [{"loss": 1}, {"loss": 3}]  # the end of the run: every epoch
