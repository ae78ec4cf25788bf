"""Two worker processes on 127.0.0.1 (scripts/launch_workers.py) against one process: same weights, and only the
chief's run directory exists afterwards; a second launch with more epochs resumes from the chief's checkpoints."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.test_cli import USER_TASK

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@contextlib.contextmanager
def _cluster(commands: list[list[str]], env: dict) -> Iterator[list[subprocess.Popen]]:
    """One process per command, command i as worker i of a cluster on free 127.0.0.1 ports (its ``TF_CONFIG``);
    those still running at the end are killed by process id."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from launch_workers import free_ports
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(len(commands))]}
    workers = []
    try:
        for index, command in enumerate(commands):
            config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
            workers.append(subprocess.Popen(command, env={**env, "TF_CONFIG": config}, **pipes))
        yield workers
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait()


def _weights(task_file: Path, path: Path) -> list[np.ndarray]:
    spec = importlib.util.spec_from_file_location("mw_task", task_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    model = module.model()
    model.load_weights(path)
    return model.get_weights()


def _history(path: Path) -> dict[str, list[float]]:
    rows = list(csv.DictReader(path.open()))
    return {key: [float(r[key]) for r in rows] for key in rows[0] if key != "epoch"}


def test_two_workers_match_one_process_resume_and_only_the_chief_writes(tmp_path):
    task = tmp_path / "task.py"
    task.write_text(USER_TASK)
    scratch = tmp_path / "scratch"  # the workers' TMPDIR: non-chief directories must be gone afterwards
    scratch.mkdir()
    flags = ["--task", str(task), "--batch-size", "16", "--no-progress", "--checkpoint-every", "4"]
    _run("train.py", *flags, "--epochs", "3", "--logdir", str(tmp_path / "one"))
    two = ["--workers", "2", "--", *flags, "--logdir", str(tmp_path / "two")]
    _run("launch_workers.py", *two, "--epochs", "2", env={"TMPDIR": str(scratch)})
    done = _run("launch_workers.py", *two, "--epochs", "3", env={"TMPDIR": str(scratch)})  # resumes at epoch 3
    assert "Epoch 3/3" in done.stdout and "Epoch 1/3" not in done.stdout

    one, both = tmp_path / "one", tmp_path / "two"
    for a, b in zip(_weights(task, one / "final.weights.h5"), _weights(task, both / "final.weights.h5"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    expected, got = _history(one / "history.csv"), _history(both / "history.csv")
    assert expected.keys() == got.keys() and len(got["loss"]) == 3
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert {p.name for p in both.iterdir()} == {p.name for p in one.iterdir()}
    assert list(scratch.iterdir()) == [], "a non-chief worker left its temporary directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "scratch", "task.py", "two"]


SLOW = """
import time
_fast_loss = loss


def loss(outputs, targets):  # 0.2 s a step: time for a signal to land mid-run
    parts = _fast_loss(outputs, targets)
    pause = tf.numpy_function(lambda: np.float32(time.sleep(0.2) or 0.0), [], tf.float32)
    return {**parts, "mse": parts["mse"] + tf.reshape(pause, [])}
"""


def test_sigterm_to_two_workers_stops_them_at_one_step_and_a_rerun_resumes_exactly(tmp_path):
    task = tmp_path / "task.py"
    task.write_text(USER_TASK + SLOW)
    flags = ["--task", str(task), "--batch-size", "16", "--no-progress", "--checkpoint-every", "2", "--epochs", "3"]
    _run("train.py", *flags, "--logdir", str(tmp_path / "one"))
    launch = [sys.executable, str(ROOT / "scripts" / "launch_workers.py"), "--workers", "2", "--", *flags,
              "--logdir", str(tmp_path / "two")]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "two" / "checkpoints" / "checkpoint").exists():  # the first checkpoint: step 2
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Training stopped by SIGTERM after step" in out and "To resume, run the same command" in out
    stopped_at = tf.train.latest_checkpoint(str(tmp_path / "two" / "checkpoints"))
    assert not stopped_at.endswith("ckpt-15"), "the signal landed after training ended: no mid-run stop tested"
    _run("launch_workers.py", *launch[2:])
    one, both = tmp_path / "one", tmp_path / "two"
    for a, b in zip(_weights(task, one / "final.weights.h5"), _weights(task, both / "final.weights.h5"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    expected, got = _history(one / "history.csv"), _history(both / "history.csv")
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_sigterm_to_one_worker_stops_both_at_the_same_step(tmp_path):
    """A signal reaching one worker only (mid-block, as a preemption notice does) stops every worker at one step:
    the request travels in the next block's all-reduce, so no worker is left waiting in a collective."""
    task = tmp_path / "task.py"
    task.write_text(USER_TASK + SLOW)
    flags = ["--task", str(task), "--batch-size", "16", "--no-progress", "--checkpoint-every", "2", "--epochs", "3"]
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--strategy", "multiworker", *flags,
               "--logdir", str(tmp_path / "run")]  # fmt: skip
    with _cluster([command, command], {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}) as workers:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "checkpoints" / "checkpoint").exists():  # the chief's first checkpoint: step 2
            assert workers[0].poll() is None and time.monotonic() < deadline, workers[0].communicate()[1][-3000:]
            time.sleep(0.05)
        time.sleep(0.1)  # into the next block
        workers[1].send_signal(signal.SIGTERM)
        outputs = [worker.communicate(timeout=120) for worker in workers]
    steps = []
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 128 + signal.SIGTERM, err[-3000:]
        found = re.search(r"Training stopped by SIGTERM after step (\d+)", out)
        assert found, (out[-2000:], err[-3000:])
        steps.append(int(found.group(1)))
    assert steps[0] == steps[1] < 15, steps
    latest = tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert latest.endswith(f"ckpt-{steps[0]}")


WORKER = """
import os, sys
import keras, numpy as np, tensorflow as tf
from trainer import Trainer

strategy = tf.distribute.MultiWorkerMirroredStrategy() if "TF_CONFIG" in os.environ else tf.distribute.get_strategy()
keras.utils.set_random_seed(0)
with strategy.scope():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, {"y": keras.layers.Dense(1, name="y")(inputs)})
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.1), loss={"y": "mse"}, strategy=strategy, seed=0)
# worker.py CHECKPOINT_DIR EPOCHS [EXAMPLES [VALIDATION_EXAMPLES [EVALUATED_EXAMPLES [PREDICTED_EXAMPLES]]]]
given = [int(arg) for arg in sys.argv[2:]]
directory, (epochs, n, validated, evaluated, predicted) = sys.argv[1], given + [64, 0, 0, 0][len(given) - 1 :]
x = np.random.default_rng(0).normal(size=(n, 4)).astype("float32")
validation = (x[:validated], {"y": x[:validated].sum(1, keepdims=True)}) if validated else None
trainer.fit(x, {"y": x.sum(1, keepdims=True)}, batch_size=16, epochs=epochs, checkpoint_dir=directory,
            validation_data=validation, progress=False)
if evaluated:
    trainer.evaluate(x[:evaluated], {"y": x[:evaluated].sum(1, keepdims=True)}, batch_size=16)
if predicted:
    trainer.predict(x[:predicted], batch_size=16)
"""


def test_workers_that_find_different_checkpoints_stop_with_an_error_naming_what_each_found(tmp_path):
    """checkpoint_dir not one directory every worker sees (here: each worker its own): TensorFlow failed in a
    collective ("Shape mismatch in the collective instance"), after the chief had trained 8 steps on its own."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(script), str(tmp_path / "a"), "3"], env=env, check=True, timeout=300)
    assert tf.train.latest_checkpoint(str(tmp_path / "a")).endswith("ckpt-12")
    commands = [[sys.executable, str(script), str(tmp_path / directory), "5"] for directory in "ab"]
    with _cluster(commands, env) as workers:
        outputs = [worker.communicate(timeout=300) for worker in workers]
    for index, (worker, (_, err)) in enumerate(zip(workers, outputs, strict=True)):
        assert worker.returncode == 1, err[-3000:]
        expected = (
            "RuntimeError: The workers would resume from different checkpoints (worker 0: the checkpoint of step 12; "
            f"worker 1: nothing (a fresh start)); this process (worker {index}) read "
            f"checkpoint_dir='{tmp_path / 'ab'[index]}'. Every worker must pass the same checkpoint_dir"
        )
        assert expected in err, err[-3000:]
    assert tf.train.latest_checkpoint(str(tmp_path / "a")).endswith("ckpt-12"), "the chief trained on its own"


TRAIN_DIFFERENT = "The workers would train different numbers of steps (worker 0: to epoch"


@pytest.mark.parametrize(
    ("runs", "said"),
    [
        ((("3", "64"), ("2", "64")), f"{TRAIN_DIFFERENT} 3, 4 steps an epoch; worker 1: to epoch 2, 4 steps an epoch"),
        ((("2", "64"), ("2", "80")), f"{TRAIN_DIFFERENT} 2, 4 steps an epoch; worker 1: to epoch 2, 5 steps an epoch"),
        (
            (("2", "64", "32"), ("2", "64", "48")),
            f"{TRAIN_DIFFERENT} 2, 4 steps an epoch, 2 validation batches; worker 1: to epoch 2, 4 steps an epoch, "
            "3 validation batches",
        ),
        (
            (("1", "64", "0", "16"), ("1", "64", "0", "32")),
            "The workers would evaluate different numbers of batches (worker 0: 1; worker 1: 2",
        ),
        (
            (("1", "64", "0", "0", "16"), ("1", "64", "0", "0", "32")),
            "The workers would predict different numbers of batches (worker 0: 1; worker 1: 2",
        ),
    ],
    ids=["epochs", "data", "validation data", "evaluation data", "prediction data"],
)
def test_workers_that_would_run_different_steps_stop_with_an_error_naming_them(runs, said, tmp_path):
    """Other epochs on one worker: TensorFlow's "tasks are unhealthy (stopped sending heartbeats)" after the other
    worker had ended; training or validation data of another length: both workers hung (killed after 90 s);
    prediction data of another length: each worker got a mix of rows of the workers' batches, silently."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    commands = [[sys.executable, str(script), str(tmp_path / "run"), *run] for run in runs]
    with _cluster(commands, env) as workers:
        outputs = [worker.communicate(timeout=120) for worker in workers]
    for index, (worker, (_, err)) in enumerate(zip(workers, outputs, strict=True)):
        assert worker.returncode == 1, err[-3000:]
        assert f"RuntimeError: {said}; this process is the worker {index}). Every worker " in err, err[-3000:]
    trained = (tmp_path / "run").exists()
    assert trained == (runs[0][0] == "1"), "a checkpoint was written: something was trained"
