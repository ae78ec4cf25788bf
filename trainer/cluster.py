"""Which process this is in a multi-worker run: only the chief writes files that outlive the run.

TensorFlow's recommendation (multi-worker Keras tutorial): every worker takes part in saving — reading mirrored and
sync-on-read variables is a collective — but only the chief writes to the real directory; the others write to a
temporary directory and delete it.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["check_same_start", "is_chief", "is_multi_worker"]


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


def check_same_start(
    strategy: tf.distribute.Strategy, *, step: int | None, epochs: int, steps: int | None, checkpoint_dir: str | None
) -> None:
    """Under multi-worker, every worker's ``fit`` must start from the same checkpoint and run the same steps: one
    all-gather of what each restored (``step``; None: nothing), the epoch it trains to and its steps per epoch
    (None: unknown). A worker that found other checkpoints (``checkpoint_dir`` not one directory every worker sees,
    or not passed by all) or runs more steps would train other weights in lockstep or wait in a collective the
    others never join (measured: a hang, or TensorFlow's "tasks are unhealthy" error after the others ended); this
    raises on every worker instead, before any update, naming what each one has."""
    resolver = strategy.cluster_resolver
    me = [int(resolver.task_type == "chief"), int(resolver.task_id or 0)]
    plan = [-1 if step is None else int(step), int(epochs), -1 if steps is None else int(steps)]
    found = strategy.gather(strategy.run(lambda: tf.constant([me + plan], tf.int64)), axis=0).numpy().tolist()
    workers = {_name(*row[:2]): row[2:] for row in sorted(found, key=lambda row: (-row[0], row[1]))}
    mine = _name(*me)
    if len({at for at, _, _ in workers.values()}) > 1:
        said = "; ".join(
            f"{name}: {'nothing (a fresh start)' if at < 0 else f'the checkpoint of step {at}'}"
            for name, (at, _, _) in workers.items()
        )
        raise RuntimeError(
            f"The workers would resume from different checkpoints ({said}); this process ({mine}) read "
            f"checkpoint_dir={checkpoint_dir!r}. Every worker must pass the same checkpoint_dir, one directory on a "
            "filesystem all of them see (the chief writes it, every worker reads it); nothing was trained."
        )
    if len({(epochs, steps) for _, epochs, steps in workers.values()}) > 1:
        said = "; ".join(
            f"{name}: to epoch {epochs}, {'an unknown number of' if steps < 0 else steps} steps an epoch"
            for name, (_, epochs, steps) in workers.items()
        )
        raise RuntimeError(
            f"The workers would train different numbers of steps ({said}; this process is the {mine}). Every worker "
            "must call fit with the same epochs and steps_per_epoch and the same data: each is given the whole data "
            "set, and the strategy gives each its part of every batch. Nothing was trained."
        )
