"""Multi-task balancing inside the step: per-component gradients of the shared variables, their Gramian, the
aggregated direction and the statistics logged per step.

Without an aggregator (``Sum``), a loss weighting that needs no gradient (DWA) and ``log_grad_norms``, none of this
runs: the step differentiates the weighted total once. Otherwise each replica differentiates every weighted
component separately (one persistent tape); a variable that more than one component uses is *shared* and keeps the
m gradients, any other variable gets the sum (in practice: its one component's gradient). ``model.losses`` is an
ordinary term added to every variable's gradient. The m gradients are summed over replicas and over the
micro-batches of an accumulated step *before* :meth:`Balance.combine` aggregates them: the aggregators are not
linear, so R replicas or k micro-batches give the one-device, one-batch direction.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import Any

import keras
import tensorflow as tf

from losses.aggregators import Aggregator, Sum
from losses.weighting import LossWeighting
from trainer.gramian import PAIRWISE, dense_kernels
from trainer.gramian import direction as factored_direction
from trainer.gramian import gramian as gramian_of
from trainer.objective import REGULARIZATION

__all__ = ["Balance", "EpochWeighting", "claim", "claim_learners", "make_balance"]


class Balance:
    """What the step needs to aggregate the components' gradients.

    Args:
        aggregator: the :class:`~losses.aggregators.Aggregator` (``Sum`` when a loss weighting is used).
        weighting: a :class:`~losses.weighting.LossWeighting` (GradNorm, DWA) or None.
        keys: the aggregated component keys (every weighted component but ``regularization``), in weight order.
        log_grad_norms: also log each component's gradient norm over the shared variables.
        seed: returns the step's seed (2 ints) for randomised aggregators (PCGrad).
        loss_scale: returns the optimizer's loss scale (1 without mixed precision).
        loss_scaled: the optimizer is a ``LossScaleOptimizer`` (statistics then skip the steps it skips).
        factorable: the components' gradients are neither summed over replicas nor over micro-batches, so a Dense
            kernel's may stay factored (``trainer/gramian.py``).
    """

    def __init__(
        self,
        aggregator: Aggregator,
        weighting: LossWeighting | None,
        keys: Sequence[str],
        *,
        log_grad_norms: bool,
        seed: Callable[[], tf.Tensor],
        loss_scale: Callable[[], tf.Tensor],
        loss_scaled: bool = False,
        factorable: bool = False,
    ) -> None:
        self.aggregator = aggregator
        self.weighting = weighting
        self.keys = list(keys)
        self.log_grad_norms = log_grad_norms
        self._seed = seed
        self._loss_scale = loss_scale
        self._loss_scaled = loss_scaled  # a LossScaleOptimizer: it skips steps whose gradients overflow
        self._aggregates = not isinstance(aggregator, Sum)
        needs = weighting is not None and weighting.needs_jacobian
        self.jacobian = self._aggregates or log_grad_norms or needs
        self._pairs = list(combinations(range(len(self.keys)), 2))
        self.shared: list[int] | None = None  # indices of the shared variables, known once traced
        self.factorable = factorable
        self.factored: list[int] = []  # positions in ``shared`` of the Dense kernels kept factored, once traced
        self._dtypes: list[tf.DType] = []  # their variables' dtypes

    def step_keys(self) -> list[str]:
        """The per-step statistics :meth:`combine` returns, in order (epoch means in the logs)."""
        keys = [f"grad_norm/{key}" for key in self.keys] if self.log_grad_norms else []
        keys += [f"agg_weight/{key}" for key in self.keys] if self._aggregates else []
        keys += [f"conflict/{self.keys[a]}|{self.keys[b]}" for a, b in self._pairs] if self.jacobian else []
        keys += [f"loss_weight/{key}" for key in self.keys] if self.weighting is not None else []
        return keys

    def factors(self, all_keys: Sequence[str]) -> tf.Tensor | None:
        """The loss weighting's factors for every component of ``all_keys`` (1 for regularization), or None."""
        if self.weighting is None:
            return None
        factors = tf.convert_to_tensor(self.weighting.factors)
        return tf.stack([factors[self.keys.index(k)] if k in self.keys else tf.constant(1.0) for k in all_keys])

    # -- on each replica ------------------------------------------------------------------------------------------

    def replica_gradients(
        self,
        tape: tf.GradientTape,
        terms: Sequence[tf.Tensor],
        extra: tf.Tensor | None,
        variables: list[tf.Variable],
        mark: int | None = None,
    ) -> tuple[list[tf.Tensor | None], list[list[tf.Tensor]]]:
        """(gradients of everything but the shared variables' components, the m components' shared gradients).

        ``terms`` are the m weighted (and loss-scaled) components, ``extra`` the scaled regularization term.
        The first list holds, per variable, the sum of the gradients that are not aggregated: for a shared
        variable only ``extra``'s, for any other the sum of every term's. ``mark``: where the forward pass's ops
        begin in the traced graph (``gramian.graph_mark``). A Dense kernel found there (when ``factorable``) is
        kept factored: its entry in each component's list is that component's gradient of the layer's ``x @ W``,
        and one more list holds the layers' ``x`` (positions ``factored``).
        """
        kernels = dense_kernels(mark, variables) if self.factorable else {}  # before any gradient op is traced
        per_key = None
        if self.shared is None:  # which variables are shared (the first trace; an unused gradient is pruned)
            per_key = [tape.gradient(term, variables) for term in terms]
            users = [sum(g[j] is not None for g in per_key) for j in range(len(variables))]
            shared = [j for j, n in enumerate(users) if n > 1]
            if not shared and not self._aggregates:  # norms (log_grad_norms, GradNorm) over every used variable
                shared = [j for j, n in enumerate(users) if n > 0]
            self.shared = shared  # none: each variable keeps its one component's gradient
        found = {slot: kernels[j] for slot, j in enumerate(self.shared) if j in kernels}
        self.factored, self._dtypes = sorted(found), [variables[self.shared[slot]].dtype for slot in sorted(found)]
        sources = list(variables)
        for slot, (_, y) in found.items():  # differentiate up to x @ W: the kernel's own gradient is not formed
            sources[self.shared[slot]] = y
        if per_key is None or found:
            per_key = [tape.gradient(term, sources) for term in terms]
        rest = tape.gradient(extra, variables) if extra is not None else [None] * len(variables)
        shared = set(self.shared)
        grads = []
        for j in range(len(variables)):
            parts = [rest[j]] + ([] if j in shared else [g[j] for g in per_key])
            parts = [p for p in parts if p is not None]
            grads.append(tf.add_n(parts) if parts else None)
        # An Embedding's gradient is an IndexedSlices: the Gramian and the direction need the dense rows.
        components = [[tf.zeros_like(sources[j]) if g[j] is None else tf.convert_to_tensor(g[j]) for j in self.shared]
                      for g in per_key]  # fmt: skip
        return grads, components + ([[found[slot][0] for slot in self.factored]] if found else [])

    # -- over all replicas (cross-replica context) ----------------------------------------------------------------

    def combine(
        self, grads: list[tf.Tensor | None], components: list[list[tf.Tensor]], values: tf.Tensor | None
    ) -> tuple[list[tf.Tensor | None], Callable[[Callable[[tf.Tensor], None]], None]]:
        """Aggregate the summed component gradients into ``grads``.

        ``values`` are the components' unweighted global means, in ``keys`` order (for GradNorm). Returns (the
        gradients, what to run when the update is applied: given the tracker's update, it records the step's
        statistics, and GradNorm learns).
        """
        stats = []
        m = len(self.keys)
        gramian, finite = None, tf.constant(True)
        factors = None if self.weighting is None else tf.convert_to_tensor(self.weighting.factors)
        if self.jacobian:
            # G from per-variable products in float32, solved in float64. The gradients carry the loss scale (mixed
            # precision): G is divided by its square. Factored Dense kernels add their share from x and the δs.
            components, inputs = components[:m], components[m] if self.factored else []
            factored = dict(zip(self.factored, zip(inputs, self._dtypes)))
            explicit = [[g for slot, g in enumerate(per_key) if slot not in factored] for per_key in components]
            rows = _stacked(explicit) if m > PAIRWISE else None
            parts = [_gramian(explicit, rows)]
            parts += [gramian_of(x, [per_key[slot] for per_key in components]) for slot, (x, _) in factored.items()]
            gramian = tf.cast(tf.add_n(parts), tf.float64)
            if self._loss_scaled:
                gramian /= tf.cast(self._loss_scale(), tf.float64) ** 2
            # Overflowed gradients (the loss scaler then skips the step): keep the solvers defined, track nothing.
            finite = tf.reduce_all(tf.math.is_finite(gramian))
            sums = [tf.reduce_sum(g) for g in grads if g is not None] if self._loss_scaled else []
            finite = finite & tf.math.is_finite(tf.add_n(sums)) if sums else finite
            gramian = tf.where(finite, gramian, tf.eye(m, dtype=tf.float64))
            grads = list(grads)
            weights = None
            if self._aggregates:
                seed = self._seed() if self.aggregator.random else None
                weights = tf.cast(self.aggregator.weights(gramian, seed), tf.float32)
            stacked = iter(rows or [])
            for slot, j in enumerate(self.shared):  # the direction: the weighted rows
                gradients = [per_key[slot] for per_key in components]
                if slot in factored:
                    direction = factored_direction(factored[slot][0], gradients, weights, factored[slot][1])
                else:
                    direction = _combine(gradients, weights, next(stacked, None))
                grads[j] = direction if grads[j] is None else grads[j] + direction
            if self.log_grad_norms:
                stats.append(tf.cast(tf.sqrt(tf.maximum(tf.linalg.diag_part(gramian), 0.0)), tf.float32))
            if weights is not None:
                stats.append(weights)
            conflicts = tf.gather_nd(gramian, self._pairs) < 0.0 if self._pairs else tf.zeros([0], tf.bool)
            stats.append(tf.cast(conflicts, tf.float32))
        if factors is not None:
            stats.append(factors)
        stats_vector = tf.concat(stats, axis=0) if stats else tf.zeros([0])

        def after_update(tracker_update: Callable[[tf.Tensor], None]) -> None:
            """Track the statistics and let GradNorm learn, unless the gradients overflowed (a step the loss
            scaler skips under mixed precision)."""

            def observe() -> tf.Tensor:
                tracker_update(stats_vector)
                if self.weighting is not None and self.weighting.needs_jacobian:
                    self.weighting.observe(gramian, values)
                return tf.constant(True)

            if self._loss_scaled:  # without a loss scaler, a finite loss means an applied step: no second cond
                tf.cond(finite, observe, lambda: tf.constant(False))
            else:
                observe()

        return grads, after_update


