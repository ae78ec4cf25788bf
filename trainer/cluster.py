"""Which process this is in a multi-worker run: only the chief writes files that outlive the run.

TensorFlow's recommendation (multi-worker Keras tutorial): every worker takes part in saving — reading mirrored and
sync-on-read variables is a collective — but only the chief writes to the real directory; the others write to a
temporary directory and delete it.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["is_chief", "is_multi_worker"]


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
