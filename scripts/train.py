"""Train a task from the command line and keep everything about the run in one directory.

    python scripts/train.py [--task NAME | --task path/to/task.py] [--epochs N] [--batch-size N] [--seed N]
                            [--logdir DIR] [--fresh] [--checkpoint-every STEPS] [--steps-per-execution N]
                            [--strategy default|mirrored|multiworker] [--no-progress]

A task is a module with ``build(*, batch_size: int, seed: int) -> trainer.Task``. Built-in tasks live in
``scripts/tasks/`` and are chosen by name; anything else is a path to a task file. The run directory holds
history.csv, metrics.json, loss_curves.png, tensorboard/, checkpoints/, final.weights.h5 and config.json.

Rerunning a command with the same ``--logdir`` resumes it exactly. One process at a time owns a run directory (a
lock the kernel releases when the process dies); every problem with the directory is a one-line error before any
training step; a rerun whose arguments would make it another run (task, batch size, seed, strategy) is refused,
naming the differing values; ``--epochs`` may grow; ``--fresh`` moves the old run aside and starts a new one.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_TASK = "detection"
STRATEGIES = ("default", "mirrored", "multiworker")
TENSORBOARD_EVERY = 50  # per-step TensorBoard scalars every this many training steps
IDENTITY = ("task_file", "batch_size", "seed", "strategy", "replicas")  # what a rerun may not change
PARTS = ("history.csv", "metrics.json", "config.json", "loss_curves.png", "final.weights.h5", "checkpoints",
         "tensorboard")  # fmt: skip
LOCK = ".lock"


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_task(spec: str) -> ModuleType:
    """A built-in task by name, or a task file by path."""
    path = TASKS_DIR / f"{spec}.py" if spec in builtin_tasks() else Path(spec)
    if not path.is_file():
        raise SystemExit(
            f"error: unknown task {spec!r}: not a built-in task ({', '.join(builtin_tasks())}) and no file at {path}."
        )
    module_spec = importlib.util.spec_from_file_location(f"tapeloop_task_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses and pickling in the task file look it up there
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "build", None)):
        raise SystemExit(f"error: task file {path} has no function build(*, batch_size, seed) -> trainer.Task.")
    return module


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def steps_per_execution(text: str) -> int | str:
    """``auto`` or a positive int (argparse type)."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a tapeloop task; everything about the run goes to one directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--task", default=DEFAULT_TASK, help=f"a built-in task ({', '.join(builtin_tasks())}) or a task file's path")
    add("--epochs", type=positive_int, help="number of epochs (default: the task's own)")
    add("--batch-size", type=positive_int, default=32, help="global batch size, split across replicas and workers")
    add("--seed", type=int, default=0, help="seed for data, initial weights and shuffling")
    add("--logdir", help="run directory (default: runs/<task>-<timestamp>); rerun with it to resume")
    add("--fresh", action="store_true", help="start a new run in --logdir, moving the old one aside (never deleted)")
    add("--checkpoint-every", type=positive_int, metavar="STEPS", help="write a checkpoint every STEPS steps")
    add(
        "--steps-per-execution",
        type=steps_per_execution,
        default="auto",
        help="training steps per compiled call, or 'auto' (grown until one call takes ~50 ms)",
    )
    add("--strategy", choices=STRATEGIES, default="default", help="tf.distribute strategy")
    add("--no-progress", action="store_true", help="no progress bar: one line per epoch on stdout instead")
    return parser.parse_args(argv)


