"""Exact resume after the process dies: SIGKILL, SIGTERM or SIGINT mid-epoch, and SIGKILL during a checkpoint's
save. Each case runs ``resume_worker.py`` in a subprocess (killed by its process id) and compares the resumed run's
weights and History, bit for bit, with an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

WORKER = Path(__file__).with_name("resume_worker.py")
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _worker(directory: Path, out: Path, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(directory), str(out), *extra],
        env={**ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"worker ended early:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("worker never reached the stall point")
        time.sleep(0.05)


def _finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, out, err


def _load(out: Path) -> tuple[list[np.ndarray], dict]:
    with np.load(out) as saved:
        weights = [saved[f"arr_{i}"] for i in range(len(saved.files) - 1)]
        return weights, json.loads(str(saved["history"]))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[list[np.ndarray], dict]:
    directory = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = _finish(_worker(directory, directory / "out.npz"))
    assert code == 0, err[-3000:]
    return _load(directory / "out.npz")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_killed_mid_epoch_then_resumed_is_bit_identical(how, tmp_path, uninterrupted):
    """Stall at step 13 (epoch 2 of 3, after the checkpoint at step 12), kill, rerun: same bits, same History."""
    out = tmp_path / "out.npz"
    process = _worker(tmp_path, out, "--stall-at", "13", env={"STALL_SECONDS": "60" if how == "SIGKILL" else "1"})
    try:
        _wait_for(tmp_path / "stalled", process)
        os.kill(process.pid, getattr(signal, how))
        code, stdout, err = _finish(process)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    checkpoints = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
    names = [Path(p).name for p in checkpoints.all_model_checkpoint_paths]
    if how == "SIGKILL":
        assert code == -signal.SIGKILL and names[-1] == "ckpt-12"
    else:  # the block ends (step 14), a checkpoint is written, a message says how to resume
        assert code == 128 + getattr(signal, how), err[-3000:]
        assert f"Training stopped by {how} after step 14" in stdout and "ckpt-14" in stdout
        assert names[-1] == "ckpt-14"
    code, _, err = _finish(_worker(tmp_path, out))
    assert code == 0, err[-3000:]
    weights, history = _load(out)
    reference, reference_history = uninterrupted
    assert all(np.array_equal(a, b) for a, b in zip(weights, reference, strict=True))
    assert history == reference_history and len(history["loss"]) == 3
    # A resume is quiet: no TensorFlow warnings about values left unrestored (save_counter, a partial read).
    assert "unrestored values" not in err and "could not be found in the restored object" not in err, err[-2000:]


def test_killed_during_a_save_resumes_from_the_previous_checkpoint_exactly(tmp_path, uninterrupted):
    """SIGKILL after ckpt-12's files are written but before the index names them: the index still says ckpt-9."""
    out = tmp_path / "out.npz"
    code, _, err = _finish(_worker(tmp_path, out, env={"KILL_BEFORE_INDEX": "12"}))
    assert code == -signal.SIGKILL, err[-3000:]
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-9")
    code, _, err = _finish(_worker(tmp_path, out))
    assert code == 0, err[-3000:]
    weights, history = _load(out)
    reference, reference_history = uninterrupted
    assert all(np.array_equal(a, b) for a, b in zip(weights, reference, strict=True))
    assert history == reference_history
