"""Train a task from the command line and keep everything about the run in one directory.

    python scripts/train.py [--task NAME | --task path/to/task.py] [--epochs N] [--batch-size N] [--seed N]
                            [--logdir DIR] [--fresh] [--set NAME=VALUE ...] [--checkpoint-every STEPS]
                            [--steps-per-execution N] [--strategy default|mirrored|multiworker] [--no-progress]

A task is a module with ``build(*, batch_size: int, seed: int, **params) -> trainer.Task``; its own keyword
parameters (with defaults) are set with ``--set name=value``. Built-in tasks live in ``scripts/tasks/`` and are
chosen by name; anything else is a path to a task file. The run directory holds history.csv, metrics.json,
loss_curves.png, tensorboard/{train,validation}, checkpoints/, final.weights.h5, config.json and the task's
pictures (``detections.png``).

Rerunning a command with the same ``--logdir`` resumes it exactly. One process at a time owns a run directory (a
lock the kernel releases when the process dies); every problem with the directory is a one-line error before any
training step; a rerun whose arguments would make it another run (task, batch size, seed, strategy, task
parameters) is refused, naming the differing values; ``--epochs`` may grow; ``--fresh`` moves the old run aside and
starts a new one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

QUIET = "TF_CPP_MIN_LOG_LEVEL" not in os.environ  # the user chose TensorFlow's C++ log level: show what it lets through
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_directory.py, next to this file
from run_directory import check_logdir, locked, move_aside, new_run_directory, where_it_stands, write_json  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_TASK = "detection"
STRATEGIES = ("default", "mirrored", "multiworker")
TENSORBOARD_EVERY = 50  # per-step TensorBoard scalars every this many training steps


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` where a flag has a default of its own to show, not after help that says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if (
            "default" in (action.help or "")
            or default is None
            or default is False
            or default in ([], argparse.SUPPRESS)
        ):
            return action.help or ""
        return super()._get_help_string(action)


def parameters_help(argv: list[str]) -> str:
    """For ``--help``: the parameters of the task named by ``--task`` (loading it), or how to list them."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--task")
    task = peek.parse_known_args(argv)[0].task
    if task is None:
        return "--task NAME --help lists that task's parameters (--set NAME=VALUE)."
    from trainer.task import describe_parameters, task_parameters

    try:
        parameters = describe_parameters(task_parameters(load_task(task).build))
    except (SystemExit, TypeError) as error:
        return str(error)
    return f"parameters of task {task} (--set NAME=VALUE): {parameters}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    arguments = sys.argv[1:] if argv is None else argv
    wants_help = any(a in ("-h", "--help") for a in arguments)
    parser = argparse.ArgumentParser(
        description="Train a tapeloop task; everything about the run goes to one directory.",
        formatter_class=HelpFormatter,
        epilog=parameters_help(arguments) if wants_help else None,
    )
    add = parser.add_argument
    add(
        "--task", help=f"a built-in task ({', '.join(builtin_tasks())}) or a task file's path (default: {DEFAULT_TASK})"
    )
    add("--epochs", type=positive_int, help="number of epochs (default: the task's own)")
    add("--batch-size", type=positive_int, default=32, help="global batch size, split across replicas and workers")
    add("--seed", type=int, default=0, help="seed for data, initial weights and shuffling")
    add("--logdir", help="run directory (default: runs/<task>-<timestamp>); rerun with it to resume")
    add("--fresh", action="store_true", help="start a new run in --logdir, moving the old one aside (never deleted)")
    add("--set", action="append", default=[], metavar="NAME=VALUE",
        help="a task parameter (repeatable), passed to the task's build(); typed by its default there")  # fmt: skip
    add("--checkpoint-every", type=positive_int, metavar="STEPS", help="also write a checkpoint every STEPS steps")
    add(
        "--steps-per-execution",
        type=steps_per_execution,
        help="training steps per compiled call, or 'auto' (default: the task's, else auto: grown until one call "
        "takes ~50 ms)",
    )
    add(
        "--aggregator",
        metavar="NAME",
        help="multi-task balancing: upgrad, mgda, pcgrad, imtlg, cagrad, dualproj, "
        "alignedmtl, mean, sum, or a loss weighting: gradnorm, dwa (default: the task's, else the weighted sum)",
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


@contextlib.contextmanager
def quiet_native_logs(enabled: bool = QUIET):
    """TensorFlow's C++ start-up lines (oneDNN, CUDA probing, absl) reach file descriptor 2 before any log level
    applies. While TensorFlow is imported and its devices found, fd 2 goes to a temporary file, shown only if
    that fails."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException as error:
            failed = not isinstance(error, SystemExit)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))


def main(argv: list[str] | None = None) -> Run:
    args = parse_args(argv)
    args.task = args.task or DEFAULT_TASK
    if args.strategy == "multiworker" and args.logdir is None:
        raise SystemExit("error: --strategy multiworker needs --logdir (every worker must name the same directory)")
    name = Path(args.task).stem
    logdir = Path(args.logdir) if args.logdir else new_run_directory(name)
    check_logdir(logdir)
    with quiet_native_logs():
        module = load_task(args.task)  # (imports TensorFlow)
        strategy = make_strategy(args.strategy)  # before any other TensorFlow op (multi-worker needs that)
        import tensorflow as tf

        tf.config.list_physical_devices()  # (probes for CUDA)
    from trainer.task import parse_task_parameters, task_parameters

    try:
        args.params = {**task_parameters(module.build), **parse_task_parameters(module.build, args.set)}
        if args.aggregator is not None:
            from losses.aggregators import resolve

            resolve(args.aggregator)  # an unknown name fails now, naming the known ones
    except (TypeError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
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
    from trainer.writers import format_value, split_validation

    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)  # (the chief's exists: it holds the lock)
    keras.utils.set_random_seed(args.seed)  # Python, NumPy and TensorFlow: initial weights, dropout, data
    tf.config.experimental.enable_op_determinism()  # the same bits on the same machine, run after run
    with strategy.scope():
        task = module.build(batch_size=args.batch_size, seed=args.seed, **args.params)
        options = {"steps_per_execution": "auto", **task.trainer_options}
        if args.steps_per_execution is not None:  # the command line wins over the task
            options["steps_per_execution"] = args.steps_per_execution
        if args.aggregator is not None:
            options["aggregator"] = args.aggregator
        trainer = Trainer(
            task.model,
            optimizer=task.optimizer,
            loss=task.loss,
            loss_weights=task.loss_weights,
            metrics=task.metrics,
            strategy=strategy,
            seed=args.seed,
            **options,
        )
    epochs = args.epochs or task.epochs
    config = {**vars(args), "task_file": str(module.__file__), "logdir": str(logdir), "epochs": epochs}
    config.update(replicas=strategy.num_replicas_in_sync, params=args.params)
    del config["fresh"], config["set"]
    resumed = where_it_stands(config, logdir, epochs)
    if resumed:
        print(resumed, flush=True)
    write_json(run_dir / "config.json", config)  # --epochs is the run's new target
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
            callbacks=[*task.make_callbacks(trainer), WriterCallback(*writers)],  # the writers see what those log
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
    # The last epoch's values exactly as history.csv holds them (validation's, when there is validation data).
    last = {key: values[-1] for key, values in history.history.items()}
    validated = split_validation(last)[1]
    results = validated or last
    if task.evaluate_extra is not None:
        results.update({k: float(v) for k, v in task.evaluate_extra(trainer, task.validation).items()})
    results = {key: float(format_value(value)) for key, value in results.items()}
    write_json(run_dir / "metrics.json", results)
    if task.pictures is not None:
        for picture, figure in task.pictures(trainer, task.validation).items():
            figure.savefig(run_dir / f"{picture}.png", dpi=100)
    if hasattr(task.model, "save_weights"):
        task.model.save_weights(run_dir / "final.weights.h5")
    if run_dir == logdir:
        seconds = time.perf_counter() - start
        print_summary(name, results, bool(validated), trainer.global_step, seconds, logdir)
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
