"""Benchmark: tapeloop's Trainer against a minimal hand-written GradientTape loop and keras.Model.fit.

    python scripts/bench.py [--repeats N] [--json PATH] [--large-numpy GB]
                            [--only large-numpy|first-epoch|aggregators]

Same model, data and optimizer in one process; warm-up (tracing) excluded. Each runner runs ``--repeats`` rounds of
one epoch, in a new random order each round; steps/s are the best round, ratios the median over rounds of the paired
times (the machine is noisy: a slow phase hits one round's runs alike). Workloads:
  (a) overhead-bound: seed 001 example 1 (100 -> 64 -> 32 -> 1 and 3), batch 32, Keras-style losses
      (also against the hand loop with a NaN guard, and at 32 steps per call with its steps written out)
  (b) compute-bound: MLP 100 -> 256 -> 256 -> heads, batch 256
  (c) logging cost: workload (a) with a loss returning 1 vs 20 named components
  (d) the detection task's SSD, batch 32
  (e) multi-task aggregators: the step cost of each against the plain step, m = 2 and 8 (bench_aggregators.py)
plus the cost of log_grad_norms, retraces after the first epoch and resident memory over 20 epochs; and, each run
in a fresh process (scripts/bench_fresh.py), the first epoch against Model.fit's (a VAE on 1,500 digits and the
seed-001 model) and large NumPy input (default 1.5 GB: time and peak memory). Targets are printed as ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent / "tasks"))
from trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_aggregators import aggregator_costs, print_aggregators
from bench_fresh import (
    first_epoch,
    first_epoch_child,
    large_numpy,
    large_numpy_child,
    print_first,
    print_large,
    rss_mb,
    two_head_model,
)

LOSSES = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}


def two_head_data(n: int, batch: int) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    x = rng.random((n, 100), dtype=np.float32)
    y = {
        "regression_output": rng.random((n, 1), dtype=np.float32),
        "classification_output": np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)],
    }
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache().prefetch(4)


def timed_rounds(runs: dict, rounds: int, clock=time.perf_counter) -> dict[str, list[float]]:
    """Every runner's time per round: each ``run()`` (one epoch) once per round, in a new random order each round,
    after one warm-up call each (tracing). ``clock``: wall time, or ``time.process_time`` (CPU time).

    Python's garbage collector is off while a run is timed and collects between rounds (as ``timeit`` does): with
    TensorFlow and a few models loaded a full collection takes ~0.3 s here, and one landing inside a run charged it
    to whichever runner was going (measured: ~100 ms a call, the median over 25 rounds, on one of two runners)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    order, shuffle = list(runs), random.Random(0).shuffle
    enabled = gc.isenabled()
    try:
        for _ in range(rounds):
            gc.collect()
            gc.disable()
            shuffle(order)
            for name in order:
                start = clock()
                runs[name]()
                times[name].append(clock() - start)
            gc.enable()
    finally:
        if enabled:
            gc.enable()
        else:
            gc.disable()
    return times


def rates(times: dict[str, list[float]], steps: int) -> dict[str, float]:
    """Steps/s of each runner in its best round."""
    return {name: steps / min(seconds) for name, seconds in times.items()}


def paired(times: dict[str, list[float]], name: str, base: str) -> float:
    """``name``'s speed relative to ``base``: the median over rounds of base's time / name's time. Each ratio
    compares two runs of one round, so a slow phase of this shared machine hits both; its median is steadier
    than a ratio of best times (measured: the ratio of bests of the same code swung 0.72-0.86 between runs)."""
    return statistics.median(b / t for b, t in zip(times[base], times[name], strict=True))


