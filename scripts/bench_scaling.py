"""``python scripts/bench.py --scaling``: how the Trainer's steps/s grow with the work, one axis at a time.

Axes (the others held at components 2, batch 32, steps_per_execution 8, one replica, one worker): the number of
logged loss components (1, 2, 8, 20; the same 20 terms summed into that many keys, so the maths is equal), the batch
size (32 to 1024), ``steps_per_execution`` (1 to 64), replicas (1 and 2 logical CPUs under MirroredStrategy, global
batch 32) and workers (1 and 2 local processes under MultiWorkerMirroredStrategy). Model: seed 001 example 1 (the
two-head MLP of bench row a). Each figure is the best of 3 epochs of 64 steps (timed by a callback, so only the
epoch itself) after a first epoch that traces. Writes a table and a PNG with one panel per axis.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from trainer import Trainer

BENCH = Path(__file__).with_name("bench.py")
STEPS = 64
AXES = {
    "components": [1, 2, 8, 20],
    "batch": [32, 64, 128, 256, 512, 1024],
    "steps_per_execution": [1, 2, 4, 8, 16, 32, 64],
    "replicas": [1, 2],
    "workers": [1, 2],
}
BASE = {"components": 2, "batch": 32, "steps_per_execution": 8}


def components_loss(k: int):
    """20 loss terms summed into ``k`` logged keys: the same maths for every k."""

    def loss(outputs, targets):
        err = tf.square(outputs["regression_output"] - targets["regression_output"])
        ce = keras.losses.categorical_crossentropy(targets["classification_output"], outputs["classification_output"])
        terms = [tf.reduce_mean(err), tf.reduce_mean(ce)] + [tf.reduce_mean(err * (i + 1) / 100.0) for i in range(18)]
        if k == 1:
            return tf.add_n(terms)
        return {f"part{g:02d}": tf.add_n(terms[g::k]) for g in range(k)}

    return loss


def steps_per_second(components: int, batch: int, steps_per_execution: int, strategy=None) -> float:
    from bench_fresh import two_head_model

    strategy = strategy or tf.distribute.get_strategy()
    rng = np.random.default_rng(0)
    n = batch * STEPS
    x = rng.random((n, 100), dtype=np.float32)
    y = {"regression_output": x[:, :1], "classification_output": np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]}
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        trainer = Trainer(two_head_model((64, 32)), optimizer=keras.optimizers.Adam(1e-3),
                          loss=components_loss(components), steps_per_execution=steps_per_execution,
                          strategy=strategy)  # fmt: skip
    seconds: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.start)

    trainer.fit(data, epochs=4, progress=False, callbacks=[Timer()])
    return STEPS / min(seconds[1:])  # the first epoch traces


def child(kind: str, value: int) -> float:
    """A figure that needs its own process: ``replicas`` (logical CPUs) or ``workers`` (TF_CONFIG)."""
    if kind == "replicas":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * value)
        strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(value)])
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    return steps_per_second(BASE["components"], BASE["batch"], BASE["steps_per_execution"], strategy)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _in_processes(kind: str, value: int) -> float:
    command = [sys.executable, str(BENCH), "--scaling-child", kind, str(value)]
    if kind == "replicas" or value == 1:
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(value)]}
    workers = []
    for i in range(value):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        workers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    try:
        outs = [w.communicate(timeout=600)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    return json.loads(outs[0].strip().splitlines()[-1])  # the chief's figure (all run in lock-step)


def scaling(png: Path) -> dict[str, dict[int, float]]:
    found: dict[str, dict[int, float]] = {}
    for axis, values in AXES.items():
        if axis in BASE:
            found[axis] = {v: steps_per_second(**{**BASE, axis: v}) for v in values}
        else:
            found[axis] = {v: _in_processes(axis, v) for v in values}
    plot(found, png)
    return found


def plot(found: dict[str, dict[int, float]], png: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2 * len(found), 3.0), layout="constrained")
    for axis, (name, rates) in zip(figure.subplots(1, len(found)), found.items(), strict=True):
        axis.plot(list(rates), list(rates.values()), marker="o")
        if name in ("batch", "steps_per_execution"):
            axis.set_xscale("log", base=2)
        else:
            axis.set_xticks(list(rates))
        axis.set_xlabel(name)
        axis.set_ylabel("steps/s")
        axis.set_ylim(bottom=0)
    figure.savefig(png, dpi=100)


def print_scaling(found: dict[str, dict[int, float]], png: Path) -> None:
    print("\nscaling (steps/s; others at components 2, batch 32, steps_per_execution 8, 1 replica, 1 worker):")
    for axis, rates in found.items():
        print(f"  {axis:<20} " + "  ".join(f"{v}: {r:.0f}" for v, r in rates.items()))
    examples = "  ".join(f"{b}: {b * r / 1000:.0f}k" for b, r in found["batch"].items())
    print(f"  {'examples/s by batch':<20} {examples}")
    print(f"  plot: {png}")
