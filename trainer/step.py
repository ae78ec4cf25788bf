"""The compiled blocks and their in-graph loop.

``Steps`` builds the training and evaluation blocks once and caches them. Each runs up to ``num_steps`` steps in
one ``tf.while_loop``; ``num_steps`` is a tensor, so any block length reuses one trace. A training step is one
optimizer update: one batch, or ``gradient_accumulation_steps`` micro-batches. A block stops early when the data
ends or a loss component is non-finite (``nan_policy="raise"``; with ``"skip"`` the bad step's update is skipped and
counted, and the block stops only after more than ``max_consecutive_skips`` skips in a row). It returns one vector
with everything the host needs, read once per block. The mathematics of a step is in ``trainer/update.py``.

Two training loops: the default one is software-pipelined (each iteration applies the step before it, so the
loop's predicate is the guard against a non-finite step), the other runs each step whole with its update in a
``tf.cond`` (``nan_policy="skip"``, gradient accumulation, several replicas, XLA).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from trainer.blocks import flat_call
from trainer.cluster import is_multi_worker
from trainer.errors import OWN_ERRORS
from trainer.update import StepMath

__all__ = ["BlockInfo", "BlockResult", "Steps", "own_function"]

BlockResult = tf.Tensor  # one float32 vector; Steps.unpack splits it


def own_function(fn: Callable, **kwargs: Any) -> Callable:
    """``tf.function(fn)`` without autograph (tapeloop's loops are explicit ``tf.while_loop``/``tf.cond``; a user's
    loss is converted alone, ``structure.graph_ready``), counted apart by TensorFlow's retracing detector.

    The detector keys a function by its code object, so the functions every Trainer makes (each traced once) added up
    across Trainers: a sweep warned "5 out of the last 5 calls ... triggered tf.function retracing" from the fifth
    Trainer on. A ``functools.partial`` has no code object: the detector keys it by the object, one per function.
    """
    return tf.function(functools.partial(fn), autograph=False, **kwargs)


def _zeros_like(gradient: tf.Tensor | tf.IndexedSlices, variable: tf.Variable) -> Callable[[], Any]:
    """A maker of zeros like ``variable``'s ``gradient``, usable in another graph: a tensor, or an ``IndexedSlices``
    of no rows (an ``Embedding``'s gradient)."""
    shape = variable.shape.as_list()
    if isinstance(gradient, tf.IndexedSlices):
        dtypes = gradient.values.dtype, gradient.indices.dtype, gradient.dense_shape.dtype
        return lambda: tf.IndexedSlices(
            tf.zeros([0, *shape[1:]], dtypes[0]), tf.zeros([0], dtypes[1]), tf.constant(shape, dtypes[2])
        )
    return lambda: tf.zeros(shape, gradient.dtype)


def _no_rows_like(tensor: tf.Tensor) -> Callable[[], tf.Tensor]:
    """A maker of zeros shaped like ``tensor``, an unknown dimension (a batch) 0."""
    shape, dtype = [0 if d is None else d for d in tensor.shape.as_list()], tensor.dtype
    return lambda: tf.zeros(shape, dtype)


@dataclass
class BlockInfo:
    """What the host learns from one block."""

    ran: int  # steps run (optimizer updates, skipped ones included)
    more: bool  # the data did not end
    skipped: int  # (skip policy) non-finite steps skipped this epoch
    consecutive: int  # (skip policy) non-finite steps in a row, up to the block's end
    stopped: bool  # a stop was requested (on any worker): the block ran no step
    finite: np.ndarray  # per logged loss key: finite at the last step
    values: np.ndarray  # per logged loss key: value at the last step
    results: np.ndarray  # the trackers' results, in ``keys`` order
    keys: list[str]

    @functools.cached_property
    def logs(self) -> dict[str, float]:
        """The trackers' results by key (made when read: at one step per call most blocks' are not)."""
        return dict(zip(self.keys, self.results.tolist()))


def _own_error(err: BaseException) -> BaseException:
    """The tapeloop error inside an error that tracing wrapped (autograph turns errors raised in ``strategy.run``
    into ``StagingError``): the user sees our message and type, not a TensorFlow trace."""
    seen = err
    while seen is not None:
        if isinstance(seen, OWN_ERRORS):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


class Steps:
    """Compiled train/eval blocks over a :class:`~trainer.update.StepMath`.

    Args:
        math: the step's mathematics (replicas, reductions, the update; its trackers' results end each block's
            vector).
        loss_weights: returns the loss-weight vector (read once per block).
        jit_compile: compile each (micro-)step with XLA.
        run_eagerly: run everything eagerly (for debugging; slow).
        nan_policy: ``"raise"`` (stop at a non-finite step) or ``"skip"`` (skip its update, count it).
        max_consecutive_skips: (skip) stop after more than this many non-finite steps in a row.
        accumulation: micro-batches per update (``gradient_accumulation_steps``).
    """

    def __init__(
        self,
        math: StepMath,
        *,
        loss_weights: Callable[[], tf.Tensor],
        jit_compile: bool,
        run_eagerly: bool,
        nan_policy: str = "raise",
        max_consecutive_skips: int = 10,
        accumulation: int = 1,
    ) -> None:
        self.math = math
        self.trackers = math.trackers
        self.strategy = strategy = math.strategy
        self.nan_policy = nan_policy
        self.max_consecutive_skips = max_consecutive_skips
        self._loss_weights = loss_weights
        self.loss_keys = math.loss_keys  # order of the finite flags and values a block returns
        self.traces: Counter[str] = Counter()  # incremented only while tracing: a test counts retraces
        self._run_eagerly = run_eagerly
        self._skip = nan_policy == "skip"
        self._max_skips = max_consecutive_skips
        self._accumulation = accumulation
        self._multi_worker = is_multi_worker(strategy)
        # Training blocks run the software-pipelined loop (``_pipelined``) where a step is one batch on one replica
        # and a non-finite step ends the block; otherwise each update sits in a tf.cond (XLA compiles it in).
        one = strategy.num_replicas_in_sync == 1
        self._pipeline = one and not (self._skip or accumulation > 1 or jit_compile or run_eagerly)
        # Skipped-step counters (skip policy): this epoch's total and the current run of consecutive skips.
        with strategy.scope():
            self.skipped = tf.Variable(0, trainable=False, name="skipped_steps")
            self.consecutive = tf.Variable(0, trainable=False, name="consecutive_skips")

        def compiled(fn: Callable, **kwargs: Any) -> Callable:
            return fn if run_eagerly else own_function(fn, **kwargs)

        # XLA compiles a whole step (or micro-step) where it can: the iterator stays outside it.
        jit = {"jit_compile": True} if jit_compile else None
        self._train = compiled(math.train, **jit) if jit else math.train
        self._eval = compiled(math.evaluate, **jit) if jit else math.evaluate
        self._micro = compiled(math.micro, **jit) if jit else math.micro

        # Variants per mode (each traced only when a run uses it): "exact" when the host knows the data holds the
        # batches (known cardinality; plain next(), ~15 % faster on small models), "open" otherwise
        # (get_next_as_optional, stops at the end); "single" for steps_per_execution=1, a block of at most one step
        # with no tf.while_loop (its loop variables' control-flow ops cost ~10 % of a small step).
        def block(mode: str, exact: bool, single: bool) -> Callable:
            return compiled(lambda iterator, n, stop: self._block(mode, iterator, n, stop, exact, single))

        self.blocks = {
            (mode, exact, single): block(mode, exact, single)
            for mode in ("train", "eval")
            for exact in (True, False)
            for single in (False, True)
        }
        self._concrete: dict[tuple, Callable] = {}  # the blocks' concrete functions, by variant and iterator kind

    def block_for(self, mode: str, exact: bool, iterator: Any, count: tf.Tensor, *, single: bool = False) -> Callable:
        """The block to call for one epoch over ``iterator``: its concrete function when compiled, called with flat
        tensors (:class:`~trainer.blocks.FlatCall`). ``single``: the variant whose calls run at most one step
        (``num_steps`` 0 or 1).

        Calling the concrete function skips ``tf.function``'s per-call argument matching (about 0.14 ms a call on
        this machine, measured), and the flat call the concrete function's own binding of its arguments (~0.4 ms):
        together the main Python cost at ``steps_per_execution=1``. The match runs once here.
        """
        block = self.blocks[mode, exact, single]
        if self._run_eagerly:
            return block
        # The iterator's kind and element structure (names, shapes, dtypes): another is matched (and traced) anew.
        key = (mode, exact, single, type(iterator), repr(iterator.element_spec))
        if key not in self._concrete:  # the match itself costs ~0.4 ms: once, not at every epoch
            try:
                self._concrete[key] = block.get_concrete_function(iterator, count, count)
            except Exception as err:
                raise _own_error(err) from None
        return flat_call(self._concrete[key], iterator, count, count)

    # -- the in-graph loop ----------------------------------------------------------------------------------------

    def _one_step(self, mode: str, iterator: Any, exact: bool, weights: tf.Tensor, state: tuple) -> tuple:
        """Pull what one step needs and run it: returns (stepped, finite flags, values), or the old state."""
        finite, values = state
        if mode == "train" and self._accumulation > 1:

            def pull():
                if exact:
                    return tf.constant(True), lambda: next(iterator)
                optional = iterator.get_next_as_optional()
                return optional.has_value(), optional.get_value

            return self.math.accumulate(pull, self._accumulation, self._micro, weights)
        step = self._train if mode == "train" else self._eval
        if exact:
            return (tf.constant(True), *step(next(iterator), weights))
        optional = iterator.get_next_as_optional()
        return tf.cond(
            optional.has_value(),
            lambda: (tf.constant(True), *step(optional.get_value(), weights)),
            lambda: (tf.constant(False), finite, values),
        )

    def _block(
        self, mode: str, iterator: Any, num_steps: tf.Tensor, stop: tf.Tensor, exact: bool, single: bool = False
    ) -> BlockResult:
        """Run up to ``num_steps`` steps; stop early at the end of the data or at a non-finite loss. ``single``:
        ``num_steps`` is at most 1, and the loop is its one iteration, without a ``tf.while_loop``.

        ``stop`` (0/1) is this process's request to stop (a signal arrived); it is summed over all replicas first,
        so that every worker of a multi-worker run stops at the same block and none waits in a collective.

        Returns ``[steps run, data left, skipped, consecutive skips, stopped, finite flags..., loss values of the
        last step..., tracker results...]``.
        """
        self.traces[mode] += 1
        k = len(self.loss_keys)
        if self._multi_worker:
            stop = self.strategy.reduce(
                tf.distribute.ReduceOp.SUM, self.strategy.run(lambda: tf.identity(stop)), axis=None
            )
        stopped = stop > 0
        num_steps = tf.where(stopped, 0, num_steps)
        weights = self._loss_weights()  # they change only between blocks (from the host): read once per block

        if mode == "train" and self._pipeline:
            ran, more, values = self._pipelined(iterator, num_steps, exact, weights, single)
            skipped, consecutive = self.skipped.read_value(), self.consecutive.read_value()  # 0 under "raise"
            return self._result(mode, ran, more, skipped, consecutive, stopped, tf.math.is_finite(values), values)
        skips = self._skip and mode == "train"
        # Only what can change is carried (each loop variable costs a few executor ops per step): whether data is
        # left only when the host does not know it is, the skip counters only under nan_policy="skip".
        state = {"i": tf.constant(0), "finite": tf.ones([k], tf.bool), "values": tf.zeros([k], tf.float32)}
        if not exact:
            state["more"] = tf.constant(True)
        if skips:
            state["skipped"], state["consecutive"] = self.skipped.read_value(), self.consecutive.read_value()

        def cond(s):
            go = s["i"] < num_steps if exact else tf.logical_and(s["i"] < num_steps, s["more"])
            return tf.logical_and(go, s["consecutive"] <= self._max_skips if skips else tf.reduce_all(s["finite"]))

        def body(s):
            stepped, ok, last = self._one_step(mode, iterator, exact, weights, (s["finite"], s["values"]))
            ran = tf.cast(stepped, tf.int32)
            new = {"finite": ok, "values": last}
            if not exact:
                new["more"] = stepped
            if skips:  # a skipped step still consumed its batches: it counts as a step
                bad = ran * (1 - tf.cast(tf.reduce_all(ok), tf.int32))
                new["consecutive"] = tf.where(stepped, (s["consecutive"] + 1) * bad, s["consecutive"])
                new["skipped"] = s["skipped"] + bad
                new["i"] = s["i"] + ran
            else:
                new["i"] = s["i"] + ran * tf.cast(tf.reduce_all(ok), tf.int32)
            return (new,)

        if single:  # the loop's one iteration: the same operations, without the loop's
            (end,) = tf.cond(cond(state), lambda: body(state), lambda: (state,))
        else:
            (end,) = tf.while_loop(cond, body, (state,))
        ran, finite, values = end["i"], end["finite"], end["values"]
        more = end.get("more", tf.constant(True))
        if skips:
            skipped, consecutive = end["skipped"], end["consecutive"]
            self.skipped.assign(skipped)
            self.consecutive.assign(consecutive)
        else:
            skipped, consecutive = self.skipped.read_value(), self.consecutive.read_value()
        return self._result(mode, ran, more, skipped, consecutive, stopped, finite, values)

    def _result(self, mode: str, ran, more, skipped, consecutive, stopped, finite, values) -> BlockResult:
        """One float vector, so that the host reads everything with a single copy (see ``unpack``)."""
        logs = self.trackers[mode].result()
        head = tf.cast(
            tf.stack([ran, tf.cast(more, tf.int32), skipped, consecutive, tf.cast(stopped, tf.int32)]), tf.float32
        )
        return tf.concat([head, tf.cast(finite, tf.float32), values, tf.stack(list(logs.values()))], axis=0)

    def _pipelined(self, iterator: Any, num_steps: tf.Tensor, exact: bool, weights: tf.Tensor, single: bool) -> tuple:
        """The training loop, software-pipelined: each iteration applies the step before it, then runs the next
        forward/backward; the loop's own predicate ends the block at a non-finite step, before its update.

        A ``tf.cond`` around the update (the guard that a non-finite step changes no weight) costs a ``Switch`` for
        every tensor the update reads; here no update sits in one but the block's last, applied after the loop. The
        step's tracked means are added with its update (added in the forward pass, they cost twice as much here).
        Measured against the guarded loop, paired in one process: docs/performance-log.md. The operations run in the
        same order as one step per call, so every number is the same whatever the block length.

        Carried from one iteration to the next: the step's values (its finite flags are theirs), tracked means and
        example count, gradients and, with balancing, its components' gradients.

        ``single`` (``num_steps`` <= 1): the step produced before the loop is the block's only one, so the loop,
        whose iterations each apply a step and produce the next, would run none: it is left out.

        Returns (steps applied, data left, values of the last step run).
        """
        math, tracker = self.math, self.trackers["train"]
        traced: dict[str, Any] = {}  # filled when the step is first traced: its gradients' layout, for `nothing`

        def step(batch: Any, weights: tf.Tensor) -> tuple:
            micro = math.micro(batch, weights, count=False, defer=True)
            connected = [j for j, g in enumerate(micro.grads) if g is not None]
            if "zeros" not in traced:
                traced["connected"] = [g is not None for g in micro.grads]
                traced["zeros"] = (  # a factored kernel's entries have a batch dimension: zeros of no rows
                    [_zeros_like(micro.grads[j], math.variables[j]) for j in connected],
                    tf.nest.map_structure(_no_rows_like, micro.components),
                )
            means, examples = micro.tracked
            grads = [micro.grads[j] for j in connected]
            return tf.constant(True), (micro.values, means, tf.cast(examples, tf.float32), grads, micro.components)

        # A step runs before the loop and in its body, an update in the body and after the loop: each is one
        # nested function, traced once and called at both places (TensorFlow inlines the calls when it runs the
        # graph). Traced at each place, they were a fifth of a small VAE's first epoch.
        compiled_step = tf.function(step, autograph=False)

        def run(batch: Any) -> tuple:
            return compiled_step(batch, weights)

        def nothing() -> tuple:  # a block that runs no step: zeros shaped like a step's tensors
            if "zeros" not in traced:  # tf.cond traces its true branch (a step) first
                raise RuntimeError("tapeloop: a training step must be traced before the empty block")
            grads, components = tf.nest.map_structure(lambda make: make(), traced["zeros"])
            values, means = tf.zeros([len(self.loss_keys)]), tf.zeros([len(tracker.mean_keys)])
            return tf.constant(False), (values, means, tf.constant(0.0), grads, components)

        def produce(otherwise: Callable[[], tuple]) -> tuple:
            if exact:
                return run(next(iterator))
            optional = iterator.get_next_as_optional()
            return tf.cond(optional.has_value(), lambda: run(optional.get_value()), otherwise)

        def combine(pending: tuple) -> tuple:
            values, _, _, grads, components = pending
            given = iter(grads)
            return math.combine([next(given) if c else None for c in traced["connected"]], components, values)

        def finite(pending: tuple) -> tf.Tensor:
            return tf.reduce_all(tf.math.is_finite(pending[0]))

        def update(pending: tuple) -> tf.Tensor:
            """Apply a pending step (its aggregation, with balancing, in the same function: StepMath.combine)."""
            math.strategy.run(tracker.add_means, args=(pending[1], pending[2]))  # its variables are replicas'
            math.update(*combine(pending))
            return tf.constant(True)

        apply = tf.function(update, autograph=False)

        # As in the guarded loop, whether data is left is carried only when the host does not know it is.
        def cond(s):
            go = s["i"] < num_steps if exact else tf.logical_and(s["i"] < num_steps, s["more"])
            return tf.logical_and(go, finite(s["pending"]))

        def body(s):
            apply(s["pending"])
            has, pending = produce(lambda: (tf.constant(False), s["pending"]))
            new = {"i": s["i"] + tf.cast(has, tf.int32), "pending": pending}
            if not exact:
                new["more"] = has
            return (new,)

        has, pending = tf.cond(num_steps > 0, lambda: produce(nothing), nothing)
        state = {"i": tf.cast(has, tf.int32), "pending": pending}
        if not exact:
            state["more"] = has
        (end,) = (state,) if single else tf.while_loop(cond, body, (state,))
        more = end.get("more", tf.constant(True))
        # The last step ran (data was left): applied if finite; if not, it does not count.
        ran_last, ok = tf.logical_and(end["i"] > 0, more), finite(end["pending"])
        tf.cond(tf.logical_and(ran_last, ok), lambda: apply(end["pending"]), lambda: tf.constant(False))
        bad = tf.cast(tf.logical_and(ran_last, tf.logical_not(ok)), tf.int32)
        return end["i"] - bad, more, end["pending"][0]

    def unpack(self, mode: str, block: np.ndarray) -> BlockInfo:
        """Split a block's vector (see :class:`BlockInfo`)."""
        k = len(self.loss_keys)
        return BlockInfo(
            ran=int(block[0]),
            more=bool(block[1]),
            skipped=int(block[2]),
            consecutive=int(block[3]),
            stopped=bool(block[4]),
            finite=block[5 : 5 + k] > 0,
            values=block[5 + k : 5 + 2 * k],
            results=block[5 + 2 * k :],
            keys=self.trackers[mode].keys,
        )
