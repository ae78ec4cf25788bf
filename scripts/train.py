"""Train a task from the command line: ``python scripts/train.py [--task NAME | --task path/to/task.py] ...``.

A task is a module with ``build(*, batch_size: int, seed: int) -> trainer.Task``. Built-in tasks live in
``scripts/tasks/`` and are chosen by name; anything else is a path to a task file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_TASK = "detection"


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--task",
        default=DEFAULT_TASK,
        help=f"a built-in task ({', '.join(builtin_tasks())}; default {DEFAULT_TASK}) or a path to a task file",
    )
    parser.add_argument("--epochs", type=positive_int, help="number of epochs (default: the task's own)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="global batch size (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, weights and shuffling (default 0)")
    parser.add_argument(
        "--steps-per-execution", type=positive_int, default=16, help="training steps per compiled call (default 16)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch instead)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    module = load_task(args.task)
    import keras  # after argument parsing: --help stays fast

    from trainer import ProgressWriter, Trainer, WriterCallback

    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    task = module.build(batch_size=args.batch_size, seed=args.seed)
    trainer = Trainer(
        task.model,
        optimizer=task.optimizer,
        loss=task.loss,
        loss_weights=task.loss_weights,
        metrics=task.metrics,
        steps_per_execution=args.steps_per_execution,
        seed=args.seed,
    )
    lines = [WriterCallback(ProgressWriter(sys.stdout, bar=False))] if args.no_progress else []
    history = trainer.fit(
        task.train,
        epochs=args.epochs or task.epochs,
        validation_data=task.validation,
        callbacks=lines,
        progress=not args.no_progress,
    )
    if task.validation is not None:
        results = trainer.evaluate(task.validation)
    else:
        results = {k: v[-1] for k, v in history.history.items()}
    if task.evaluate_extra is not None:
        results.update(task.evaluate_extra(trainer, task.validation))
    width = max(map(len, results))
    print(f"\nFinal results ({'validation' if task.validation is not None else 'training'}), task {args.task}:")
    for key, value in results.items():
        print(f"  {key:<{width}}  {value:.4f}")
    print(f"Done in {time.perf_counter() - start:.1f}s ({trainer.global_step} steps).")
    return results


if __name__ == "__main__":
    main()
