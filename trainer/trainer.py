"""The Trainer facade: validates options, wires objective, metrics, trackers and compiled steps, runs the loops.

A ``fit`` call takes this path (one file each): ``Trainer.fit`` -> the epoch loop (``trainer/epochs.py``) -> the
block runner (``trainer/runner.py``) -> the compiled block and its in-graph loop (``trainer/step.py``) -> one step's
mathematics (``trainer/update.py``). The Trainer builds the parts once it has seen the first batch and hands them
to the loops; the loops reach nothing of the Trainer.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from losses.aggregators import Aggregator, resolve
from losses.weighting import LossWeighting
from trainer.balance import EpochWeighting, claim_learners, make_balance
from trainer.callbacks import CallbackList, History, as_callbacks, callback_model, step_periods
from trainer.checkpoints import Checkpointer
from trainer.cluster import is_chief
from trainer.data import Data
from trainer.epochs import INEXACT_AT_EPOCH_ENDS, EpochRunner, serializable
from trainer.errors import naming
from trainer.fit_loop import FitLoop, Validation
from trainer.inputs import VERBOSE, check_validation_freq, eval_budget, fit_data, keras_source
from trainer.metrics import MetricSpec
from trainer.model import ModelCall, check_own_training
from trainer.objective import Objective
from trainer.options import (
    AUTO,
    NAN_POLICIES,
    check_created_in,
    check_flags,
    check_same_variables,
    checkpoint_period,
    choice,
    computes_in_float16,
    learning_rate_setting,
    make_optimizer,
    non_negative_int,
    optional,
    positive_int,
    resolve_steps_per_execution,
)
from trainer.predict import Predictor, prediction_data
from trainer.probe import make_trackers, probe
from trainer.runner import BlockRunner
from trainer.step import Steps
from trainer.structure import by_output_order
from trainer.update import StepMath
from trainer.writers import WriterCallback, format_scalars, progress_writers

__all__ = ["Trainer"]


class Trainer:
    """Trains a model whose losses see every output and every target, logging every named loss component.

    Args:
        model: a ``keras.Model``, ``tf.Module`` or callable ``inputs -> outputs``. A dict is used as is; a
            list/tuple is keyed by ``model.output_names``; a single tensor is keyed ``"output"``.
        optimizer: a Keras optimizer or its name. Pass ``clipnorm``/``global_clipnorm``/``weight_decay`` there.
        loss: one loss callable ``loss(outputs, targets) -> scalar | {name: scalar}``, or a dict ``{name: loss}``
            (in it a ``str`` or ``keras.losses.Loss`` is a Keras loss on the output of that name), compile's list,
            or one Keras loss (on the model's output, or on each of its outputs, as ``compile``).
        loss_weights: ``{key: float}``, key a loss name or a full component key (see ``loss_weights``), or a list.
        metrics: ``{output: [str | Metric]}`` and/or ``{name: callable(outputs, targets)}``, or compile's lists.
        weighted_metrics: as Keras': Keras metrics (``metrics``' first form) updated with the sample weights.
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
        aggregator: multi-task balancing (README): an aggregator of the components' gradients over the shared
            variables (``"upgrad"``, ``losses.MGDA()``, ...; logs ``agg_weight/<key>``, ``conflict/<a>|<b>``) or a
            loss weighting (``"gradnorm"``, ``losses.DWA(2.0)``; logs ``loss_weight/<key>``). None: the sum.

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
        weighted_metrics: Mapping[str, Any] | None = None,
        steps_per_execution: int | str = AUTO,
        jit_compile: bool = False,
        strategy: tf.distribute.Strategy | None = None,
        run_eagerly: bool = False,
        seed: int | None = None,
        nan_policy: str = "raise",
        max_consecutive_skips: int = 10,
        gradient_accumulation_steps: int = 1,
        log_grad_norms: bool = False,
        aggregator: str | Aggregator | LossWeighting | None = None,
    ) -> None:
        self._call = ModelCall(model)  # checks that the model is callable
        check_own_training(model, loss)
        if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
            raise TypeError(f"`strategy` must be a tf.distribute.Strategy or None, got {strategy!r}.")
        check_flags(jit_compile=jit_compile, run_eagerly=run_eagerly, log_grad_norms=log_grad_norms)
        self.nan_policy = choice("nan_policy", nan_policy, NAN_POLICIES)
        self.max_consecutive_skips = positive_int("max_consecutive_skips", max_consecutive_skips)
        self.gradient_accumulation_steps = positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
        self.log_grad_norms, self.model = log_grad_norms, model
        self.aggregator, self.loss_weighting = resolve(aggregator)
        self.steps_per_execution = resolve_steps_per_execution(steps_per_execution)
        self.jit_compile, self.run_eagerly = jit_compile, run_eagerly
        self.strategy = strategy or tf.distribute.get_strategy()
        with self.strategy.scope():
            check_created_in(self.strategy, model)
            self.optimizer = make_optimizer(optimizer, float16=computes_in_float16(model))
        loss, loss_weights = by_output_order("loss", loss, model), by_output_order("loss_weights", loss_weights, model)
        self._objective = Objective(loss, loss_weights)
        claim_learners(model, self.loss_weighting, self._objective.entries())
        self._metrics = MetricSpec(
            by_output_order("metrics", metrics, model, per_output=False),
            by_output_order("weighted_metrics", weighted_metrics, model, per_output=False),
        )
        # What a resumed fit replaces with the checkpoint's state, and warns about when it differs.
        self._settings = {
            "learning_rate": learning_rate_setting(self.optimizer),
            "loss_weights": self._objective.initial_weights,
        }
        self.seed = int(np.random.randint(2**31 - 1)) if seed is None else int(seed)
        self._runner: BlockRunner | None = None  # built with the first batch (``_build``)
        self._predictor: Predictor | None = None

    # -- public state ---------------------------------------------------------------------------------------------

    @property
    def loss_weights(self) -> dict[str, tf.Variable]:
        """The weight variables by key (every loss name and component key); ``assign`` one to change it.

        They exist once the Trainer has seen the first batch (the first ``fit``/``evaluate``). Changing one between
        steps, e.g. from a callback, takes effect at the next step without retracing.
        """
        return dict(self._objective.weights)

    @property
    def runner(self) -> BlockRunner | None:
        """The block runner (compiled blocks, trackers, block sizes); None until the first ``fit``/``evaluate``."""
        return self._runner

    @property
    def global_step(self) -> int:
        """Training steps (optimizer updates) applied so far; a resumed ``fit`` continues the saved count."""
        return 0 if self._runner is None else self._runner.global_step

    @property
    def trainable_variables(self) -> list[tf.Variable]:
        """What the optimizer trains: the model's trainable variables, then those the losses own."""
        variables = self._call.trainable_variables
        known = {id(v) for v in variables}
        return list(variables) + [v for v in self._objective.trainable_variables() if id(v) not in known]

    @property
    def trace_counts(self) -> dict[str, int]:
        """How often each compiled function was traced (``train``, ``eval``, ``predict``)."""
        counts = dict(self._runner.steps.traces) if self._runner else {}
        return counts if self._predictor is None else {**counts, "predict": self._predictor.traces}

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resumable checkpoint holds of this Trainer, by name (see ``trainer/checkpoints.py``).

        Flat variable lists restore by position, whatever the layers' names; ``model`` also lets a user restore
        the model alone with ``tf.train.Checkpoint(model=model)``.
        """
        if self._runner is None:
            raise RuntimeError("checkpoint_state() needs a built Trainer: call fit or evaluate first.")
        state: dict[str, Any] = {
            "model_variables": self._call.variables,
            "optimizer": list(self.optimizer.variables),
            "losses": self._objective.trainable_variables(),
            "loss_weights": dict(self._objective.weights),
            "loss_weighting": list(getattr(self.loss_weighting, "variables", [])),
            **self._runner.trackables(),
        }
        if isinstance(self.model, (tf.Module, keras.layers.Layer)):
            state["model"] = self.model
        return state

    # -- building -------------------------------------------------------------------------------------------------

    def _build(self, batch: Any) -> None:
        """Learn the structure from the first batch (outputs, components, metrics) and build the compiled parts."""
        with self.strategy.scope():
            found = probe(self._call, self._objective, self._metrics, batch)  # fails here, before any update
            self._objective.build(list(found.parts))
            balance = make_balance(self, self._objective.keys)  # None: the plain weighted sum
            stats = balance.step_keys() if balance else []
            trackers = make_trackers(self._objective, found, self._call.layer_metrics(), stats)
            variables = self.trainable_variables
            self.optimizer.build(variables)
            math = StepMath(
                forward=self._call,
                regularization=self._call.regularization,
                objective=self._objective,
                metrics=self._metrics,
                trackers=trackers,
                optimizer=self.optimizer,
                variables=variables,
                strategy=self.strategy,
                balance=balance,
                output_hint=self._call.hint,
            )
            steps = Steps(
                math,
                loss_weights=self._objective.weight_vector,
                jit_compile=self.jit_compile,
                run_eagerly=self.run_eagerly,
                nan_policy=self.nan_policy,
                max_consecutive_skips=self.max_consecutive_skips,
                accumulation=self.gradient_accumulation_steps,
            )
            self._runner = BlockRunner(steps, steps_per_execution=self.steps_per_execution)

    # -- fit ------------------------------------------------------------------------------------------------------

    def fit(
        self,
        x: Any = None,
        y: Any = None,
        *,
        batch_size: int | None = None,
        epochs: int = 1,
        verbose: int | str = "auto",
        callbacks: Sequence[keras.callbacks.Callback] = (),
        validation_split: float = 0.0,
        validation_data: Any = None,
        shuffle: bool = True,
        class_weight: Mapping[int, float] | None = None,
        sample_weight: Any = None,
        initial_epoch: int = 0,
        steps_per_epoch: int | None = None,
        validation_steps: int | None = None,
        validation_batch_size: int | None = None,
        validation_freq: int | Sequence[int] = 1,
        progress: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
    ) -> History:
        """Train until epoch ``epochs``; return a ``History`` whose ``history`` is ``{key: [value per epoch]}``.

        Arguments up to ``validation_freq`` are ``Model.fit``'s, with Keras' meanings (README: Coming from Keras).

        Args:
            x: numpy inputs with ``y``; or, with ``y=None``, ``(inputs, {name: target})`` or a ``tf.data.Dataset``
                of such batches (or of Keras' ``(x, y)`` / ``(x, y, sample_weight)`` batches).
            y: targets: a dict by output name, a list in output order, or one array for a single-output model.
            epochs: the epoch to train to (absolute: a resumed fit trains only what is left).
            verbose: ``"auto"`` (follow ``progress``), 0 silent, 1 a progress bar, 2 one line per epoch.
            validation_data: ``(x, y)``, ``(x, y, sample_weight)`` or a dataset; logged with the prefix ``val_``.
            sample_weight, class_weight: per-example weights (an array, or a dict/list per output) or per-class
                weights (single output); they reach the losses as targets (``losses.sample_weight_key``).
            steps_per_epoch: steps per epoch; with it, one iterator runs on across epochs (restarting at the end of
                finite data). Required for an infinite dataset.
            callbacks: Keras callbacks (EarlyStopping, LearningRateScheduler, ...) and ``WriterCallback``s.
            progress: show progress (a bar on a terminal, a line per epoch otherwise) when ``verbose="auto"``.
            checkpoint_dir: resumable checkpoints (the last 3 kept; resume from the latest readable one); SIGTERM
                and SIGINT then end the block, write one and raise ``TrainingInterrupted``.
            checkpoint_every: also a checkpoint every this many steps (one is always written at each epoch's end).

        Raises:
            DataError, MissingKeyError, ShapeMismatchError: bad data or structure (the message names it).
            UserCodeError: a loss, metric or the model raised on the first batch (or while tracing).
            StepError: an operation failed on a later batch (a label out of range, another shape); names the steps.
            NonFiniteLossError: a loss component became NaN/inf (that step's update is not applied).
            TrainingInterrupted: SIGTERM/SIGINT arrived (with ``checkpoint_dir``); the run can be resumed.
        """
        epochs = non_negative_int("epochs", epochs)  # 0 trains nothing, as Keras
        initial_epoch = non_negative_int("initial_epoch", initial_epoch)
        steps_per_epoch = optional(positive_int, "steps_per_epoch", steps_per_epoch)
        validation_steps = optional(positive_int, "validation_steps", validation_steps)
        validation_batch_size = optional(positive_int, "validation_batch_size", validation_batch_size)
        check_validation_freq(validation_freq)
        verbose = choice("verbose", verbose, VERBOSE)
        check_flags(shuffle=shuffle)
        checkpoint_every = checkpoint_period(checkpoint_dir, checkpoint_every)
        callbacks = as_callbacks(callbacks, checkpoint_dir)
        data, val = fit_data(
            x,
            y,
            sample_weight=sample_weight,
            class_weight=class_weight,
            validation_split=validation_split,
            validation_data=validation_data,
            batch_size=batch_size,
            validation_batch_size=validation_batch_size,
            shuffle=shuffle,
            seed=self.seed,
            output_names=self._output_names,
            steps=(steps_per_epoch, validation_steps),
        )
        if self._runner is None:
            self._build(data.first_batch())  # (taking a first batch costs an iterator: only when needed)
        check_same_variables(self._runner.steps.math.variables, self.trainable_variables)
        # Later data with another structure fails while the step retraces, which is also before any update.
        if val is not None:
            with self.strategy.scope(), naming("validation data"):
                probe(self._call, self._objective, self._metrics, val.first_batch())  # checked before any update
        runner = self._runner
        checkpointer = None  # multi-worker: only the chief writes into checkpoint_dir
        if checkpoint_dir is not None:
            chief, every = is_chief(self.strategy), checkpoint_every
            checkpointer = Checkpointer(checkpoint_dir, self.checkpoint_state(), every_n_steps=every, chief=chief)
        history = History()
        saveable = not data.is_dataset or serializable(data.dataset())
        epochs_runner = EpochRunner(runner, data, steps_per_epoch, self.gradient_accumulation_steps, saveable=saveable)
        if checkpointer is not None and not epochs_runner.exact_at_epoch_ends:
            warnings.warn(INEXACT_AT_EPOCH_ENDS, RuntimeWarning, stacklevel=2)
        level = (1 if progress else 0) if verbose == "auto" else verbose
        params = {"epochs": epochs, "steps": epochs_runner.steps, "verbose": level}
        model, give_back = callback_model(self.model, self.optimizer, self.evaluate)  # callbacks' `self.model`
        writers = [WriterCallback(writer) for writer in progress_writers(verbose, progress)]
        weighting = [EpochWeighting(self.loss_weighting)] if self.loss_weighting else []
        listed = [*weighting, *callbacks, history, *writers]
        callbacks = CallbackList(listed, model=model, params=params, give_back=give_back)
        sources = [*callbacks.callbacks, checkpointer]
        runner.set_periods(step_periods(sources, self.steps_per_execution))
        validation = None if val is None else Validation(val, validation_steps, validation_freq)
        loop = FitLoop(runner, epochs_runner, validation, callbacks, history, checkpointer, self._settings)
        try:
            loop.run(epochs, initial_epoch)
        finally:
            callbacks.teardown()
            loop.close()
        return history

    def _output_names(self, inputs: Any) -> list[str]:
        return self._call.output_names(inputs, self.strategy)

    # -- evaluate and predict -------------------------------------------------------------------------------------

    def evaluate(
        self,
        x: Any = None,
        y: Any = None,
        *,
        batch_size: int | None = None,
        sample_weight: Any = None,
        steps: int | None = None,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        return_dict: bool = True,
        verbose: int | str = 0,
    ) -> dict[str, float] | list[float] | float:
        """Loss components and metrics over the data (``fit``'s forms, or Keras' ``x, y, sample_weight``).

        Returns ``{key: float}``, batch-weighted means; unlike Keras, ``return_dict`` defaults to True. False gives
        ``Model.evaluate``'s list in its order (``loss``, each output's Keras loss, then the rest sorted by Keras'
        names; one value alone). ``steps`` evaluates the first ``steps`` batches only. ``verbose`` 1, 2 or "auto"
        print the results on one line; unlike Keras, the default is 0 (nothing).
        """
        verbose = choice("verbose", verbose, VERBOSE)
        source = keras_source(x, y, sample_weight, what="evaluation data", output_names=self._output_names)
        data = Data(source, what="evaluation data", batch_size=batch_size)
        data.check_finite(steps, "steps")
        if self._runner is None:
            self._build(data.first_batch())
        budget, exact = eval_budget(data, optional(positive_int, "steps", steps))
        callbacks = as_callbacks(callbacks)
        model, give_back = callback_model(self.model, self.optimizer) if callbacks else (None, lambda: None)
        listed = CallbackList(callbacks, model=model, params={"steps": budget}, give_back=give_back)
        try:
            logs = self._runner.evaluate(data.dataset(), budget, listed, exact=exact)
        finally:
            listed.teardown()
        if verbose != 0:
            print(format_scalars(logs), flush=True)
        return logs if return_dict else self._metrics.keras_list(logs, self._objective.keras_names())

    def predict(
        self, data: Any, *, batch_size: int | None = None, steps: int | None = None, verbose: int | str = 0
    ) -> dict[str, np.ndarray]:
        """Outputs for every example, ``{output name: array}``, batches concatenated in order; ``data`` as
        :func:`trainer.predict.prediction_data` takes it (inputs, a dataset or a PyDataset; its targets ignored)."""
        if self._predictor is None:
            self._predictor = Predictor(self._call, self.strategy, self.run_eagerly)
        return self._predictor(prediction_data(data, batch_size, steps, verbose))
