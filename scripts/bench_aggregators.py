"""bench.py's multi-task row: the step cost of each aggregator against the plain step (issue 18).

A shared trunk 100 -> 256 -> 256 and m one-unit heads (m = 2 and 8), each head's MSE a component; batch 32, SGD,
the Trainer's defaults otherwise. ``plain`` is ``aggregator=None`` (the weighted sum: one backward pass, no
Jacobian); every other row builds the m gradients of the trunk (its Dense kernels' kept factored: their Gramian
from the layers' inputs and the components' gradients of ``x @ W``, ``trainer/gramian.py``), their Gramian and solves
its problem in the step. The ``hand`` rows form every gradient, as tapeloop did before.
Targets: <= 1.5x the plain step for m = 2, <= 5x for m = 8. Measured in CPU time (``time.process_time``): on this
shared machine wall-time ratios of the same work swing by ±30 % between runs, CPU-time ratios by a few %.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from losses.aggregators import AGGREGATORS, WEIGHTINGS, Aggregator, UPGrad
from trainer import Trainer

STEPS = 400
TARGETS = {2: 1.5, 8: 5.0}


def trunk_model(m: int) -> keras.Model:
    inp = keras.Input((100,))
    x = keras.layers.Dense(256, activation="relu")(inp)
    x = keras.layers.Dense(256, activation="relu")(x)
    return keras.Model(inp, {f"task{i}": keras.layers.Dense(1, name=f"task{i}")(x) for i in range(m)})


def heads_loss(m: int) -> Callable:
    def loss(outputs, targets):
        return {f"task{i}": tf.reduce_mean(tf.square(outputs[f"task{i}"] - targets[f"task{i}"])) for i in range(m)}

    return loss


def hand_step(model: keras.Model, m: int, jacobian: bool, aggregator: Aggregator | None = None) -> Callable:
    """The least a step can do, by hand, no tapeloop: the plain step (one backward pass, SGD), or (``jacobian``)
    each head's gradient from one persistent tape, the Gramian of the trunk's gradients (kept in a variable, as
    statistics are: the pairs' products for m <= 3, stacked rows' matrix products above, the cheaper forms measured)
    and Mean's direction (the trunk gets the components' mean, each head its own gradient) — or, with an
    ``aggregator``, its weights from the Gramian (the library's solver, float64) and the trunk's weighted rows."""
    optimizer = keras.optimizers.SGD(1e-3)
    variables = model.trainable_variables
    optimizer.build(variables)
    trunk = [j for j, v in enumerate(variables) if not any(f"task{i}" in v.path for i in range(m))]
    kept = tf.Variable(tf.zeros([m, m]), trainable=False)

    def step(x, y):
        with tf.GradientTape(persistent=jacobian) as tape:
            outputs = model(x, training=True)
            parts = [tf.reduce_mean(tf.square(outputs[f"task{i}"] - y[f"task{i}"])) for i in range(m)]
            total = tf.add_n(parts)
        if not jacobian:
            optimizer.apply(tape.gradient(total, variables), variables)
            return
        per_key = [tape.gradient(part, variables) for part in parts]
        rows = [[g[j] for j in trunk] for g in per_key]
        if m <= 3:
            dot = {
                (a, b): tf.add_n(
                    [2.0 * tf.nn.l2_loss(p) if a == b else tf.reduce_sum(p * q) for p, q in zip(rows[a], rows[b])]
                )
                for a in range(m)
                for b in range(a, m)
            }
            gramian = tf.stack([tf.stack([dot[min(a, b), max(a, b)] for b in range(m)]) for a in range(m)])
        else:
            stacked = [tf.reshape(tf.stack(per_variable), [m, -1]) for per_variable in zip(*rows)]
            gramian = tf.add_n([tf.matmul(r, r, transpose_b=True) for r in stacked])
        kept.assign(gramian)
        if aggregator is None:  # the trunk's: the mean; a head's: its own
            grads = [tf.add_n([g[j] for g in per_key if g[j] is not None]) for j in range(len(variables))]
            grads = [g / m if j in trunk else g for j, g in enumerate(grads)]
        else:
            w = tf.unstack(tf.cast(aggregator.weights(tf.cast(gramian, tf.float64)), tf.float32))
            grads = [
                tf.add_n([w[i] * g[j] for i, g in enumerate(per_key)])
                if j in trunk
                else tf.add_n([g[j] for g in per_key if g[j] is not None])
                for j in range(len(variables))
            ]
        optimizer.apply(grads, variables)

    @tf.function(autograph=False)
    def epoch(iterator, n):
        tf.while_loop(lambda i: i < n, lambda i: (step(*next(iterator)) or i + 1,), (tf.constant(0),))

    return epoch


def aggregator_costs(timed_rounds: Callable, paired: Callable, rounds: int) -> dict:
    """{m: {aggregator: {"steps_per_s", "cost"}}}: the best round's rate and the median over paired rounds of the
    step's CPU time against the plain step's (bench.py's ``timed_rounds`` and ``paired``)."""
    found: dict = {}
    rng = np.random.default_rng(0)
    names = ["plain", *[n for n in AGGREGATORS if n != "sum"], *WEIGHTINGS]
    for m in TARGETS:
        x = rng.random((32 * STEPS, 100), dtype=np.float32)
        y = {f"task{i}": rng.random((32 * STEPS, 1), dtype=np.float32) for i in range(m)}
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).cache().prefetch(4)
        runs = {}
        for name in names:
            keras.utils.set_random_seed(0)
            trainer = Trainer(trunk_model(m), optimizer=keras.optimizers.SGD(1e-3), loss=heads_loss(m),
                              aggregator=None if name == "plain" else name)  # fmt: skip
            runs[name] = lambda t=trainer, d=data: t.fit(d, epochs=1, progress=False)
        for name in ("hand plain", "hand work", "hand upgrad"):
            keras.utils.set_random_seed(0)
            upgrad = UPGrad() if name == "hand upgrad" else None
            epoch = hand_step(trunk_model(m), m, jacobian=name != "hand plain", aggregator=upgrad)
            runs[name] = lambda e=epoch, d=data: e(iter(d), tf.constant(STEPS))
        times = timed_rounds(runs, rounds, clock=time.process_time)
        found[m] = {
            name: {"steps_per_s": STEPS / min(times[name]), "cost": 1 / paired(times, name, "plain")} for name in runs
        }
        for name in ("hand work", "hand upgrad"):
            found[m][name]["cost"] = 1 / paired(times, name, "hand plain")
        found[m]["hand plain"]["cost"] = 1 / paired(times, "hand plain", "plain")
    return found


def print_aggregators(found: dict) -> None:
    print("\nmulti-task aggregators (2x256 trunk, batch 32, SGD): step cost against the plain step (CPU time)")
    names = list(next(iter(found.values())))
    print(f"{'aggregator':<12}" + "".join(f"{f'm={m} steps/s':>14}{'cost':>7}" for m in found))
    for name in names:
        cells = "".join(f"{found[m][name]['steps_per_s']:>14.0f}{found[m][name]['cost']:>6.2f}x" for m in found)
        print(f"{name:<12}{cells}")
    for m, target in TARGETS.items():
        worst = max(v["cost"] for n, v in found[m].items() if n != "plain" and not n.startswith("hand"))
        floor, upgrad = found[m]["hand work"]["cost"], found[m]["hand upgrad"]["cost"]
        print(f"m={m}: worst {worst:.2f}x (target <= {target}x); every gradient formed, by hand: {floor:.2f}x "
              f"(mean), {upgrad:.2f}x (upgrad)")  # fmt: skip
    print("(hand plain: a hand-written plain step against tapeloop's; hand work / hand upgrad: the m backward passes,")
    print(" every gradient formed, the Gramian and the mean's / UPGrad's direction written by hand, against the")
    print(" hand-written plain step; tapeloop forms no Dense kernel's per-component gradient: trainer/gramian.py)")
