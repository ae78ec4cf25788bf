"""The run directory as people use it: resume at epoch boundaries, reruns, kills — the CLI run as a user runs it."""

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
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
    """digits: 45 steps an epoch; by default a checkpoint at every epoch's end (and none in between)."""
    base = ["--task", "digits", "--epochs", "10"]
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
    # The built-in tasks give NumPy data: the checkpoint holds its position, no tf.data iterator (shuffle buffer).
    assert [name for name, _ in tf.train.list_variables(latest) if name.startswith("iterator")] == []
    _cli(*base, "--logdir", str(run))
    _assert_same_run(run, tmp_path / "straight")


# -- reruns and the directory itself (in process: the CLI's main, as test_cli.py runs it) ------------------------------


def _main():
    from tests.test_cli import _cli

    return _cli().main


def _user_task(tmp_path: Path) -> Path:
    from tests.test_cli import USER_TASK

    task = tmp_path / "task.py"
    task.write_text(USER_TASK)
    return task


def test_a_rerun_that_would_be_another_run_is_refused_and_fresh_moves_the_old_one_aside(tmp_path, capsys):
    main, task, logdir = _main(), _user_task(tmp_path), tmp_path / "run"
    base = ["--task", str(task), "--batch-size", "16", "--no-progress", "--logdir", str(logdir)]
    main([*base, "--epochs", "2"])
    before = {p.name: p.read_bytes() for p in logdir.iterdir() if p.is_file()}
    with pytest.raises(SystemExit, match=r"other arguments \(batch_size: 16 -> 8; seed: 0 -> 1\).*--fresh"):
        main([*base[:-2], "--batch-size", "8", "--seed", "1", "--logdir", str(logdir)])
    assert {p.name: p.read_bytes() for p in logdir.iterdir() if p.is_file()} == before  # nothing touched
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main([*base, "--epochs", "2"])
    assert done.value.code == 0 and "already trained to epoch 2 (--epochs 2); nothing to do" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in logdir.iterdir() if p.is_file()} == before
    main([*base, "--epochs", "3"])
    assert "resumed from checkpoint ckpt-10 (epoch 2, step 10)" in capsys.readouterr().out
    fresh = main([*base[:-2], "--seed", "1", "--logdir", str(logdir), "--fresh", "--epochs", "1"])
    (aside,) = tmp_path.glob("run.old-*")
    assert len(_rows(aside)) == 3 and len(fresh.history["loss"]) == 1 and len(_rows(logdir)) == 1


