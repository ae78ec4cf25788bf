"""The command line as a user lives in it: task parameters (--set), a task's callbacks, trainer options and
pictures, metrics.json against history.csv, Keras' TensorBoard layout, a quiet console that fits the terminal."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli import _events

ROOT = Path(__file__).resolve().parents[1]

TASK = """
import keras, numpy as np, tensorflow as tf
from matplotlib.figure import Figure
from trainer import Task


class Noise(keras.layers.Layer):  # draws in training and evaluation alike, as the keras.io VAE's sampling does
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed = keras.random.SeedGenerator(3)

    def call(self, x):
        return x + 0.1 * keras.random.normal(keras.ops.shape(x), seed=self.seed)


class Steps(keras.callbacks.Callback):  # a task callback that needs the trainer, and logs a key of its own
    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def on_epoch_end(self, epoch, logs=None):
        logs["val_steps_so_far"] = float(self.trainer.global_step)


def build(*, batch_size, seed, lr=0.05, width=4, beta=1.0, tag="a", noisy=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(70, 3)).astype("float32")
    y = x @ np.array([[1.0], [2.0], [-1.0]], "float32")
    inp = keras.Input((3,))
    hidden = keras.layers.Dense(width, activation="relu")(inp)
    model = keras.Model(inp, {"y": keras.layers.Dense(1)(Noise()(hidden) if noisy else hidden)})

    def loss(outputs, targets):
        error = outputs["y"] - targets["y"]
        return {"mse": tf.reduce_mean(tf.square(error)), "l1": tf.reduce_mean(tf.abs(error))}

    def pictures(trainer, validation):
        figure = Figure()
        figure.subplots().plot([0, 1])
        return {f"picture_{tag}": figure}

    return Task(model=model, loss=loss, loss_weights={"l1": beta}, train=(x, {"y": y}),
                validation=(x[:20], {"y": y[:20]}), epochs=2, optimizer=keras.optimizers.SGD(lr),
                callbacks=lambda trainer: [Steps(trainer)], trainer_options={"nan_policy": "skip"}, pictures=pictures)
