"""scripts/train.py end to end: the run directory's files agree with each other, task files, clear errors."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import tensorflow as tf

from trainer import plot_history

ROOT = Path(__file__).resolve().parents[1]


def _cli():
    spec = importlib.util.spec_from_file_location("tapeloop_train_cli", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


USER_TASK = """
import keras, numpy as np, tensorflow as tf
from dataclasses import dataclass
from trainer import Task

@dataclass
class Settings:  # a dataclass in a task file needs the module in sys.modules
    lr: float = 0.05

def model():
    inp = keras.layers.Input((3,))
    hidden = keras.layers.Dense(4, activation="relu")(inp)
    p = keras.layers.Dense(2, activation="softmax")(hidden)
    return keras.Model(inp, {"y": keras.layers.Dense(1)(hidden), "p": p})

def loss(outputs, targets):
    return {"mse": tf.reduce_mean(tf.square(outputs["y"] - targets["y"])),
            "ce": tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(targets["p"], outputs["p"]))}

def build(*, batch_size, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(70, 3)).astype("float32")
    y = {"y": x @ np.array([[1.0], [2.0], [-1.0]], "float32"), "p": (x[:, 0] > 0).astype("int32")}
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return Task(model=model(), loss=loss, train=data, validation=data.take(2), epochs=3,
                metrics={"p": ["accuracy"]}, optimizer=keras.optimizers.SGD(Settings().lr),
                evaluate_extra=lambda trainer, val: {"answer": 42.0})
"""


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "my_task.py"
    path.write_text(USER_TASK)
    return path


def _events(directory: Path) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return found


def test_run_directory_files_agree_with_each_other(task_file, tmp_path, capsys):
    logdir = tmp_path / "run"
    args = ["--task", str(task_file), "--batch-size", "16", "--logdir", str(logdir), "--no-progress"]
    run = _cli().main([*args, "--checkpoint-every", "4", "--steps-per-execution", "3"])
    out = capsys.readouterr().out
    names = {"history.csv", "metrics.json", "loss_curves.png", "tensorboard", "checkpoints", "final.weights.h5"}
    assert names | {"config.json", ".lock"} == {p.name for p in logdir.iterdir()}  # .lock: one live run at a time
    history = run.history
    keys = ["loss", "mse", "ce", "p/accuracy", "lr", "val_loss", "val_mse", "val_ce", "val_p/accuracy"]
    assert list(history) == keys and len(history["loss"]) == 3

    rows = list(csv.DictReader((logdir / "history.csv").open()))
    assert list(rows[0]) == ["epoch", *keys]
    for key in keys:  # each float32 value as the shortest decimal that reads back to it (lr: 0.05)
        assert [np.float32(r[key]) for r in rows] == [np.float32(v) for v in history[key]]
    assert [r["lr"] for r in rows] == ["0.05"] * 3

    metrics = json.loads((logdir / "metrics.json").read_text())
    assert set(metrics) == {"loss", "mse", "ce", "p/accuracy", "answer"} and metrics["answer"] == 42.0
    for key in ("loss", "mse", "ce", "p/accuracy"):  # the last epoch's validation values, as history.csv has them
        assert metrics[key] == float(rows[-1][f"val_{key}"])

    # Keras' TensorBoard layout: runs train/ and validation/, one tag epoch_<key> in each, so the curves overlay
    train, validation = _events(logdir / "tensorboard" / "train"), _events(logdir / "tensorboard" / "validation")
    for key in keys:
        run, tag = (validation, f"epoch_{key[4:]}") if key.startswith("val_") else (train, f"epoch_{key}")
        assert [v for _, v in run[tag]] == pytest.approx(history[key], rel=1e-6)
    assert [s for s, _ in train["epoch_loss"]] == [s for s, _ in validation["epoch_loss"]] == [0, 1, 2]

    image = matplotlib.image.imread(logdir / "loss_curves.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert [a.get_title() for a in plot_history(history).axes] == ["loss", "mse", "ce", "p/accuracy", "lr"]

    config = json.loads((logdir / "config.json").read_text())
    assert config["batch_size"] == 16 and config["epochs"] == 3 and config["checkpoint_every"] == 4

    spec = importlib.util.spec_from_file_location("user_task", task_file)
    user = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user)
    restored = user.model()
    restored.load_weights(logdir / "final.weights.h5")
    x = np.ones((2, 3), "float32")
    final = restored(x)["y"].numpy()
    # 5 steps per epoch (70 / 16), blocks of up to 3 cut to end on multiples of 4 (and of TensorBoard's 50):
    # checkpoints at exactly 4, 8, 12 and at each epoch's end (5, 10, 15); the last 3 are kept
    index = tf.train.get_checkpoint_state(str(logdir / "checkpoints"))
    assert [Path(p).name for p in index.all_model_checkpoint_paths] == ["ckpt-10", "ckpt-12", "ckpt-15"]
    twin = user.model()
    tf.train.Checkpoint(model=twin).restore(index.model_checkpoint_path).expect_partial()
    np.testing.assert_array_equal(twin(x)["y"].numpy(), final)
    assert "Epoch 3/3 - 5 steps" in out and f"Run directory: {logdir}" in out and "answer" in out


def test_same_command_with_same_logdir_resumes(task_file, tmp_path):
    """A finished 2-epoch run rerun with --epochs 3 trains only epoch 3; the files hold all 3 epochs and the weights
    equal a 3-epoch run's."""
    base = ["--task", str(task_file), "--batch-size", "16", "--no-progress", "--checkpoint-every", "4"]
    _cli().main([*base, "--epochs", "2", "--logdir", str(tmp_path / "a")])
    resumed = _cli().main([*base, "--epochs", "3", "--logdir", str(tmp_path / "a")])
    straight = _cli().main([*base, "--epochs", "3", "--logdir", str(tmp_path / "b")])
    assert resumed.history == straight.history and len(resumed.history["loss"]) == 3
    rows = list(csv.DictReader((tmp_path / "a" / "history.csv").open()))
    assert [np.float32(r["loss"]) for r in rows] == [np.float32(v) for v in straight.history["loss"]]
    first, second = (tf.train.load_checkpoint(str(tmp_path / d / "checkpoints")) for d in ("a", "b"))
    for name in second.get_variable_to_shape_map():
        if name.startswith("model_variables/"):
            np.testing.assert_array_equal(first.get_tensor(name), second.get_tensor(name))