def _stacked(components: list[list[tf.Tensor]]) -> list[tf.Tensor]:
    """Per shared variable, the m components' gradients as an (m, size) matrix."""
    return [tf.reshape(tf.stack(per_variable), [len(components), -1]) for per_variable in zip(*components)]


def _gramian(components: list[list[tf.Tensor]], rows: list[tf.Tensor] | None) -> tf.Tensor:
    """G[a, b] = Σ over the shared variables of <g_a, g_b> (float32): one matrix product per variable from the
    stacked ``rows``, or (few components) the pairs' products, which skip the stacking copies."""
    m = len(components)
    if not components or not components[0]:
        return tf.zeros([m, m])
    if rows is not None:
        return tf.add_n([tf.matmul(r, r, transpose_b=True) for r in rows])
    pairs = {(a, b): tf.add_n([_dot(x, y, a == b) for x, y in zip(components[a], components[b])])
             for a in range(m) for b in range(a, m)}  # fmt: skip
    return tf.stack([tf.stack([pairs[min(a, b), max(a, b)] for b in range(m)]) for a in range(m)])


def _dot(x: tf.Tensor, y: tf.Tensor, same: bool) -> tf.Tensor:
    """<x, y>; a squared norm as ``2·l2_loss`` (one fused pass instead of a square and a sum: 2-4 % of an m = 2
    step, measured)."""
    return 2.0 * tf.nn.l2_loss(x) if same else tf.reduce_sum(x * y)