"""


def _main():
    from tests.test_cli import _cli

    return _cli().main


def test_a_task_with_parameters_callbacks_options_and_pictures_from_the_command_line(tmp_path, capsys):
    task, logdir = tmp_path / "task.py", tmp_path / "run"
    task.write_text(TASK)
    settings = ["--set", "lr=0.1", "--set", "width=6", "--set", "beta=0.5", "--set", "tag=b", "--set", "noisy=true"]
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--task", str(task), "--batch-size", "16",
               "--no-progress", "--logdir", str(logdir), *settings]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user runs it
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    noise = [line for line in done.stderr.splitlines() if line.strip()]
    assert noise == [], noise[:5]  # TensorFlow's C++ start-up lines (oneDNN, cuInit, absl) silenced

    config = json.loads((logdir / "config.json").read_text())
    assert config["params"] == {"lr": 0.1, "width": 6, "beta": 0.5, "tag": "b", "noisy": True}
    rows = list(csv.DictReader((logdir / "history.csv").open()))
    assert [r["lr"] for r in rows] == ["0.1", "0.1"]  # not 0.10000000149011612
    assert [r["val_steps_so_far"] for r in rows] == ["5.0", "10.0"]  # the task's callback, before the writers
    assert "skipped_steps" in rows[0]  # trainer_options={"nan_policy": "skip"} reached the Trainer
    # The model draws noise in evaluation too: evaluating again would give other numbers than the last row's.
    metrics = json.loads((logdir / "metrics.json").read_text())
    assert metrics == {key[4:]: float(value) for key, value in rows[-1].items() if key.startswith("val_")}
    assert (logdir / "picture_b.png").stat().st_size > 1000
    train, validation = (_events(logdir / "tensorboard" / run) for run in ("train", "validation"))
    assert [s for s, _ in train["epoch_loss"]] == [s for s, _ in validation["epoch_loss"]] == [0, 1]
    assert [v for _, v in validation["epoch_steps_so_far"]] == [5.0, 10.0] and "batch_loss" not in validation

    main = _main()
    with pytest.raises(SystemExit, match=r"params: \{.*'lr': 0.1.*\} -> \{.*'lr': 0.2.*\}.*--fresh"):
        main(["--task", str(task), "--batch-size", "16", "--logdir", str(logdir), *settings[:-2], "--set", "lr=0.2"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as help_exit:
        main(["--task", str(task), "--help"])
    assert help_exit.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "lr=0.05 (float), width=4 (int), beta=1.0 (float), tag='a' (str), noisy=False (bool)" in out


@pytest.mark.parametrize(
    "setting, message",
    [
        ("depth=3", r"--set depth: the task has no parameter 'depth'. Parameters: lr=0.05 \(float\), width=4 \(int\)"),
        ("width=wide", r"--set width=wide: expected an int, the type of its default 4. Parameters: lr=0.05"),
        ("noisy=maybe", r"--set noisy=maybe: expected a bool \(true/false\), the type of its default False"),
        ("lr", r"--set 'lr': expected name=value. Parameters: lr=0.05"),
    ],
)
def test_a_wrong_task_parameter_is_a_one_line_error_listing_the_parameters(setting, message, tmp_path):
    task = tmp_path / "task.py"
    task.write_text(TASK)
    with pytest.raises(SystemExit, match=f"error: {message}"):
        _main()(["--task", str(task), "--set", setting, "--logdir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists() or not (tmp_path / "run" / "config.json").exists()


def test_built_in_tasks_expose_learning_rate_and_loss_weights():
    from trainer.task import task_parameters

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from train import load_task
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    expected = {
        "detection": {"learning_rate": 3e-3, "loc_weight": 1.0, "conf_weight": 1.0},
        "multitask": {"learning_rate": 1e-3, "regression_weight": 1.0, "classification_weight": 1.0},
        "combined": {"learning_rate": 1e-3, "bce_weight": 0.5, "mse_weight": 0.5},
        "digits": {"learning_rate": 2e-3, "ce_weight": 1.0, "recon_weight": 1.0, "agreement_weight": 1.0},
        "balancing": {"learning_rate": 1e-3, "regression_weight": 1.0, "classification_weight": 1.0},
    }
    for name, parameters in expected.items():
        found = task_parameters(load_task(name).build)
        assert {key: found[key] for key in parameters} == parameters, name


def test_the_balancing_task_with_an_aggregator_from_the_command_line(tmp_path):
    main, logdir = _main(), tmp_path / "run"
    common = ["--task", "balancing", "--logdir", str(logdir), "--no-progress"]
    run = main([*common, "--aggregator", "UPGrad", "--epochs", "1"])
    rows = list(csv.DictReader((logdir / "history.csv").open()))
    assert {"agg_weight/regression", "agg_weight/classification", "conflict/regression|classification"} <= set(rows[0])
    assert 0 < run.history["conflict/regression|classification"][0] < 1  # the task's gradients do conflict
    # UPGrad for 2 rows: w = (1 - c/|g1|², 1 - c/|g2|²)/2 when c = <g1, g2> < 0: the 1000x larger regression
    # gradient keeps ~1/2, the classification's weight grows where they conflict.
    assert run.history["agg_weight/regression"][0] == pytest.approx(0.5, abs=1e-3)
    assert run.history["agg_weight/classification"][0] > 1.0
    assert json.loads((logdir / "config.json").read_text())["aggregator"] == "UPGrad"
    with pytest.raises(SystemExit, match=r"aggregator: 'UPGrad' -> 'mgda'.*--fresh"):
        main([*common, "--aggregator", "mgda", "--epochs", "2"])
    other = tmp_path / "other"
    with pytest.raises(SystemExit, match=r"Unknown aggregator 'upgrd'.*'upgrad'.*'gradnorm', 'dwa'"):
        main(["--task", "balancing", "--aggregator", "upgrd", "--logdir", str(other)])
    assert not other.exists()


def _terminal(columns: int):
    """A pseudo-terminal ``columns`` wide: (the stream ProgressWriter writes to, the reading end)."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return os.fdopen(follower, "w"), leader


def _read(leader: int) -> str:
    chunks = []
    os.set_blocking(leader, False)
    try:
        while chunk := os.read(leader, 65536):
            chunks.append(chunk)
    except (BlockingIOError, OSError):
        pass
    return b"".join(chunks).decode()


def test_the_progress_bar_fits_the_terminal_and_the_epoch_line_keeps_every_key():
    from trainer.writers import ProgressWriter

    keys = ["loss", "reconstruction", "kl", "beta", "lr"]
    scalars = {**{k: 0.123456 for k in keys}, **{f"val_{k}": 0.654321 for k in keys}}
    stream, leader = _terminal(80)
    writer = ProgressWriter(stream)
    assert writer.interactive
    writer.begin_epoch(0, 1, 10)
    writer.write_scalars(5, {k: 0.123456 for k in keys})
    writer.write_scalars(10, {k: 0.123456 for k in keys})
    writer.write_epoch(0, scalars)
    stream.flush()
    screen = _read(leader)
    lines = [part for line in screen.replace("\r\n", "\n").split("\n") for part in line.split("\r")]
    lines = [line.replace("\x1b[A", "").replace("\x1b[K", "") for line in lines]
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert any("…" in line for line in lines if "10/10" in line)  # the bar's values cut at a key, marked
    summary = " ".join(line.strip() for line in lines if "10/10" not in line)
    assert all(f"{key}: " in summary for key in scalars), summary  # the epoch's keys, val_kl included
    stream.close()
    os.close(leader)

    stream, leader = _terminal(0)  # a zero-width terminal: no bar (tqdm would print blank lines), plain lines
    assert not ProgressWriter(stream).interactive
    stream.close()
    os.close(leader)