TWO_CPUS = """
import runpy, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_mirrored_strategy_flag_trains_on_two_replicas_like_one_device(task_file, tmp_path):
    """In its own process (one MirroredStrategy per process, as TensorFlow's collectives expect), on 2 logical
    CPUs: the run is split over 2 replicas and logs what the default strategy logs on one device."""
    args = ["--task", str(task_file), "--strategy", "mirrored", "--logdir", str(tmp_path / "m"), "--no-progress"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", TWO_CPUS, str(ROOT / "scripts" / "train.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["replicas"] == 2
    one = _cli().main(["--task", str(task_file), "--logdir", str(tmp_path / "one"), "--no-progress"])
    rows = list(csv.DictReader((tmp_path / "m" / "history.csv").open()))
    for key in ("loss", "mse", "ce", "val_loss"):
        np.testing.assert_allclose([float(r[key]) for r in rows], one.history[key], rtol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--task", "nosuch"],
            "unknown task 'nosuch': not a built-in task \\(balancing, combined, detection, digits, multitask\\)",
        ),
        (["--strategy", "multiworker"], "--strategy multiworker needs --logdir"),
        (["--strategy", "multiworker", "--logdir", "x"], "--strategy multiworker needs TF_CONFIG"),
    ],
)
def test_clear_errors(args, message):
    with pytest.raises(SystemExit, match=message):
        _cli().main(args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "expected a positive integer, got 0"),
        (["--checkpoint-every", "x"], "expected a positive integer, got 'x'"),
        (["--strategy", "tpu"], "invalid choice: 'tpu'"),
        (["--steps-per-execution", "fast"], "expected 'auto' or a positive integer, got 'fast'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_invalid_flags_are_rejected(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _cli().main(args)
    assert exit_.value.code == 2  # argparse's usage error
    assert message in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        _cli().main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--task", "--epochs", "--batch-size", "--seed", "--logdir", "--checkpoint-every",
                 "--steps-per-execution", "--strategy", "--no-progress"):  # fmt: skip
        assert flag in text


@pytest.mark.parametrize(
    ("task", "keys"),
    [
        ("multitask", {"regression", "classification", "classification_output/accuracy"}),
        ("combined", {"bce", "mse", "output/accuracy"}),
        ("digits", {"ce", "recon", "agreement", "label/accuracy"}),
    ],
)
def test_builtin_tasks_run(task, keys, tmp_path):
    run = _cli().main(["--task", task, "--epochs", "1", "--logdir", str(tmp_path / task), "--no-progress"])
    assert keys | {"loss"} <= set(run.results)


def test_readme_main_command_runs_the_default_task(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--epochs", "1", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Final results (validation), task detection" in done.stdout
    assert "Epoch 1/1 - 128 steps" in done.stdout
    for key in ("loc", "conf", "mAP@0.5", "mAP@0.75"):
        assert f"  {key} " in done.stdout
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("detection-") and (run / "loss_curves.png").is_file()
