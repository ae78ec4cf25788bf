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


def _name(task: tuple[int, int]) -> str:
    return "chief" if task[0] else f"worker {task[1]}"


def check_same_start(strategy: tf.distribute.Strategy, step: int | None, checkpoint_dir: str | None) -> None:
    """Under multi-worker, every worker must start ``fit`` from the same checkpoint: one all-gather of what each
    restored (``step``; None: nothing). A worker that found other checkpoints (``checkpoint_dir`` not one directory
    every worker sees, or not passed by all) would train other weights in lockstep, or wait in a collective the
    others never join; this raises on every worker instead, before any update, naming what each one found."""
    resolver = strategy.cluster_resolver
    me = [int(resolver.task_type == "chief"), int(resolver.task_id or 0), -1 if step is None else int(step)]
    found = strategy.gather(strategy.run(lambda: tf.constant([me], tf.int64)), axis=0).numpy().tolist()
    starts = {(chief, task): at for chief, task, at in found}
    if len(set(starts.values())) == 1:
        return
    said = "; ".join(
        f"{_name(task)}: {'nothing (a fresh start)' if at < 0 else f'the checkpoint of step {at}'}"
        for task, at in sorted(starts.items(), key=lambda item: (-item[0][0], item[0][1]))
    )
    mine = _name((me[0], me[1]))
    raise RuntimeError(
        f"The workers would resume from different checkpoints ({said}); this process ({mine}) read "
        f"checkpoint_dir={checkpoint_dir!r}. Every worker must pass the same checkpoint_dir, one directory on a "
        "filesystem all of them see (the chief writes it, every worker reads it); nothing was trained."
    )
