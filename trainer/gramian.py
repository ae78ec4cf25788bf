"""Dense kernels' share of the Gramian without their per-component gradients.

A Dense kernel ``W`` (``y = x @ W``, ``x`` of n rows) gets from component ``i`` the gradient ``xᵀ δ_i``, where
``δ_i`` is component i's gradient of ``y``. Its Gramian entry needs no such gradient:

    <xᵀ δ_a, xᵀ δ_b> = <δ_a, (x xᵀ) δ_b>

and the aggregated direction ``Σ_i w_i xᵀ δ_i = xᵀ (Σ_i w_i δ_i)`` is one matrix product. So each component's
backward pass stops at ``y`` (it skips the kernel's weight gradient, a third of a Dense layer's work), and the
Gramian costs n²·(d_in + m·d_out) instead of m·n·d_in·d_out: for a batch of 32 through 256 x 256 layers and m = 2,
an eighth. When n is large (big batches, sequences) the per-component gradients are cheaper: the cheaper form is
chosen from the shapes (at run time when n is unknown). TorchJD's "autogram" engine computes the Gramian the same
way, layer by layer.

:func:`dense_kernels` finds such kernels in the traced step: a shared variable read only by one 2-D ``MatMul`` in the
forward pass (a kernel with a regularizer, or a layer called twice, is read elsewhere and keeps the explicit
gradients). Eager execution has no graph to read: everything then keeps the explicit gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

__all__ = ["MIN_KERNEL", "PAIRWISE", "dense_kernels", "direction", "gramian", "graph_mark"]

PAIRWISE = 3  # up to this many components, G from the pairs' products: no stacking copies (measured faster)
# Smaller kernels keep the formed gradients: what the factored form saves there is less than its extra operations
# cost (measured, log_grad_norms on a 100-64-32 trunk: 1.41x a plain step factored, 1.19x formed).
MIN_KERNEL = 2**14
_PASS_THROUGH = ("Cast", "Identity")  # between a variable's read and its use (mixed precision casts the kernel)


def graph_mark() -> int | None:
    """The number of operations in the graph being traced (None when eager): the forward pass's ops follow it."""
    return len(tf.compat.v1.get_default_graph().get_operations()) if tf.inside_function() else None


def dense_kernels(mark: int | None, variables: Sequence[tf.Variable]) -> dict[int, tuple[tf.Tensor, tf.Tensor]]:
    """{index in ``variables``: (x, y)} for each variable of at least ``MIN_KERNEL`` elements that the ops traced
    since ``mark`` read only as the right-hand side of one 2-D ``y = x @ W`` (no transposes)."""
    if mark is None:
        return {}
    graph = tf.compat.v1.get_default_graph()
    handles = {graph.capture(v.handle).ref(): j for j, v in enumerate(variables)}
    uses: dict[int, list[tf.Operation]] = {}  # variable -> the ops its reads feed
    for op in graph.get_operations()[mark:]:
        if op.type != "ReadVariableOp" or op.inputs[0].ref() not in handles:
            continue
        found = uses.setdefault(handles[op.inputs[0].ref()], [])
        pending = list(op.outputs[0].consumers())
        while pending:
            consumer = pending.pop()
            if consumer.type in _PASS_THROUGH:
                pending.extend(consumer.outputs[0].consumers())
            else:
                found.append(consumer)
    kernels = {}
    for j, consumers in uses.items():
        if len(consumers) != 1 or consumers[0].type != "MatMul":
            continue
        op = consumers[0]
        x, w = op.inputs
        plain = not (op.get_attr("transpose_a") or op.get_attr("transpose_b"))
        if plain and x.shape.rank == 2 and _reads(w, handles, j) and variables[j].shape.num_elements() >= MIN_KERNEL:
            if x.shape[1] is None:  # e.g. after a reshape of unknown size: the kernel's shape says it
                x = tf.reshape(x, [-1, variables[j].shape[0]])
            kernels[j] = (x, op.outputs[0])
    return kernels


def _reads(w: tf.Tensor, handles: dict, j: int) -> bool:
    """``w`` is variable j's value (read, possibly cast): it is the MatMul's right-hand side, not its left."""
    while w.op.type in _PASS_THROUGH:
        w = w.op.inputs[0]
    return w.op.type == "ReadVariableOp" and handles.get(w.op.inputs[0].ref()) == j


def _kernel_cheaper(n: tf.Tensor | int, d_in: int, d_out: int, m: int) -> tf.Tensor | bool:
    """Multiply-adds: x xᵀ and its product with the δs against the m weight gradients and their products."""
    return n * n * (d_in + m * d_out) + m * m * n * d_out < m * n * d_in * d_out + m * m * d_in * d_out


def gramian(x: tf.Tensor, deltas: Sequence[tf.Tensor]) -> tf.Tensor:
    """The (m, m) Gramian of the m kernel gradients ``xᵀ δ_i`` (float32), by the cheaper form."""
    x = tf.cast(x, tf.float32)
    deltas = [tf.cast(d, tf.float32) for d in deltas]
    m, (d_in, d_out) = len(deltas), (x.shape[1], deltas[0].shape[1])
    n = x.shape[0]
    if n is not None:
        return _by_kernel(x, deltas) if _kernel_cheaper(n, d_in, d_out, m) else _by_gradients(x, deltas)
    n = tf.cast(tf.shape(x)[0], tf.int64)
    return tf.cond(_kernel_cheaper(n, d_in, d_out, m), lambda: _by_kernel(x, deltas), lambda: _by_gradients(x, deltas))


def _by_kernel(x: tf.Tensor, deltas: list[tf.Tensor]) -> tf.Tensor:
    """G[a, b] = <δ_a, (x xᵀ) δ_b>: one product of x xᵀ with the δs side by side, then the pairs' (few
    components) or one matrix product of the stacked rows."""
    m, d_out = len(deltas), deltas[0].shape[1]
    mixed = tf.matmul(tf.matmul(x, x, transpose_b=True), tf.concat(deltas, axis=1))  # (n, m·d_out)
    if m <= PAIRWISE:
        parts = tf.split(mixed, m, axis=1)
        pairs = {(a, b): tf.reduce_sum(deltas[a] * parts[b]) for a in range(m) for b in range(a, m)}
        return tf.stack([tf.stack([pairs[min(a, b), max(a, b)] for b in range(m)]) for a in range(m)])
    by_key = tf.reshape(tf.transpose(tf.reshape(mixed, [-1, m, d_out]), [1, 0, 2]), [m, -1])
    return tf.matmul(tf.reshape(tf.stack(deltas), [m, -1]), by_key, transpose_b=True)


def _by_gradients(x: tf.Tensor, deltas: list[tf.Tensor]) -> tf.Tensor:
    """G[a, b] = <xᵀ δ_a, xᵀ δ_b>, the m weight gradients formed."""
    rows = tf.stack([tf.reshape(tf.matmul(x, d, transpose_a=True), [-1]) for d in deltas])
    return tf.matmul(rows, rows, transpose_b=True)


def direction(x: tf.Tensor, deltas: Sequence[tf.Tensor], weights: tf.Tensor | None, dtype: tf.DType) -> tf.Tensor:
    """The kernel's aggregated gradient ``xᵀ Σ_i w_i δ_i`` (weights None: the plain sum), in ``dtype``."""
    deltas = [tf.cast(d, tf.float32) for d in deltas]
    summed = tf.add_n(deltas) if weights is None else tf.add_n([w * d for w, d in zip(tf.unstack(weights), deltas)])
    return tf.cast(tf.matmul(tf.cast(x, tf.float32), summed, transpose_a=True), dtype)
