"""The Trainer facade: validates options, wires objective, metrics, trackers and compiled steps, runs the outer loops.

The outer (Python) loop does what happens between compiled blocks: read the trackers once per block, run callbacks,
stop. The inner loop lives in ``trainer/step.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainer.blocks import AUTO, BlockSizer, steps_to_boundary
from trainer.callbacks import CallbackList, History, callback_model
from trainer.checkpoints import Checkpointer
from trainer.cluster import is_multi_worker
from trainer.data import Data
from trainer.epochs import EpochRunner, FitLoop
from trainer.errors import DataError, NonFiniteLossError, names
from trainer.metrics import MetricSpec
from trainer.objective import Objective
from trainer.options import (
    NAN_POLICIES,
    accepts_training,
    check_flags,
    choice,
    make_optimizer,
    positive_int,
    resolve_steps_per_execution,
)
from trainer.predict import Predictor
from trainer.step import BlockInfo, Steps
from trainer.structure import as_output_dict, output_hint
from trainer.tracking import Tracker
from trainer.update import StepMath
from trainer.writers import ProgressWriter, WriterCallback

__all__ = ["Trainer"]

HALF = (tf.float16, tf.bfloat16)
MULTI_WORKER_BLOCK = 16  # what steps_per_execution="auto" means across several workers


class Trainer:
    """Trains a model whose losses see every output and every target, logging every named loss component.

    Args:
        model: a ``keras.Model``, ``tf.Module`` or callable ``inputs -> outputs``. A dict is used as is; a
            list/tuple is keyed by ``model.output_names``; a single tensor is keyed ``"output"``.
        optimizer: a Keras optimizer or its name. Pass ``clipnorm``/``global_clipnorm``/``weight_decay`` there.
        loss: one loss callable ``loss(outputs, targets) -> scalar | {name: scalar}``, or a dict ``{name: loss}``;
            in the dict a ``str`` or ``keras.losses.Loss`` is a Keras per-output loss on the output of that name.
        loss_weights: ``{key: float}``, key a loss name or a full component key (see ``loss_weights`` property).
        metrics: ``{output: [str | keras.metrics.Metric]}`` and/or ``{name: callable(outputs, targets)}``.
        steps_per_execution: training steps per compiled call (an in-graph loop), or ``"auto"`` (the default):
            grown at run time until one call takes ~50 ms (see ``trainer/blocks.py``); results are identical.
        jit_compile: compile the step with XLA (slower on CPU; see PITFALLS.md).
        strategy: a ``tf.distribute.Strategy``; None is the default strategy. Create the model in its scope.
        run_eagerly: run the step eagerly, for debugging with print/pdb.
        seed: base seed for shuffling numpy input (default: drawn from NumPy's global generator).
        nan_policy: ``"raise"`` (default): a non-finite loss component stops training with an error naming it and
            the step, that step's update not applied. ``"skip"``: the step's update is skipped and counted
            (``skipped_steps`` in the logs); more than ``max_consecutive_skips`` in a row raise.
        max_consecutive_skips: see ``nan_policy``.
        gradient_accumulation_steps: micro-batches per optimizer update; k micro-batches of b give exactly the
            update of one batch of k·b for losses that are means over examples. A "step" is one update.
        log_grad_norms: log ``grad_norm/<component key>``: the norm of each weighted component's gradient over the
            variables shared by more than one component (all variables when none is shared); epoch means.

    Raises:
        ValueError, TypeError: an option is invalid; the message quotes it.
    """

    def __init__(
        self,
        model: Any,
        *,
        optimizer: str | keras.optimizers.Optimizer = "adam",
        loss: Any = None,
        loss_weights: Mapping[str, float] | None = None,
        metrics: Mapping[str, Any] | None = None,
        steps_per_execution: int | str = AUTO,
        jit_compile: bool = False,
        strategy: tf.distribute.Strategy | None = None,
        run_eagerly: bool = False,
        seed: int | None = None,
        nan_policy: str = "raise",
        max_consecutive_skips: int = 10,
        gradient_accumulation_steps: int = 1,
        log_grad_norms: bool = False,
    ) -> None:
        if not callable(model):
            raise TypeError(f"`model` must be callable (a keras.Model, tf.Module or function), got {model!r}.")
        if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
            raise TypeError(f"`strategy` must be a tf.distribute.Strategy or None, got {strategy!r}.")
        check_flags(jit_compile=jit_compile, run_eagerly=run_eagerly, log_grad_norms=log_grad_norms)
        self.nan_policy = choice("nan_policy", nan_policy, NAN_POLICIES)
        self.max_consecutive_skips = positive_int("max_consecutive_skips", max_consecutive_skips)
        self.gradient_accumulation_steps = positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
        self.log_grad_norms = log_grad_norms
        self.model = model
        self.steps_per_execution = steps_per_execution = resolve_steps_per_execution(steps_per_execution)
        self.jit_compile = jit_compile
        self.run_eagerly = run_eagerly
        self.strategy = strategy or tf.distribute.get_strategy()
        with self.strategy.scope():
            self.optimizer = make_optimizer(optimizer)
        self._objective = Objective(loss, loss_weights)
        self._metrics = MetricSpec(metrics)
        self._seed = int(np.random.randint(2**31 - 1)) if seed is None else int(seed)
        self._training_arg = accepts_training(model)
        self._hint = output_hint(model)
        self._trackers: dict[str, Tracker] = {}
        self._steps: Steps | None = None
        self._predictor: Predictor | None = None
        self._counts: dict[int, tf.Tensor] = {}
        # Workers must run blocks of the same length (their collectives pair up): no timing-based sizes there.
        fixed = MULTI_WORKER_BLOCK if steps_per_execution == AUTO and is_multi_worker(self.strategy) else None
        self._sizers = {mode: BlockSizer(fixed or steps_per_execution) for mode in ("train", "eval")}
        self._periods: list[int] = []  # step periods callbacks asked for; train blocks end on their multiples
        self._stop: Any = None  # what callbacks see as `model` during fit (carries stop_training)
        self.global_step = 0  # training steps applied so far
        self._stop_requested = lambda: False  # set by fit: a SIGTERM/SIGINT arrived in this process
        self._stop_agreed = False  # some process asked to stop; every worker stops at the same block

    # -- public state ---------------------------------------------------------------------------------------------

    @property
    def loss_weights(self) -> dict[str, tf.Variable]:
        """The weight variables by key (every loss name and component key); ``assign`` one to change it.

        They exist once the Trainer has seen the first batch (the first ``fit``/``evaluate``). Changing one between
        steps, e.g. from a callback, takes effect at the next step without retracing.
        """
        return dict(self._objective.weights)

    @property
    def trace_counts(self) -> dict[str, int]:
        """How often each compiled function was traced (``train``, ``eval``, ``predict``)."""
        counts = dict(self._steps.traces) if self._steps else {}
        if self._predictor is not None:
            counts["predict"] = self._predictor.traces
        return counts

    # -- building -------------------------------------------------------------------------------------------------

    def _forward(self, inputs: Any, training: bool) -> dict[str, tf.Tensor]:
        value = self.model(inputs, training=training) if self._training_arg else self.model(inputs)
        outputs = as_output_dict(value, getattr(self.model, "output_names", None))
        # Mixed precision: losses, metrics and trackers see float32 outputs (as if the last layers were float32).
        return {k: tf.cast(v, tf.float32) if v.dtype in HALF else v for k, v in outputs.items()}

    def _regularization(self) -> tf.Tensor | None:
        if not self._objective.has_regularization:
            return None
        return tf.add_n([tf.cast(loss, tf.float32) for loss in self.model.losses])

    def _build(self, batch: Any) -> None:
        """Learn the structure from the first batch (outputs, components, metrics), before any update.

        Runs the model and every loss once, eagerly and with ``training=False`` (no state changes), so a missing
        key, a shape mismatch or a bad loss return fails here with a clear message.
        """
        if self._steps is not None:
            return
        inputs, targets = batch
        with self.strategy.scope():
            outputs = self._forward(inputs, training=False)
            self._objective.bind_outputs(list(outputs))
            has_regularization = bool(getattr(self.model, "losses", None))
            regularization = tf.add_n(self.model.losses) if has_regularization else None
            parts = self._objective.components(outputs, targets, regularization, self._hint)
            self._objective.build(list(parts), has_regularization=has_regularization)
            metric_values = self._metrics.callable_values(outputs, targets, self._hint)
            mean_keys = self._objective.logged_keys() + list(metric_values)
            per_mode = {mode: self._metrics.build(outputs, targets, self._hint) for mode in ("train", "eval")}
            clash = sorted(set(mean_keys) & set(per_mode["train"]) | {k for k in metric_values if k in parts})
            if clash or len(set(mean_keys)) != len(mean_keys):
                raise ValueError(f"Metric keys {names(clash)} collide with loss component keys; rename them.")
            norms = [f"grad_norm/{key}" for key in self._objective.keys] if self.log_grad_norms else []
            self._trackers = {mode: Tracker(mean_keys, per_mode[mode], norms * (mode == "train")) for mode in per_mode}
            variables = getattr(self.model, "trainable_variables", None)
            if variables is None:
                raise TypeError("The model has no `trainable_variables`; use a keras.Model or a tf.Module.")
            known = {id(v) for v in variables}
            variables = list(variables) + [v for v in self._objective.trainable_variables() if id(v) not in known]
            self.optimizer.build(variables)
            math = StepMath(
                forward=self._forward,
                regularization=self._regularization,
                objective=self._objective,
                metrics=self._metrics,
                trackers=self._trackers,
                optimizer=self.optimizer,
                variables=variables,
                strategy=self.strategy,
                log_grad_norms=self.log_grad_norms,
                output_hint=self._hint,
            )
            self._steps = Steps(
                math=math,
                trackers=self._trackers,
                loss_weights=self._objective.weight_vector,
                strategy=self.strategy,
                jit_compile=self.jit_compile,
                run_eagerly=self.run_eagerly,
                nan_policy=self.nan_policy,
                max_consecutive_skips=self.max_consecutive_skips,
                accumulation=self.gradient_accumulation_steps,
            )

    def _count(self, n: int) -> tf.Tensor:
        """Step counts as (cached) tensors: a Python int would retrace the block for every new value."""
        if n not in self._counts:
            self._counts[n] = tf.constant(n, tf.int32)
        return self._counts[n]

    def _distribute(self, dataset: tf.data.Dataset) -> Any:
        return iter(self.strategy.experimental_distribute_dataset(dataset))

    # -- fit ------------------------------------------------------------------------------------------------------

    def fit(
        self,
        train: Any,
        *,
        epochs: int = 1,
        validation_data: Any = None,
        steps_per_epoch: int | None = None,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        progress: bool = True,
        batch_size: int | None = None,
        shuffle: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
    ) -> History:
        """Train until epoch ``epochs``; return a ``History`` whose ``history`` is ``{key: [value per epoch]}``.

        Args:
            train: a ``tf.data.Dataset`` of ``(inputs, {name: target})`` batches, or numpy ``(x, {name: array})``.
            epochs: the epoch to train to (absolute: a resumed fit trains only what is left).
            validation_data: the same forms; evaluated after every epoch, logged with the prefix ``val_``.
            steps_per_epoch: steps per epoch; with it, one iterator runs on across epochs (restarting at the end of
                finite data). Required for an infinite dataset.
            callbacks: Keras callbacks (EarlyStopping, LearningRateScheduler, ...) and ``WriterCallback``s.
            progress: show a progress bar per epoch.
            batch_size: batch size of numpy input (default 32).
            shuffle: reshuffle numpy input each epoch.
            checkpoint_dir: write resumable checkpoints here (the last 3 are kept) and resume from the latest
                readable one at the start; SIGTERM/SIGINT then end the block, write one and raise
                ``TrainingInterrupted``.
            checkpoint_every: (with ``checkpoint_dir``) a checkpoint every this many steps; one is always written
                at the end of training.

        Raises:
            DataError: empty data, wrong structure, arrays of different lengths.
            MissingKeyError: a loss or metric reads an output or target that does not exist.
            ShapeMismatchError: an output and its target cannot be compared.
            NonFiniteLossError: a loss component became NaN/inf (that step's update is not applied).
            TrainingInterrupted: SIGTERM/SIGINT arrived (with ``checkpoint_dir``); the run can be resumed.
        """
        epochs = positive_int("epochs", epochs)
        if steps_per_epoch is not None:
            steps_per_epoch = positive_int("steps_per_epoch", steps_per_epoch)
        if checkpoint_every is not None:
            checkpoint_every = positive_int("checkpoint_every", checkpoint_every)
            if checkpoint_dir is None:
                raise ValueError("`checkpoint_every` needs `checkpoint_dir`: where should the checkpoints go?")
        data = Data(train, what="training data", batch_size=batch_size, shuffle=shuffle, seed=self._seed)
        if data.infinite and steps_per_epoch is None:
            raise DataError("training data is infinite (repeat() without a count); pass steps_per_epoch.")
        val = None if validation_data is None else Data(validation_data, what="validation data", batch_size=batch_size)
        if self._steps is None:
            self._build(data.first_batch())
        # Later data with another structure fails while the step retraces, which is also before any update.
        if val is not None:
            self._check_structure(val)  # validation runs after an epoch of updates: check it now
        checkpointer = None if checkpoint_dir is None else Checkpointer(self, checkpoint_dir, checkpoint_every)
        history = History()
        writers = [WriterCallback(ProgressWriter())] if progress else []
        self._stop = callback_model(self.model, self.optimizer)
        runner = EpochRunner(self, data, steps_per_epoch)
        params = {"epochs": epochs, "steps": runner.steps}
        cbs = CallbackList([*callbacks, history, *writers], model=self._stop, params=params)
        periods = [p for cb in [*cbs.callbacks, checkpointer] if cb for p in getattr(cb, "step_periods", list)()]
        self._periods = sorted(set(periods))
        loop = FitLoop(self, runner, val, cbs, history, checkpointer)
        try:
            loop.run(epochs)
        finally:
            cbs.teardown()
            loop.close()
        return history

    def _reset_epoch(self) -> None:
        self._trackers["train"].reset()
        self._steps.skipped.assign(0)

    def _epoch_logs(self) -> dict[str, float]:
        """The epoch's training logs: every tracker (one host read); ``skipped_steps`` with ``nan_policy="skip"``."""
        logs = {k: float(v) for k, v in self._trackers["train"].result().items()}
        logs["lr"] = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))  # schedules: the current value
        if self.nan_policy == "skip":
            logs["skipped_steps"] = float(self._steps.skipped.numpy())
        return logs

    def _check_structure(self, data: Data) -> None:
        """Run the objective once on another source's first batch: its targets must carry what the losses read."""
        inputs, targets = data.first_batch()
        outputs = self._forward(inputs, training=False)
        self._objective.components(outputs, targets, self._regularization(), self._hint)
        self._metrics.build(outputs, targets, self._hint)
        self._metrics.callable_values(outputs, targets, self._hint)

    def _run_blocks(
        self, mode: str, iterator: Any, budget: int | None, on_block, advanced=None, *, known_length: bool = False
    ) -> tuple[int, bool]:
        """Run compiled blocks until ``budget`` steps ran or the data ended; returns (steps run, data ended).

        ``on_block(event, index, logs)`` brackets each block (batch callbacks); ``advanced(ran)`` runs after it.
        ``known_length``: the iterator holds at least ``budget`` more batches (the faster exact loop is safe).
        """
        steps = self._steps
        block = steps.block_for(mode, budget is not None and known_length, iterator, self._count(1))
        sizer = self._sizers[mode]
        done = 0
        while budget is None or done < budget:
            boundary = steps_to_boundary(self.global_step, self._periods) if mode == "train" else None
            n = sizer.next(None if budget is None else budget - done, boundary)
            on_block("begin", done, None)
            start = time.perf_counter()
            # The one host sync per block: everything the outer loop needs comes back in a single vector.
            stop = self._count(int(mode == "train" and self._stop_requested()))
            info = steps.unpack(mode, block(iterator, self._count(n), stop).numpy())
            sizer.observe(n, info.ran, time.perf_counter() - start)
            if mode == "train":
                self.global_step += info.ran
                self._raise_if_non_finite(info)
            done += info.ran
            if info.ran:
                on_block("end", done - 1, info.logs)
            self._stop_agreed = self._stop_agreed or info.stopped  # FitLoop saves and raises in `advanced`
            if advanced is not None:
                advanced(info.ran)
            if not info.more:
                return done, True
            if mode == "train" and self._stop.stop_training:
                break
        return done, False

    def _raise_if_non_finite(self, info: BlockInfo) -> None:
        values = dict(zip(self._steps.loss_keys, info.values.tolist()))
        bad = [k for k, ok in zip(self._steps.loss_keys, info.finite) if not ok]
        if self.nan_policy == "raise" and bad:
            raise NonFiniteLossError(bad, self.global_step + 1, values)
        if self.nan_policy == "skip" and info.consecutive > self.max_consecutive_skips:
            raise NonFiniteLossError(
                bad, self.global_step, values, skipped=info.consecutive, limit=self.max_consecutive_skips
            )

    # -- evaluate and predict -------------------------------------------------------------------------------------

    def _evaluate(self, data: Data, cbs: CallbackList) -> dict[str, float]:
        tracker = self._trackers["eval"]
        tracker.reset()
        cbs.on_test_begin(None)

        def on_block(event: str, index: int, logs: dict[str, float] | None) -> None:
            getattr(cbs, f"on_test_batch_{event}")(index, logs)

        self._run_blocks("eval", self._distribute(data.dataset()), data.steps, on_block, known_length=True)
        logs = {k: float(v) for k, v in tracker.result().items()}
        cbs.on_test_end(logs)
        return logs

    def evaluate(self, data: Any, *, batch_size: int | None = None) -> dict[str, float]:
        """Loss components and metrics over ``data`` (same forms as ``fit``): ``{key: float}``, batch-weighted means."""
        source = Data(data, what="evaluation data", batch_size=batch_size)
        if self._steps is None:
            self._build(source.first_batch())
        return self._evaluate(source, CallbackList([], model=None, params={}))

    def predict(self, data: Any, *, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Outputs for every example, ``{output name: array}``, batches concatenated in order.

        ``data`` is numpy input ``x`` (an array or a dict of arrays) or a dataset of inputs (or of
        ``(inputs, targets)``, whose targets are ignored).
        """
        source = Data(data, what="prediction data", batch_size=batch_size, with_targets=False)
        if self._predictor is None:
            self._predictor = Predictor(self._forward, self.strategy, self.run_eagerly)
        return self._predictor(source.dataset())
