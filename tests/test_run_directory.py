"""The run directory as people use it: resume at epoch boundaries, reruns, kills — the CLI run as a user runs it."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

# The README's task template (Command line -> Tasks), with data filled in. Its shuffle keeps the default
# reshuffle_each_iteration=True: every epoch another order, which a resumed run must continue.
TEMPLATE = """
import keras, numpy as np, tensorflow as tf
from trainer import Task


def my_model():
    inp = keras.Input((4,))
    return keras.Model(inp, {"output": keras.layers.Dense(1)(keras.layers.Dense(8, activation="relu")(inp))})


def build(*, batch_size, seed):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 4)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")
    (x, y), (xv, yv) = (x[:80], y[:80]), (x[80:], y[80:])
    train = tf.data.Dataset.from_tensor_slices((x, {"output": y})).shuffle(len(x), seed=seed).batch(batch_size)
    val = tf.data.Dataset.from_tensor_slices((xv, {"output": yv})).batch(batch_size)
    return Task(
        model=my_model(),
        loss={"output": "mse"},
        train=train,
        validation=val,
        epochs=10,
        metrics={"output": ["mae"]},
        optimizer=keras.optimizers.Adam(1e-2),
    )
"""


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--no-progress", *args]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _rows(logdir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((logdir / "history.csv").open()))


def _assert_same_run(a: Path, b: Path) -> None:
    assert _rows(a) == _rows(b)  # every logged value, to the last bit (repr of floats)
    first, second = (tf.train.load_checkpoint(str(d / "checkpoints")) for d in (a, b))
    names = [n for n in second.get_variable_to_shape_map() if n.startswith("model_variables/")]
    assert names
    for name in names:
        np.testing.assert_array_equal(first.get_tensor(name), second.get_tensor(name), err_msg=name)


def test_readme_template_5_epochs_then_resumed_to_8_is_one_8_epoch_run(tmp_path):
    task = tmp_path / "my_task.py"
    task.write_text(TEMPLATE)
    base = ["--task", str(task), "--batch-size", "16", "--seed", "3"]
    _cli(*base, "--epochs", "5", "--logdir", str(tmp_path / "a"))  # its last checkpoint: the end of epoch 5
    _cli(*base, "--epochs", "8", "--logdir", str(tmp_path / "a"))
    _cli(*base, "--epochs", "8", "--logdir", str(tmp_path / "b"))
    assert len(_rows(tmp_path / "b")) == 8
    _assert_same_run(tmp_path / "a", tmp_path / "b")


def test_sigkill_after_an_epoch_boundary_checkpoint_then_rerun_is_bit_identical(tmp_path):
    """digits: 45 steps an epoch, a checkpoint every 45 steps, so every checkpoint is at an epoch's end."""
    base = ["--task", "digits", "--epochs", "10", "--checkpoint-every", "45"]
    _cli(*base, "--logdir", str(tmp_path / "straight"))
    run = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--no-progress", *base, "--logdir", str(run)]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    index = run / "checkpoints" / "checkpoint"
    try:
        deadline = time.monotonic() + 240
        while not (index.exists() and "ckpt-180" in index.read_text()):  # 4 epochs done
            assert process.poll() is None, process.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "never reached ckpt-180"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        process.stderr.close()
    latest = tf.train.get_checkpoint_state(str(run / "checkpoints")).model_checkpoint_path
    assert int(latest.rsplit("-", 1)[1]) % 45 == 0 and int(latest.rsplit("-", 1)[1]) < 450  # killed at a boundary
    _cli(*base, "--logdir", str(run))
    _assert_same_run(run, tmp_path / "straight")