def hand_loop(model: keras.Model, loss_fn, dataset: tf.data.Dataset, spe: int, guard: bool = False,
              unrolled: bool = False):  # fmt: skip
    """The floor: a minimal tf.function GradientTape step, ``spe`` steps per call in a tf.range loop.

    ``guard``: the update under a ``tf.cond`` on the loss being finite — the least a loop must add to promise that a
    NaN step changes no weight (tapeloop also stops there, and tracks every component). ``unrolled``: the ``spe``
    steps of a call written out one after the other in Python (no ``tf.while_loop``; a block of each length traced).
    """
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(model(x, training=True), y)
        grads = tape.gradient(loss, model.trainable_variables)
        if not guard:
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return

        def update():
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return tf.constant(True)

        tf.cond(tf.math.is_finite(loss), update, lambda: tf.constant(False))

    @tf.function
    def one(x, y):
        step(x, y)

    @tf.function
    def block(iterator, n):
        for _ in tf.range(n):
            step(*next(iterator))

    @tf.function
    def written_out(iterator, n: int):
        for _ in range(n):
            step(*next(iterator))

    steps = int(dataset.cardinality())

    def run():
        if spe == 1:
            for x, y in dataset:
                one(x, y)
            return
        iterator = iter(dataset)
        for start in range(0, steps, spe):
            n = min(spe, steps - start)
            written_out(iterator, n) if unrolled else block(iterator, tf.constant(n))

    return run


def keras_losses(outputs, targets):
    mse = keras.losses.MeanSquaredError()(targets["regression_output"], outputs[0])
    return mse + keras.losses.CategoricalCrossentropy()(targets["classification_output"], outputs[1])


def compare(name, build_model, dataset, spe, repeats, results, *, loss=LOSSES, hand_loss=keras_losses, with_fit=True,
            guarded=False):  # fmt: skip
    steps = int(dataset.cardinality())
    trainer = Trainer(build_model(), optimizer=keras.optimizers.Adam(1e-3), loss=loss, steps_per_execution=spe)
    runs = {
        "tapeloop": lambda: trainer.fit(dataset, epochs=1, progress=False),
        "hand": hand_loop(build_model(), hand_loss, dataset, 32 if spe == "auto" else spe),
    }
    if guarded:
        runs["hand_guarded"] = hand_loop(build_model(), hand_loss, dataset, 32 if spe == "auto" else spe, guard=True)
    if guarded and spe == 32:  # the same bare steps written out: what a loop without tf.while_loop would give
        runs["hand_unrolled"] = hand_loop(build_model(), hand_loss, dataset, spe, unrolled=True)
    if with_fit:
        model = build_model()
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, steps_per_execution=1 if spe == "auto" else spe)
        runs["keras_fit"] = lambda: model.fit(dataset, epochs=1, verbose=0)
    times = timed_rounds(runs, repeats)
    row = {"workload": name, "spe": spe, **rates(times, steps), "vs_hand": paired(times, "tapeloop", "hand")}
    if with_fit:
        row["vs_fit"] = paired(times, "tapeloop", "keras_fit")
    if guarded:
        row["vs_hand_guarded"] = paired(times, "tapeloop", "hand_guarded")
        row["guard_cost"] = 1 - paired(times, "hand_guarded", "hand")
    if "hand_unrolled" in runs:
        row["vs_hand_unrolled"] = paired(times, "tapeloop", "hand_unrolled")
        row["unrolled_vs_hand"] = paired(times, "hand_unrolled", "hand")
    results.append(row)