def make_strategy(name: str):
    import tensorflow as tf

    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise SystemExit(
                "error: --strategy multiworker needs TF_CONFIG (the cluster and this worker's task); launch the "
                "workers with scripts/launch_workers.py, or see the README's Distributed training section."
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy() if name == "mirrored" else tf.distribute.get_strategy()


@dataclass
class Run:
    """What a run produced: the final results, the History and the run directory."""

    results: dict[str, float]
    history: dict[str, list[float]]
    logdir: Path


def check_logdir(logdir: Path) -> None:
    """Every problem with the run directory, as a one-line error, before anything is imported or trained."""
    if logdir.exists() and not logdir.is_dir():
        raise SystemExit(f"error: --logdir {logdir} is a file, not a directory.")
    existing = next((p for p in [logdir, *logdir.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: cannot create or write --logdir {logdir}: {existing} is not a writable directory.")
    for part in PARTS:
        path = logdir / part
        if path.exists() and not os.access(path, os.W_OK):
            raise SystemExit(f"error: {path} is not writable; fix its permissions or use another --logdir.")


@contextlib.contextmanager
def locked(logdir: Path):
    """One live run per directory: an flock the kernel releases when the process ends, however it ends."""
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise SystemExit(f"error: --logdir {logdir} is in use by a running run ({owner}); wait for it or use "
                             "another --logdir.") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def move_aside(logdir: Path) -> None:
    """``--fresh``: the old run goes to ``<logdir>.old-<timestamp>``; nothing is deleted."""
    if logdir.is_dir() and any(p.name != LOCK for p in logdir.iterdir()):
        aside = logdir.with_name(f"{logdir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        logdir.rename(aside)
        print(f"--fresh: the previous run in {logdir} was moved to {aside}", flush=True)


def main(argv: list[str] | None = None) -> Run:
    args = parse_args(argv)
    if args.strategy == "multiworker" and args.logdir is None:
        raise SystemExit("error: --strategy multiworker needs --logdir (every worker must name the same directory)")
    name = Path(args.task).stem
    logdir = Path(args.logdir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_logdir(logdir)
    module = load_task(args.task)
    strategy = make_strategy(args.strategy)  # before any other TensorFlow op (multi-worker needs that)
    from trainer.cluster import is_chief

    chief = is_chief(strategy)
    if not chief:  # only the chief writes the run directory; other workers use a temporary one and delete it
        run_dir = Path(tempfile.mkdtemp(prefix="tapeloop-worker-"))
        try:
            return run(args, argv, module, strategy, name, logdir, run_dir)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    if args.fresh:
        move_aside(logdir)
    with locked(logdir):
        return run(args, argv, module, strategy, name, logdir, logdir)


def where_it_stands(config: dict, logdir: Path, epochs: int) -> str | None:
    """Refuse a rerun that would be another run; return a line saying where a resumed run stands, or exit 0 when
    there is nothing left to train."""
    previous_file = logdir / "config.json"
    if not previous_file.exists():
        return None
    previous = json.loads(previous_file.read_text())
    changed = [
        f"{key}: {previous.get(key)!r} -> {config[key]!r}" for key in IDENTITY if previous.get(key) != config[key]
    ]
    if changed:
        raise SystemExit(
            f"error: {logdir} holds a run with other arguments ({'; '.join(changed)}); resuming it would silently "
            "be another run. Rerun with its arguments, or start fresh: a new --logdir, or --fresh (moves it aside)."
        )
    from trainer.checkpoints import read_meta

    found = read_meta(logdir / "checkpoints")
    if found is None:
        return None
    path, meta = found
    done, steps = meta["position"]["epoch"], meta["position"]["epoch_steps"]
    if done >= epochs:
        at = f"epoch {done}" + (f" and {steps} steps of the next" if steps else "")
        print(f"already trained to {at} (--epochs {epochs}); nothing to do. Run directory: {logdir}", flush=True)
        raise SystemExit(0)
    where = f"epoch {done}" + (f" + {steps} steps" if steps else "")
    return f"resumed from checkpoint {Path(path).name} ({where}, step {meta['global_step']})"


def run(args, argv, module, strategy, name: str, logdir: Path, run_dir: Path) -> Run:
    import keras
    import tensorflow as tf

    from trainer import (
        CSVWriter,
        PlotWriter,
        ProgressWriter,
        TensorBoardWriter,
        Trainer,
        TrainingInterrupted,
        WriterCallback,
    )

    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)  # (the chief's exists: it holds the lock)
    keras.utils.set_random_seed(args.seed)  # Python, NumPy and TensorFlow: initial weights, dropout, data
    tf.config.experimental.enable_op_determinism()  # the same bits on the same machine, run after run
    with strategy.scope():
        task = module.build(batch_size=args.batch_size, seed=args.seed)
        trainer = Trainer(
            task.model,
            optimizer=task.optimizer,
            loss=task.loss,
            loss_weights=task.loss_weights,
            metrics=task.metrics,
            steps_per_execution=args.steps_per_execution,
            strategy=strategy,
            seed=args.seed,
        )
    epochs = args.epochs or task.epochs
    config = {**vars(args), "task_file": str(module.__file__), "logdir": str(logdir), "epochs": epochs}
    config["replicas"] = strategy.num_replicas_in_sync
    del config["fresh"]
    resumed = where_it_stands(config, logdir, epochs)
    if resumed:
        print(resumed, flush=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # --epochs is the run's new target
    writers = [
        CSVWriter(run_dir / "history.csv"),
        TensorBoardWriter(run_dir / "tensorboard", every_n_steps=TENSORBOARD_EVERY),
        PlotWriter(run_dir / "loss_curves.png"),
    ]
    if args.no_progress:
        writers.append(ProgressWriter(sys.stdout, bar=False))

    def batch_size(data):  # --batch-size batches NumPy task data; a tf.data dataset comes batched by build()
        return None if isinstance(data, tf.data.Dataset) else args.batch_size

    try:
        history = trainer.fit(
            task.train,
            batch_size=batch_size(task.train),
            epochs=epochs,
            validation_data=task.validation,
            validation_batch_size=batch_size(task.validation),
            callbacks=[WriterCallback(*writers)],
            progress=not args.no_progress,
            checkpoint_dir=logdir / "checkpoints",  # the Trainer lets only the chief write there
            checkpoint_every=args.checkpoint_every,
        )
    except TrainingInterrupted as stop:
        again = list(sys.argv[1:] if argv is None else argv)
        if args.logdir is None:
            again += ["--logdir", str(logdir)]
        command = shlex.join(["python", str(Path(__file__)), *again])
        print(f"\n{stop}\nTo resume, run the same command with the same --logdir:\n  {command}", flush=True)
        raise SystemExit(128 + stop.signum) from None
    if task.validation is not None:
        results = trainer.evaluate(task.validation, batch_size=batch_size(task.validation))
    else:
        results = {k: v[-1] for k, v in history.history.items()}
    if task.evaluate_extra is not None:
        results.update({k: float(v) for k, v in task.evaluate_extra(trainer, task.validation).items()})
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    if hasattr(task.model, "save_weights"):
        task.model.save_weights(run_dir / "final.weights.h5")
    if run_dir == logdir:
        seconds = time.perf_counter() - start
        print_summary(name, results, task.validation is not None, trainer.global_step, seconds, logdir)
    return Run(results, history.history, logdir)


def print_summary(task: str, results: dict[str, float], validation: bool, steps: int, seconds: float, logdir: Path):
    width = max(map(len, results))
    print(f"\nFinal results ({'validation' if validation else 'training'}), task {task}:")
    print(f"  {'key':<{width}}  value")
    for key, value in results.items():
        print(f"  {key:<{width}}  {value:.4f}")
    print(f"Done in {seconds:.1f}s ({steps} steps). Run directory: {logdir}")
    print(f"  tensorboard --logdir {logdir / 'tensorboard'}   ·   curves: {logdir / 'loss_curves.png'}")


if __name__ == "__main__":
    main()
