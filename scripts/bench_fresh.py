"""The rows of scripts/bench.py that need a fresh process per run (one-time costs and peak memory are per process):
the first epoch against Model.fit's, and large NumPy input. ``bench.py`` runs itself with a hidden ``--...-child``
flag for each; the child prints one JSON line.
"""

from __future__ import annotations

import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from trainer import Trainer

BENCH = Path(__file__).with_name("bench.py")
LOSSES = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}


def two_head_model(width: tuple[int, ...]) -> keras.Model:
    inp = layers.Input((100,))
    x = inp
    for units in width:
        x = layers.Dense(units, activation="relu")(x)
    return keras.Model(
        inp,
        [
            layers.Dense(1, name="regression_output")(x),
            layers.Dense(3, activation="softmax", name="classification_output")(x),
        ],
    )


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def large_numpy_child(kind: str, gigabytes: float, epochs: int = 2, batch: int = 4096) -> dict:
    """One fit of a one-layer model on ``gigabytes`` of float32 NumPy ``x`` (n x 256), in this process."""
    n = int(gigabytes * 2**30 / (256 * 4))
    rng = np.random.default_rng(0)
    x = rng.random((n, 256), dtype=np.float32)
    y = x[:, :1] * 2 - x[:, 1:2]
    before = rss_mb()
    model = keras.Sequential([keras.Input((256,)), layers.Dense(1)])
    start = time.perf_counter()
    if kind == "keras":
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
        model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    else:
        Trainer(model, optimizer=keras.optimizers.SGD(1e-3), loss="mse").fit(
            x, y, batch_size=batch, epochs=epochs, progress=False
        )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return {"seconds": seconds, "peak_growth_mb": peak - before, "arrays_mb": (x.nbytes + y.nbytes) / 2**20}


def vae_model() -> keras.Model:
    """A small VAE on 8x8 digits: the reconstruction and the per-example KL are outputs (Keras can fit it too)."""
    inp = layers.Input((64,))
    hidden = layers.Dense(32, activation="relu")(inp)
    mean, log_var = layers.Dense(2)(hidden), layers.Dense(2)(hidden)

    class Sampling(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seed = keras.random.SeedGenerator(1)

        def call(self, mean, log_var):
            return mean + keras.ops.exp(0.5 * log_var) * keras.random.normal(keras.ops.shape(mean), seed=self.seed)

    z = Sampling()(mean, log_var)
    decoded = layers.Dense(64, activation="sigmoid", name="recon")(layers.Dense(32, activation="relu")(z))
    kl = layers.Lambda(
        lambda a: -0.5 * keras.ops.sum(1 + a[1] - keras.ops.square(a[0]) - keras.ops.exp(a[1]), axis=1), name="kl"
    )([mean, log_var])
    return keras.Model(inp, {"recon": decoded, "kl": kl})


def first_epoch_child(kind: str, workload: str, epochs: int = 3) -> dict:
    """Seconds of each epoch of ``fit`` in a fresh process (the first one includes every one-time cost)."""
    if workload == "vae":
        from sklearn.datasets import load_digits

        x = (load_digits().data[:1500] / 16.0).astype(np.float32)
        y = {"recon": x, "kl": np.zeros(len(x), np.float32)}
        model, keras_loss = vae_model(), {"recon": "binary_crossentropy", "kl": lambda _, kl: kl}
    else:
        rng = np.random.default_rng(0)
        x = rng.random((1600, 100), dtype=np.float32)
        y = {
            "regression_output": x[:, :1],
            "classification_output": np.eye(3, dtype=np.float32)[rng.integers(0, 3, 1600)],
        }
        model, keras_loss = two_head_model((64, 32)), LOSSES
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter())

    start = time.perf_counter()
    if kind == "keras":
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras_loss)
        model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[Timer()])
    else:
        if workload == "vae":

            def loss(outputs, targets):
                bce = keras.losses.binary_crossentropy(targets["recon"], outputs["recon"])
                return {"reconstruction": tf.reduce_mean(bce), "kl": tf.reduce_mean(outputs["kl"])}
        else:
            loss = LOSSES
        trainer = Trainer(model, optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        trainer.fit(x, y, batch_size=32, epochs=epochs, progress=False, callbacks=[Timer()])
    return {"first": times[0] - start, "later": min(b - a for a, b in itertools.pairwise(times))}


def in_fresh_processes(flag: str, kinds: tuple[str, ...], *extra: str) -> dict:
    """Run this script's hidden ``flag`` child once per kind, each in a new process; their JSON results."""
    found = {}
    for kind in kinds:
        done = subprocess.run(
            [sys.executable, str(BENCH), flag, kind, *extra], capture_output=True, text=True, check=True
        )
        found[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def first_epoch(repeats: int = 3) -> dict:
    """Model.fit and Trainer.fit's first epoch (every one-time cost included) and best later epoch, each workload in
    fresh processes (one-time costs are per process), ``repeats`` pairs of them in turn: per kind the median run (by
    first epoch), and the median of the pairs' ratios (one pair swung 0.85-1.56 between runs on this machine)."""
    found = {}
    for workload in ("vae", "seed001"):
        pairs = [in_fresh_processes("--first-epoch-child", ("keras", "trainer"), "--workload", workload)
                 for _ in range(repeats)]  # fmt: skip
        median = {k: sorted((p[k] for p in pairs), key=lambda run: run["first"])[repeats // 2] for k in pairs[0]}
        ratios = [p["trainer"]["first"] / p["keras"]["first"] for p in pairs]
        found[workload] = {**median, "ratio": statistics.median(ratios), "pairs": repeats}
    return found


def large_numpy(gigabytes: float) -> dict:
    """Model.fit and Trainer.fit on the same large arrays, each in a fresh process (peak memory is per process)."""
    return in_fresh_processes("--large-numpy-child", ("keras", "trainer"), "--large-numpy", str(gigabytes))


def print_first(found: dict) -> None:
    print("\nfirst epoch (fresh process, every one-time cost included) and best later epoch, seconds; batch 32:")
    for workload, runs in found.items():
        keras_run, ours = runs["keras"], runs["trainer"]
        ratio = runs["ratio"]
        theirs = f"Model.fit {keras_run['first']:5.2f} then {keras_run['later']:.3f}"
        mine = f"Trainer.fit {ours['first']:5.2f} then {ours['later']:.3f}"
        print(f"  {workload:<8} {theirs}   {mine}   first-epoch ratio {ratio:.2f} (target <= 1.0; median of "
              f"{runs['pairs']} pairs)")  # fmt: skip


def print_large(found: dict) -> None:
    keras_run, ours = found["keras"], found["trainer"]
    print(f"\nlarge numpy ({ours['arrays_mb'] / 1024:.2f} GB of arrays, batch 4096, 2 epochs, one Dense layer):")
    for name, run in (("Model.fit", keras_run), ("Trainer.fit", ours)):
        growth = run["peak_growth_mb"] / run["arrays_mb"]
        grew = f"peak RSS +{run['peak_growth_mb']:.0f} MB ({growth:.2f}x the arrays)"
        print(f"  {name:<12} {run['seconds']:6.1f} s   {grew}")
    print(f"  time Trainer/Model.fit: {ours['seconds'] / keras_run['seconds']:.2f} (target <= 1.0); "
          f"memory growth target <= 1.1x the arrays")  # fmt: skip