def many_components(k: int):
    def loss(outputs, targets):
        err = tf.square(outputs["regression_output"] - targets["regression_output"])
        ce = keras.losses.categorical_crossentropy(targets["classification_output"], outputs["classification_output"])
        parts = {"mse": tf.reduce_mean(err), "ce": tf.reduce_mean(ce)}
        for i in range(18):
            parts[f"part{i:02d}"] = tf.reduce_mean(err * (i + 1) / 100.0)
        return parts if k > 1 else tf.add_n(list(parts.values()))  # the same work, one logged key

    return loss


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15,
                        help="rounds: timed epochs per runner (ratios are medians of paired rounds)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--large-numpy", type=float, default=1.5, metavar="GB",
                        help="size of x in the large-numpy row (GB of float32; 0 skips the row)")  # fmt: skip
    parser.add_argument("--only", choices=("large-numpy", "first-epoch", "aggregators"), help="run only this row")
    parser.add_argument("--scaling", type=Path, nargs="?", const=Path("scaling.png"), metavar="PNG",
                        help="measure steps/s along each axis of scripts/bench_scaling.py; plot to PNG")  # fmt: skip
    parser.add_argument("--scaling-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--large-numpy-child", choices=("keras", "trainer"), help=argparse.SUPPRESS)
    parser.add_argument("--first-epoch-child", choices=("keras", "trainer"), help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=("vae", "seed001"), default="vae", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scaling_child:
        from bench_scaling import child

        print(json.dumps(child(args.scaling_child[0], int(args.scaling_child[1]))))
        return {}
    if args.scaling:
        from bench_scaling import print_scaling, scaling

        found = scaling(args.scaling)
        print_scaling(found, args.scaling)
        if args.json:
            args.json.write_text(json.dumps({"scaling": found}, indent=2) + "\n")
        return {"scaling": found}
    if args.large_numpy_child:
        print(json.dumps(large_numpy_child(args.large_numpy_child, args.large_numpy)))
        return {}
    if args.first_epoch_child:
        print(json.dumps(first_epoch_child(args.first_epoch_child, args.workload)))
        return {}
    if args.only == "large-numpy":
        report = {"large_numpy": large_numpy(args.large_numpy)}
        print_large(report["large_numpy"])
        return report
    if args.only == "aggregators":
        report = {"aggregators": aggregator_costs(timed_rounds, paired, max(3, args.repeats // 2))}
        print_aggregators(report["aggregators"])
        return report
    if args.only == "first-epoch":
        report = {"first_epoch": first_epoch()}
        print_first(report["first_epoch"])
        return report
    keras.utils.set_random_seed(0)
    started = time.perf_counter()
    rows: list[dict] = []
    small = two_head_data(32 * 200, 32)
    for spe in (1, 32, "auto"):
        compare("a: seed001 ex1, batch 32", lambda: two_head_model((64, 32)), small, spe, args.repeats, rows,
                guarded=True)  # fmt: skip
    big = two_head_data(256 * 40, 256)
    compare("b: MLP 256x256, batch 256", lambda: two_head_model((256, 256)), big, 1, args.repeats, rows)

    runs = {}
    for k in (1, 20):
        trainer = Trainer(two_head_model((64, 32)), optimizer=keras.optimizers.Adam(1e-3), loss=many_components(k))
        runs[k] = lambda t=trainer: t.fit(small, epochs=1, progress=False)
    # log_grad_norms: one extra backward pass per component (here the 2 Keras-style heads and their shared trunk)
    for norms in (False, True):
        trainer = Trainer(two_head_model((64, 32)), optimizer=keras.optimizers.Adam(1e-3), loss=LOSSES,
                          log_grad_norms=norms)  # fmt: skip
        runs[f"norms={norms}"] = lambda t=trainer: t.fit(small, epochs=1, progress=False)
    # A cost, not a speed: CPU time (wall-time ratios of these 200-step epochs swung -16 % to +20 % between runs on
    # this shared machine, CPU-time ratios +0.3 % to +3.8 %). These epochs are short (~0.1 s): 4x the rounds, at
    # least 61 (15 rounds' median of a ~1 % cost crossed +5 % in one run of six; 61 rounds' spread is half).
    logging_rounds = max(61, 4 * args.repeats)
    logging = timed_rounds(runs, logging_rounds, clock=time.process_time)

    import detection

    rng = np.random.default_rng(0)
    images, box, label = detection.make_images(32 * 12, rng)
    det = tf.data.Dataset.from_tensor_slices((images, detection.encode_targets(box, label))).batch(32).cache()
    from losses import MultiBoxLoss

    multibox = MultiBoxLoss()

    def det_hand_loss(outputs, targets):
        parts = multibox(outputs, targets)
        return parts["loc"] + parts["conf"]

    compare("d: detection SSD, batch 32", detection.build_model, det, 1, max(1, args.repeats - 1), rows,
            loss=multibox, hand_loss=det_hand_loss, with_fit=False)  # fmt: skip

    # Retraces and memory: 20 epochs with a partial last batch and validation.
    x = np.random.default_rng(1).random((1000, 100), dtype=np.float32)
    y = {"regression_output": x[:, :1], "classification_output": np.eye(3, dtype=np.float32)[(x[:, 1] * 3).astype(int)]}
    trainer = Trainer(two_head_model((64, 32)), loss=LOSSES, steps_per_execution="auto")
    trainer.fit(
        (x, y),
        batch_size=48,
        epochs=2,
        validation_data=(x[:100], {k: v[:100] for k, v in y.items()}),
        progress=False,
    )
    traces, before = dict(trainer.trace_counts), rss_mb()
    trainer.fit(
        (x, y), batch_size=48, epochs=20, validation_data=(x[:100], {k: v[:100] for k, v in y.items()}), progress=False
    )
    growth = rss_mb() - before
    retraced = {k: trainer.trace_counts[k] - traces.get(k, 0) for k in trainer.trace_counts}

    report = {
        "rows": rows,
        "logging": {
            **{str(k): v for k, v in rates(logging, 200).items()},
            "cost": 1 - paired(logging, 20, 1),
            "rounds": logging_rounds,
        },
        "grad_norms": {
            "off": rates(logging, 200)["norms=False"],
            "on": rates(logging, 200)["norms=True"],
            "cost": 1 - paired(logging, "norms=True", "norms=False"),
        },
        "retraces_after_first_epochs": retraced,
        "rss_growth_mb_over_20_epochs": growth,
        "seconds": time.perf_counter() - started,
        "rounds": args.repeats,
    }
    report["aggregators"] = aggregator_costs(timed_rounds, paired, max(3, args.repeats // 2))
    report["first_epoch"] = first_epoch()
    if args.large_numpy > 0:
        report["large_numpy"] = large_numpy(args.large_numpy)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(report: dict) -> None:
    print(f"\n{'workload':<28} {'spe':>5} {'tapeloop':>9} {'hand':>9} {'fit':>9} {'vs hand':>8} {'vs fit':>7}")
    for r in report["rows"]:
        fit = r.get("keras_fit")
        fit_rate = f"{fit:.0f}" if fit else "-"
        vs_fit = f"{r['vs_fit']:.2f}" if fit else "-"
        print(
            f"{r['workload']:<28} {r['spe']!s:>5} {r['tapeloop']:>9.0f} {r['hand']:>9.0f} {fit_rate:>9} "
            f"{r['vs_hand']:>8.2f} {vs_fit:>7}"
        )
    hand = {r["spe"]: r["vs_hand"] for r in report["rows"] if r["workload"].startswith("a:")}
    print(f"(a) vs the hand loop: {hand[1]:.2f} at 1 step per call, {hand[32]:.2f} at 32 (targets >= 1.0)")
    for r in report["rows"]:
        if "vs_hand_guarded" in r:
            print(
                f"(a) spe {r['spe']!s:>4}: the hand loop with a NaN guard (tf.cond around the update) costs "
                f"{r['guard_cost']:+.1%} over the bare one; tapeloop {r['vs_hand_guarded']:.2f}x the guarded hand loop"
            )
        if "vs_hand_unrolled" in r:
            print(
                f"(a) spe {r['spe']!s:>4}: the bare hand loop written out (no tf.while_loop) runs "
                f"{r['unrolled_vs_hand']:.2f}x the hand loop; tapeloop {r['vs_hand_unrolled']:.2f}x the written-out one"
            )
    log = report["logging"]
    print(
        f"\nc: logging cost, 20 components vs 1 (CPU time): {log['20']:.0f} vs {log['1']:.0f} steps/s "
        f"({log['cost']:+.1%}; target <= +5%; median of {log['rounds']} paired rounds)"
    )
    norms = report["grad_norms"]
    on, off, cost = norms["on"], norms["off"], norms["cost"]
    print(f"log_grad_norms=True on workload (a) (CPU time): {on:.0f} vs {off:.0f} steps/s ({cost:+.1%})")
    print(f"retraces after the first epochs (partial batch + validation): {report['retraces_after_first_epochs']}")
    print(f"resident memory growth over 20 epochs: {report['rss_growth_mb_over_20_epochs']:.1f} MB")
    print(
        f"(steps/s: best round; ratios and costs: medians over {report['rounds']} paired rounds; bench took "
        f"{report['seconds']:.0f} s)"
    )
    print_aggregators(report["aggregators"])
    print_first(report["first_epoch"])
    if "large_numpy" in report:
        print_large(report["large_numpy"])


if __name__ == "__main__":
    main()