def test_logged_numbers_are_written_with_the_precision_they_have():
    from trainer.writers import format_value

    assert format_value(float(np.float32(0.001))) == "0.001"
    assert np.float32(format_value(float(np.float32(1 / 3)))) == np.float32(1 / 3)
    assert format_value(1 / 3) == repr(1 / 3)  # a float64 value (an mAP computed in NumPy) keeps its digits


def _detections(seed: int):
    """80 images of 1-4 boxes; detections: 85% of them jittered (some fall under IoU 0.5), plus false positives."""
    rng = np.random.default_rng(seed)
    truth, found = [], []
    for _ in range(80):
        m = rng.integers(1, 5)
        y0, x0, h, w = (
            rng.uniform(0, 0.6, m),
            rng.uniform(0, 0.6, m),
            rng.uniform(0.15, 0.4, m),
            rng.uniform(0.15, 0.4, m),
        )
        boxes, labels = np.stack([y0, x0, y0 + h, x0 + w], 1).astype(np.float32), rng.integers(1, 4, m)
        truth.append((boxes, labels))
        keep, extra = rng.random(m) > 0.15, rng.integers(0, 3)
        corner = rng.uniform(0, 0.7, (extra, 2))
        found.append((
            np.concatenate([boxes[keep] + rng.normal(0, 0.04, (keep.sum(), 4)), np.hstack([corner, corner + 0.2])]),
            np.concatenate([rng.uniform(0.4, 1.0, keep.sum()), rng.uniform(0.0, 0.7, extra)]),
            np.concatenate([labels[keep], rng.integers(1, 4, extra)]),
        ))  # fmt: skip
    return found, truth


def test_our_voc_map_agrees_with_pycocotools_cocoeval_where_the_definitions_coincide():
    """The same detections through losses.mean_average_precision (VOC all-point) and pycocotools' COCOeval (the
    detection task's coco_AP@...; 101-point interpolation, best unmatched ground truth): measured differences on six
    such sets were at most 0.0053 at IoU 0.5 and 0.0041 at 0.75, for APs of 0.48-0.61."""
    from losses import mean_average_precision

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from train import load_task
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    coco_average_precision = load_task("detection").coco_average_precision
    for seed in range(3):
        found, truth = _detections(seed)
        coco = coco_average_precision(found, truth)
        for t in (0.5, 0.75):
            ours = mean_average_precision(found, truth, iou_threshold=t)
            assert abs(ours - coco[f"coco_AP@{t}"]) < 0.01, (seed, t, ours, coco)
        assert coco["coco_AP@0.75"] < coco["coco_AP@0.5"] < 0.7 and coco["coco_AP@[.5:.95]"] < coco["coco_AP@0.5"]
    perfect = [(boxes, np.ones(len(boxes)), labels) for boxes, labels in truth]
    assert coco_average_precision(perfect, truth)["coco_AP@[.5:.95]"] == pytest.approx(1.0)
    assert mean_average_precision(perfect, truth, iou_threshold=0.95) == pytest.approx(1.0)


def test_the_detection_task_logs_map_every_epoch_and_draws_its_detections(tmp_path):
    logdir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--task", "detection", "--epochs", "2",
               "--set", "train_size=256", "--no-progress", "--logdir", str(logdir)]  # fmt: skip
    done = subprocess.run(command, env=os.environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((logdir / "history.csv").open()))
    assert len(rows) == 2
    # The last epoch's val_mAP@0.5, recomputed from the final weights and the task's validation images
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from train import load_task
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from losses import boxes, mean_average_precision

    task = load_task("detection")
    rng = np.random.default_rng(0)
    task.make_images(256, rng)
    images, box, label = task.make_images(task.VALIDATION, rng)
    model = task.build_model()
    model.load_weights(logdir / "final.weights.h5")
    outputs = model.predict(images, batch_size=128, verbose=0)
    found = boxes.decode_detections(outputs["boxes"], outputs["classes"], task.ANCHORS)
    expected = mean_average_precision(found, task.truth_of(box, label), iou_threshold=0.5)
    assert float(rows[-1]["val_mAP@0.5"]) == pytest.approx(expected, abs=1e-6)
    validation = _events(logdir / "tensorboard" / "validation")
    assert [v for _, v in validation["epoch_mAP@0.5"]] == pytest.approx([float(r["val_mAP@0.5"]) for r in rows])
    metrics = json.loads((logdir / "metrics.json").read_text())
    for t in ("0.5", "0.75"):
        assert metrics[f"mAP@{t}"] == float(rows[-1][f"val_mAP@{t}"])
    assert {"coco_AP@[.5:.95]", "coco_AP@0.5", "coco_AP@0.75"} <= set(metrics)
    assert abs(metrics["coco_AP@0.5"] - metrics["mAP@0.5"]) < 0.02  # the same detections, two yardsticks
    assert "val_mAP@0.5" in done.stdout and (logdir / "detections.png").stat().st_size > 20_000
    assert "Epoch 2/2" in done.stdout
