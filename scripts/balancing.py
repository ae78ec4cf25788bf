"""The README's multi-task balancing figures: a table and a picture, both measured here.

    python scripts/balancing.py --table          # --task balancing with each aggregator: final metrics, seconds
    python scripts/balancing.py --picture docs/balancing.png   # CAGrad's 2-objective toy, each trajectory

The toy is the two-parameter, two-objective problem of Liu et al. 2021 (CAGrad, Figure 1; their toy.py): each
aggregator steers Adam (lr 1e-2 for 5,000 steps; theirs: 1e-3 for 100,000) from the same five starting points;
the contours are those of the mean objective, the dots the starting points and the stars where the runs end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from losses.aggregators import AGGREGATORS, get_aggregator

ROOT = Path(__file__).resolve().parent.parent
LOWER = 5e-6
LEARNING_RATE = 1e-2
STARTS = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)]
NAMES = [name for name in AGGREGATORS if name != "mean"]  # Mean is Sum's direction halved


def toy(x: tf.Tensor) -> tf.Tensor:
    """The two objectives (f1, f2) at x = (x1, x2), as in CAGrad's toy.py."""
    x1, x2 = x[0], x[1]
    f1 = tf.math.log(tf.maximum(tf.abs(0.5 * (-x1 - 7) - tf.tanh(-x2)), LOWER)) + 6
    f2 = tf.math.log(tf.maximum(tf.abs(0.5 * (-x1 + 3) + tf.tanh(-x2) + 2), LOWER)) + 6
    c1 = tf.maximum(tf.tanh(x2 * 0.5), 0.0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = tf.maximum(tf.tanh(-x2 * 0.5), 0.0)
    return tf.stack([f1 * c1 + f1_sq * c2, f2 * c1 + f2_sq * c2])


def trajectory(name: str, start: tuple[float, float], steps: int, every: int = 50) -> np.ndarray:
    """Adam on the aggregated direction of the toy's 2 x 2 Jacobian; every ``every``-th point."""
    aggregator = get_aggregator(name)
    x = tf.Variable(start, dtype=tf.float64)
    optimizer = keras.optimizers.Adam(LEARNING_RATE)

    @tf.function
    def run(n: tf.Tensor) -> tf.Tensor:
        points = tf.TensorArray(tf.float64, size=n // every)
        for i in tf.range(n):
            with tf.GradientTape() as tape:
                values = toy(x)
            jacobian = tape.jacobian(values, x, experimental_use_pfor=False)
            direction = aggregator(jacobian, seed=tf.stack([tf.constant(0, tf.int64), tf.cast(i, tf.int64)]))
            optimizer.apply_gradients([(direction, x)])
            if i % every == 0:
                points = points.write(i // every, tf.identity(x))
        return points.stack()

    return run(tf.constant(steps)).numpy()


def picture(path: Path, steps: int) -> None:
    import matplotlib

    tf.get_logger().setLevel("ERROR")  # one compiled loop per trajectory, on purpose: no retracing warnings

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(-10, 10, 200)
    xs, ys = np.meshgrid(grid, grid)
    values = toy(tf.constant(np.stack([xs, ys]))).numpy().mean(axis=0)
    fig, axes = plt.subplots(2, 4, figsize=(16, 8.4), sharex=True, sharey=True)
    for ax, name in zip(axes.ravel(), NAMES, strict=True):
        ax.contour(xs, ys, values, levels=25, cmap="Greys", linewidths=0.6)
        for start in STARTS:
            path_ = trajectory(name, start, steps)
            ax.plot(path_[:, 0], path_[:, 1], lw=2)
            ax.plot(*start, "ko", ms=4)
            ax.plot(*path_[-1], "r*", ms=8)
        ax.set_title(repr(get_aggregator(name)) if name == "cagrad" else get_aggregator(name).__class__.__name__)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
    title = f"CAGrad's toy (Liu et al. 2021, Fig. 1): Adam {LEARNING_RATE:g}, {steps} steps; contours of (f1 + f2) / 2"
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def table(epochs: int | None) -> list[dict]:
    """Each aggregator on ``--task balancing`` through the CLI (seed 0): final metrics and seconds."""
    found = []
    for name in ["sum", *NAMES[1:], "mean", "gradnorm", "dwa"]:
        with tempfile.TemporaryDirectory() as logdir:
            command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--task", "balancing", "--seed", "0",
                       "--aggregator", name, "--logdir", logdir, "--no-progress"]  # fmt: skip
            command += ["--epochs", str(epochs)] if epochs else []
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds = time.perf_counter() - start
            metrics = json.loads((Path(logdir) / "metrics.json").read_text())
        found.append({"aggregator": name, "seconds": seconds, "metrics": metrics})  # validation's, last epoch
    keys = ["regression_output/mae", "classification_output/binary_accuracy", "regression", "classification"]
    print("| aggregator | " + " | ".join(keys) + " | seconds |")
    print("|---" * (len(keys) + 2) + "|")
    for row in found:
        cells = " | ".join(f"{row['metrics'][key]:.4g}" for key in keys)
        print(f"| {row['aggregator']} | {cells} | {row['seconds']:.0f} |")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="train --task balancing with each aggregator")
    parser.add_argument("--epochs", type=int, help="epochs for --table (default: the task's)")
    parser.add_argument("--picture", type=Path, help="draw the toy's trajectories to this PNG")
    parser.add_argument("--steps", type=int, default=5000, help="Adam steps per trajectory in the picture")
    args = parser.parse_args(argv)
    if not (args.table or args.picture):
        parser.error("give --table and/or --picture PATH")
    if args.picture:
        picture(args.picture, args.steps)
    if args.table:
        table(args.epochs)


if __name__ == "__main__":
    main()
