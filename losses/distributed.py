"""Batch-global normalisation under ``tf.distribute``: the one convention that makes a distributed step exact.

Each replica sees ``b`` of the global batch's ``B`` examples (the last batch may split unevenly; a replica may get
none). Its loss is a mean over its own share, the step differentiates ``loss × b/B`` and gradients are summed over
replicas: a per-example mean then equals one device's on the same global batch. A loss normalised by a count over
the whole batch (SSD: positive anchors) divides its local sum by ``max(global count, 1) × b/B`` —
:func:`global_normalizer` — so that after the step's ``× b/B`` and the sum it is ``Σ local sums / global count``.

All three helpers are the identity outside a replica context and on one replica, so loss code is the same everywhere.

Keras' own loss objects follow ``Model.fit``'s convention instead: a mean-reduced ``keras.losses.Loss`` divides its
value by the strategy's replica count (``scale_loss_for_distribution`` in keras/src/losses/loss.py). Code that
uses this module's convention calls them inside :func:`plain_keras_losses`, where they return the plain mean.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import tensorflow as tf

try:  # where Keras 3 keeps the replica scaling of its loss objects
    from keras.src.losses import loss as _keras_loss
except ImportError:  # pragma: no cover - a Keras without it does not scale
    _keras_loss = None

__all__ = ["global_normalizer", "global_sum", "plain_keras_losses", "replica_share"]

_lock = threading.Lock()


def _context() -> tf.distribute.ReplicaContext | None:
    context = tf.distribute.get_replica_context()
    return None if context is None or context.num_replicas_in_sync == 1 else context


def global_sum(value: tf.Tensor) -> tf.Tensor:
    """``value`` summed over all replicas in sync (the identity on one device or outside a replica context)."""
    value = tf.convert_to_tensor(value)
    context = _context()
    return value if context is None else context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def replica_share(batch_size: tf.Tensor) -> tf.Tensor:
    """``b / B``: this replica's examples over the global batch's (1.0 on one device)."""
    batch_size = tf.cast(batch_size, tf.float32)
    if _context() is None:
        return tf.ones_like(batch_size)
    return tf.math.divide_no_nan(batch_size, global_sum(batch_size))


def global_normalizer(count: tf.Tensor, batch_size: tf.Tensor) -> tf.Tensor:
    """What a loss normalised by a batch-global count divides its local sum by: ``max(Σ count, 1) × b/B``.

    Example (a loss averaged over the positive anchors of the whole global batch)::

        local = tf.reduce_sum(per_anchor * positive)
        divisor = global_normalizer(tf.reduce_sum(positive), tf.shape(positive)[0])
        return tf.math.divide_no_nan(local, divisor)  # 0 on a replica that got no examples

    On one device this is ``local / max(count, 1)``.
    """
    count = tf.convert_to_tensor(count)
    count = count if count.dtype.is_floating else tf.cast(count, tf.float32)
    normaliser = tf.maximum(global_sum(count), tf.ones_like(count))
    return normaliser * tf.cast(replica_share(batch_size), count.dtype)


_plain = threading.local()  # .depth: how many plain_keras_losses contexts this thread is in


_installed: list = []  # [the dispatcher], once it has replaced Keras' function


def _install() -> None:
    """Replace Keras' scaling function, once, by one that is the identity in this module's context and Keras' own
    elsewhere. Swapping the function in and out per call raced: MirroredStrategy traces each replica in its own
    thread, and the last thread out could put the identity back for good (``Model.fit`` later in the process then
    trained on N x its loss)."""
    if _installed and _keras_loss.scale_loss_for_distribution is _installed[0]:
        return
    keras_scaling = _keras_loss.scale_loss_for_distribution

    def scale_loss_for_distribution(value: tf.Tensor) -> tf.Tensor:
        return value if getattr(_plain, "depth", 0) else keras_scaling(value)

    _installed[:] = [scale_loss_for_distribution]
    _keras_loss.scale_loss_for_distribution = scale_loss_for_distribution


@contextlib.contextmanager
def plain_keras_losses() -> Iterator[None]:
    """Within this context (while a step is traced or run eagerly, in this thread), ``keras.losses.Loss`` objects
    return the plain mean over this replica's examples, not that mean divided by the strategy's replica count: user
    losses written with Keras loss objects, and a layer's ``add_loss`` of one, then follow this module's ``b/B``
    convention. Other threads, and code outside the context, get Keras' scaling."""
    if getattr(_keras_loss, "scale_loss_for_distribution", None) is None:
        yield
        return
    with _lock:
        _install()
    _plain.depth = getattr(_plain, "depth", 0) + 1
    try:
        yield
    finally:
        _plain.depth -= 1
