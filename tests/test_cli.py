"""scripts/train.py: the README's main command, user task files, and clear errors."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train_module():
    spec = importlib.util.spec_from_file_location("tapeloop_train_cli", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


USER_TASK = """
import keras, numpy as np, tensorflow as tf
from trainer import Task

def build(*, batch_size, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = {"output": (x @ np.array([[1.0], [2.0], [-1.0]], "float32"))}
    inp = keras.layers.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return Task(model=model, loss={"output": "mse"}, train=data, validation=data, epochs=2,
                optimizer=keras.optimizers.SGD(0.1),
                evaluate_extra=lambda trainer, val: {"answer": 42.0})
"""


def test_user_task_file_trains_and_reports_extra_metrics(tmp_path, capsys):
    path = tmp_path / "my_task.py"
    path.write_text(USER_TASK)
    results = _train_module().main(["--task", str(path), "--batch-size", "16", "--no-progress"])
    out = capsys.readouterr().out
    assert results["answer"] == 42.0 and set(results) == {"loss", "output", "answer"}
    assert "Epoch 2/2 - 4 steps" in out and "Final results (validation), task" in out


def test_unknown_task_lists_the_builtins():
    with pytest.raises(SystemExit, match="unknown task 'nosuch': not a built-in task \\(detection, multitask\\)"):
        _train_module().main(["--task", "nosuch"])


def test_invalid_flag_values_are_rejected(capsys):
    with pytest.raises(SystemExit):
        _train_module().main(["--epochs", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_readme_main_command_runs_the_default_task():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "scripts/train.py", "--epochs", "1", "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Final results (validation), task detection" in done.stdout
    assert "Epoch 1/1 - 128 steps" in done.stdout
    for key in ("loc", "conf", "mAP@0.5", "mAP@0.75"):
        assert f"  {key} " in done.stdout


def test_multitask_builtin_runs(capsys):
    results = _train_module().main(["--task", "multitask", "--epochs", "1", "--no-progress"])
    assert {"regression", "classification", "classification_output/accuracy"} <= set(results)
    assert "Epoch 1/1 - 512 steps" in capsys.readouterr().out
