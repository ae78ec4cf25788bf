"""Which process this is in a multi-worker run: only the chief writes files that outlive the run.

TensorFlow's recommendation (multi-worker Keras tutorial): every worker takes part in saving — reading mirrored and
sync-on-read variables is a collective — but only the chief writes to the real directory; the others write to a
temporary directory and delete it.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["check_same_batches", "check_same_start", "is_chief", "is_multi_worker"]


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """True for a strategy that spans several worker processes."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return False
    spec = resolver.cluster_spec().as_dict()
    return sum(len(tasks) for job, tasks in spec.items() if job in ("chief", "worker")) > 1


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the process that writes: the ``chief`` task, or worker 0 when there is no chief (or one process)."""
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)


def _name(chief: int, task: int) -> str:
    return "chief" if chief else f"worker {task}"


def _gather(strategy: tf.distribute.Strategy, values: list[int]) -> tuple[str, dict[str, list[int]]]:
    """This worker's name, and every worker's ``values`` by name (one all-gather; chief first)."""
    resolver = strategy.cluster_resolver
    me = [int(resolver.task_type == "chief"), int(resolver.task_id or 0)]
    rows = strategy.gather(strategy.run(lambda: tf.constant([me + values], tf.int64)), axis=0).numpy().tolist()
    return _name(*me), {_name(*row[:2]): row[2:] for row in sorted(rows, key=lambda row: (-row[0], row[1]))}


def _count(n: int) -> str:
    return "an unknown number of" if n < 0 else str(n)


SAME_DATA = (
    "the same data (validation data included): each is given the whole data set, and the strategy gives each its "
    "part of every batch. Nothing was run."
)


def check_same_start(
    strategy: tf.distribute.Strategy,
    *,
    step: int | None,
    epochs: int,
    steps: int | None,
    validation: int | None,
    checkpoint_dir: str | None,
) -> None:
    """Under multi-worker, every worker's ``fit`` must start from the same checkpoint and run the same steps: one
    all-gather of what each restored (``step``; None: nothing), the epoch it trains to, its steps per epoch and its
    validation batches (None: unknown; 0: no validation). A worker that found other checkpoints (``checkpoint_dir``
    not one directory every worker sees, or not passed by all) or runs more steps would train other weights in
    lockstep or wait in a collective the others never join (measured: a hang, or TensorFlow's "tasks are unhealthy"
    error after the others ended); this raises on every worker instead, before any update, naming what each has."""
    plan = [-1 if n is None else int(n) for n in (step, epochs, steps, validation)]
    mine, workers = _gather(strategy, plan)
    if len({at for at, *_ in workers.values()}) > 1:
        said = "; ".join(
            f"{name}: {'nothing (a fresh start)' if at < 0 else f'the checkpoint of step {at}'}"
            for name, (at, *_) in workers.items()
        )
        raise RuntimeError(
            f"The workers would resume from different checkpoints ({said}); this process ({mine}) read "
            f"checkpoint_dir={checkpoint_dir!r}. Every worker must pass the same checkpoint_dir, one directory on a "
            "filesystem all of them see (the chief writes it, every worker reads it); nothing was trained."
        )
    if len({tuple(plan[1:]) for plan in workers.values()}) > 1:
        said = "; ".join(
            f"{name}: to epoch {epochs}, {_count(steps)} steps an epoch"
            + (f", {_count(validation)} validation batches" if validation else "")
            for name, (_, epochs, steps, validation) in workers.items()
        )
        raise RuntimeError(
            f"The workers would train different numbers of steps ({said}; this process is the {mine}). Every worker "
            f"must call fit with the same epochs and steps_per_epoch and {SAME_DATA}"
        )


def check_same_batches(strategy: tf.distribute.Strategy, what: str, batches: int | None) -> None:
    """Under multi-worker, an evaluation (validation included) or a prediction must run the same number of batches
    on every worker (None: unknown): one all-gather. Otherwise (measured) an evaluation hung in a collective, and a
    prediction returned a mix of rows of the workers' batches (16 rows on one worker, 32 on the other: the second got
    24 rows, mostly the first worker's)."""
    mine, workers = _gather(strategy, [-1 if batches is None else int(batches)])
    if len({n for (n,) in workers.values()}) > 1:
        said = "; ".join(f"{name}: {_count(n)}" for name, (n,) in workers.items())
        raise RuntimeError(
            f"The workers would {what} different numbers of batches ({said}; this process is the {mine}). Every "
            f"worker must be given {SAME_DATA}"
        )