def _combine(gradients: list[tf.Tensor], weights: tf.Tensor | None, rows: tf.Tensor | None) -> tf.Tensor:
    """Σ_i weights_i · gradients_i (weights None: the plain sum), from the stacked ``rows`` when there are."""
    if rows is not None:
        summed = tf.reduce_sum(rows, axis=0) if weights is None else tf.linalg.matvec(rows, weights, transpose_a=True)
        return tf.reshape(summed, gradients[0].shape)
    if weights is None:
        return tf.add_n(gradients)
    return tf.add_n([w * g for w, g in zip(tf.unstack(weights), gradients)])


def make_balance(trainer: Any, keys: Sequence[str]) -> Balance | None:
    """The step's :class:`Balance` for a Trainer's ``aggregator``, ``loss_weighting`` and ``log_grad_norms`` and
    its objective's component ``keys`` (``regularization`` is not aggregated), or None when the plain weighted sum
    is all there is. Builds the weighting's state."""
    aggregator, weighting, log_grad_norms = trainer.aggregator, trainer.loss_weighting, trainer.log_grad_norms
    seed, optimizer = trainer.seed, trainer.optimizer
    keys = [key for key in keys if key != REGULARIZATION]
    if isinstance(aggregator, Sum) and weighting is None and not log_grad_norms:
        return None
    if weighting is not None and not hasattr(weighting, "factors"):
        weighting.build(keys)
    elif weighting is not None and list(weighting.keys) != keys:
        raise ValueError(
            f"This {type(weighting).__name__} weighs the components {list(weighting.keys)}, but this Trainer's "
            f"loss has {keys}: make a new one for it."
        )

    def step_seed() -> tf.Tensor:  # (Trainer seed, optimizer step): a resumed run draws the same orders
        return tf.stack([tf.constant(seed, tf.int64), tf.cast(optimizer.iterations, tf.int64)])

    def loss_scale() -> tf.Tensor:
        return optimizer.scale_loss(tf.constant(1.0))

    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    factorable = trainer.strategy.num_replicas_in_sync == 1 and trainer.gradient_accumulation_steps == 1
    return Balance(aggregator, weighting, keys, log_grad_norms=log_grad_norms, seed=step_seed, loss_scale=loss_scale,
                   loss_scaled=scaled, factorable=factorable)  # fmt: skip


