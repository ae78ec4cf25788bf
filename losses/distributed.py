"""Batch-global counts for losses that normalise by a count over the whole batch (SSD: positive anchors).

Under ``tf.distribute`` each replica sees a share of the batch; a loss normalised by a per-replica count gives a
different update than one device on the same global batch. :func:`global_sum` sums a count over all replicas in a
replica context (one all-reduce) and is the identity outside one, so the same loss code is exact everywhere.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["global_sum"]


def global_sum(value: tf.Tensor) -> tf.Tensor:
    """``value`` summed over all replicas in sync (the identity on one device or outside a replica context)."""
    value = tf.convert_to_tensor(value)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)