def test_logdir_problems_are_one_line_errors_before_training(tmp_path):
    main, task = _main(), _user_task(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    base = ["--task", str(task), "--no-progress"]
    with pytest.raises(SystemExit, match=f"error: --logdir {afile} is a file, not a directory."):
        main([*base, "--logdir", str(afile)])
    with pytest.raises(SystemExit, match=f"error: cannot create or write --logdir {afile}/run: {afile} is not a"):
        main([*base, "--logdir", str(afile / "run")])
    assert afile.read_text() == "not a directory"


def test_a_second_process_on_a_live_logdir_is_refused_naming_it(tmp_path):
    import fcntl

    main, task, logdir = _main(), _user_task(tmp_path), tmp_path / "run"
    logdir.mkdir()
    with open(logdir / ".lock", "w") as held:  # what a live run holds (the kernel drops it if that run dies)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242\n")
        held.flush()
        with pytest.raises(SystemExit, match=r"--logdir .*run is in use by a running run \(pid 4242\)"):
            main(["--task", str(task), "--no-progress", "--logdir", str(logdir)])
    assert not (logdir / "checkpoints").exists()


def test_runs_started_in_the_same_second_without_a_logdir_get_their_own_directories(tmp_path, monkeypatch):
    """The default runs/<task>-<timestamp> is to the second: a second run started in the same second (a shell loop
    over seeds with &) was refused as 'in use by a running run', or, the first one done, resumed it."""
    import fcntl

    main, task = _main(), _user_task(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20261128-015009")
    first = tmp_path / "runs" / "task-20261128-015009"
    first.mkdir(parents=True)
    with open(first / ".lock", "w") as held:  # the first run, still running
        fcntl.flock(held, fcntl.LOCK_EX)
        second = main(["--task", str(task), "--no-progress", "--epochs", "1", "--seed", "2"])
    third = main(["--task", str(task), "--no-progress", "--epochs", "1", "--seed", "3"])
    assert [second.logdir, third.logdir] == [Path("runs/task-20261128-015009-2"), Path("runs/task-20261128-015009-3")]
    assert json.loads((third.logdir / "config.json").read_text())["seed"] == 3
    again = ["--task", str(task), "--no-progress", "--epochs", "1", "--logdir", str(third.logdir), "--fresh"]
    for seed in ("4", "5"):  # two --fresh in one second: the second old run may not land on the first one's name
        main([*again, "--seed", seed])
    aside = sorted(p.name for p in (tmp_path / "runs").glob("*.old-*"))
    assert aside == ["task-20261128-015009-3.old-20261128-015009", "task-20261128-015009-3.old-20261128-015009-2"]
    assert [json.loads((tmp_path / "runs" / name / "config.json").read_text())["seed"] for name in aside] == [3, 4]


def test_batch_size_reaches_a_task_that_returns_numpy_data(tmp_path):
    """A task may return NumPy ``(x, {name: array})``; ``--batch-size`` batches it (training and validation)."""
    from tests.test_cli import USER_TASK

    task = tmp_path / "numpy_task.py"
    numpy_data = "data = (x, y)\n    validation = (x[:20], {k: v[:20] for k, v in y.items()})"
    task.write_text(
        USER_TASK.replace("data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)", numpy_data)
        .replace("validation=data.take(2)", "validation=validation")
    )  # fmt: skip
    assert "data = (x, y)" in task.read_text()
    logdir = tmp_path / "run"
    _main()(["--task", str(task), "--batch-size", "16", "--epochs", "2", "--no-progress", "--logdir", str(logdir)])
    assert tf.train.latest_checkpoint(str(logdir / "checkpoints")).endswith("ckpt-10")  # 70 examples: 5 steps an epoch


@contextlib.contextmanager
def _unwritable(path: Path):
    """``path`` made unwritable even for root (the immutable attribute); plain permissions for other users."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: nothing can be made unwritable here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("part", ["history.csv", "checkpoints", "tensorboard", "the logdir's parent"])
def test_an_unwritable_part_of_the_logdir_is_a_one_line_error_before_training(part, tmp_path):
    main, task = _main(), _user_task(tmp_path)
    parent = tmp_path / "runs"
    logdir = parent / "run"
    base = ["--task", str(task), "--batch-size", "16", "--no-progress", "--logdir", str(logdir)]
    main([*base, "--epochs", "1"])
    before = {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()}
    if part == "the logdir's parent":
        logdir, base[-1] = parent / "new", str(parent / "new")
        target, message = parent, f"error: cannot create or write --logdir {logdir}: {parent} is not a writable"
    else:
        target, message = logdir / part, f"error: {logdir / part} is not writable; fix its permissions or use another"
    with _unwritable(target), pytest.raises(SystemExit, match=re.escape(message)):
        main([*base, "--epochs", "2"])
    assert {p: p.read_bytes() for p in (parent / "run").rglob("*") if p.is_file()} == before


def test_a_worker_reading_config_json_while_the_chief_rewrites_it_never_sees_a_partial_file(tmp_path):
    """Under multi-worker training every worker checks the run's config.json while the chief rewrites it (a rerun's
    new --epochs): a reader must see the old file or the new one, never an empty or half-written one (it raised
    json.JSONDecodeError in a non-chief worker on the fresh-clone CI)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from run_directory import where_it_stands, write_json
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    config = {"task_file": "t.py", "batch_size": 16, "seed": 0, "pad": "x" * 200_000}
    write_json(tmp_path / "config.json", config)
    stop, errors = threading.Event(), []

    def read():
        while not stop.is_set():
            try:
                where_it_stands(config, tmp_path, epochs=3)  # (no checkpoints: reads config.json, returns None)
            except Exception as error:
                errors.append(error)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for epochs in range(300):
            write_json(tmp_path / "config.json", {**config, "epochs": epochs})
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"], "a temporary file was left behind"