def claim(owner: Any, model: Any, *, learned: bool, what: str) -> None:
    """Bind what learns alongside a model — a loss weighting (GradNorm, DWA), a loss with trainable variables
    (UncertaintyWeighting) — to that model. A new Trainer on the same model continues its state, as an optimizer
    object does; reused for another model (a sweep with one config) it would start where the last run ended.

    Args:
        owner: the object (a weak reference to it and to the model are kept).
        learned: it holds state from a training already (built weighting, existing trainable variables).
        what: how the error names it.

    Raises:
        ValueError: ``owner`` learned with another model.
    """
    try:
        bound = _MODELS.get(owner)
    except TypeError:  # not weakly referable (a builtin): no state of its own
        return
    if learned and bound is not None and bound() is not model:
        raise ValueError(
            f"{what} already holds what it learned training another model (it would start this run where that one "
            "ended): make a new one for each Trainer, inside the loop of a sweep."
        )
    if bound is None or bound() is not model:
        with contextlib.suppress(TypeError):  # a model that cannot be weakly referenced: nothing to compare later
            _MODELS[owner] = weakref.ref(model)


_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loss weighting or loss -> its model (weak)


def claim_learners(model: Any, weighting: LossWeighting | None, losses: Mapping[str | None, Any]) -> None:
    """:func:`claim` the loss weighting and every loss (by loss name) for ``model``."""
    if weighting is not None:
        claim(weighting, model, learned=hasattr(weighting, "factors"), what=f"This {type(weighting).__name__}")
    for name, fn in losses.items():
        label = f"The loss {'' if name is None else repr(name) + ' '}({type(fn).__name__}) owns trainable variables"
        claim(fn, model, learned=bool(getattr(fn, "trainable_variables", None)), what=label)


class EpochWeighting(keras.callbacks.Callback):
    """Hands each epoch's training logs to a loss weighting's ``end_epoch`` (DWA)."""

    def __init__(self, weighting: LossWeighting) -> None:
        super().__init__()
        self.weighting = weighting

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        self.weighting.end_epoch({k: v for k, v in (logs or {}).items() if not k.startswith("val_")})
