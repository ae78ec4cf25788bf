"""``predict``: every example's outputs, in order, on one device or many.

Under a strategy each replica holds a share of every batch (the last one may split unevenly, a replica may get
none). Each replica pads its share to the largest share, all shares are gathered in replica order (which is the
batch's order) on every worker, and the host drops the padding using the gathered share sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from trainer.blocks import flat_call
from trainer.cluster import check_same_batches, is_multi_worker
from trainer.data import Data
from trainer.errors import DataError, StepError
from trainer.inputs import VERBOSE, python_source
from trainer.options import choice, optional, positive_int
from trainer.step import own_function

__all__ = ["Predictor", "prediction_data"]


def prediction_data(data: Any, batch_size: int | None, steps: int | None, verbose: int | str) -> tf.data.Dataset:
    """``predict``'s batches (the first ``steps``): numpy inputs, a dataset or a ``keras.utils.PyDataset``, whose
    elements' targets (Keras' ``(x, y)``, ``(x, y, sample_weight)``, or ``(x, targets)``) are dropped. ``verbose``
    takes Keras' values; predict prints nothing."""
    what, steps, _ = "prediction data", optional(positive_int, "steps", steps), choice("verbose", verbose, VERBOSE)
    source = Data(python_source(data, what), what=what, batch_size=batch_size, with_targets=False)
    source.check_finite(steps, "steps")
    dataset = source.dataset()
    return dataset if steps is None else dataset.take(steps)


class Predictor:
    """A compiled predict step (one trace: the batch dimension is None), and the loop over a dataset.

    Args:
        forward: ``forward(inputs, training) -> {output name: tensor}``.
        strategy: the Trainer's strategy.
        run_eagerly: run the step eagerly.
    """

    def __init__(self, forward: Callable[[Any, bool], dict[str, tf.Tensor]], strategy, run_eagerly: bool) -> None:
        self._forward = forward
        self._strategy = strategy
        self.traces = 0
        self._run_eagerly = run_eagerly
        self._step = self._step_fn if run_eagerly else own_function(self._step_fn)

    def _replica(self, inputs: Any) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        outputs = self._forward(inputs, False)
        size = tf.shape(tf.nest.flatten(inputs)[0])[:1]
        sizes = tf.distribute.get_replica_context().all_gather(size, axis=0)  # every replica's share, in order
        largest = tf.reduce_max(sizes, keepdims=True)
        padded = {}
        for name, value in outputs.items():
            pad = tf.concat([largest - size, tf.zeros([tf.rank(value) - 1], tf.int32)], axis=0)
            padded[name] = tf.pad(value, tf.stack([tf.zeros_like(pad), pad], axis=1))
        return padded, sizes

    def _step_fn(self, iterator: Any) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        self.traces += 1  # runs only while tracing
        batch = next(iterator)
        if self._strategy.num_replicas_in_sync == 1:
            outputs = self._strategy.run(lambda x: self._forward(x, False), args=(batch,))
            return outputs, tf.zeros([0], tf.int32)
        outputs, sizes = self._strategy.run(self._replica, args=(batch,))
        gather = self._strategy.gather
        sizes = self._strategy.experimental_local_results(sizes)[0]  # the same on every replica
        return {name: gather(value, axis=0) for name, value in outputs.items()}, sizes

    def __call__(self, dataset: tf.data.Dataset) -> dict[str, np.ndarray]:
        if is_multi_worker(self._strategy):  # a collective: every worker predicts together
            batches = int(dataset.cardinality())
            check_same_batches(self._strategy, "predict", batches if batches >= 0 else None)
        chunks: dict[str, list[np.ndarray]] = {}
        iterator = iter(self._strategy.experimental_distribute_dataset(dataset))
        step = self._step if self._run_eagerly else flat_call(self._step.get_concrete_function(iterator), iterator)
        done = 0
        while True:
            try:
                outputs, sizes = step(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                break
            except tf.errors.OpError as err:  # on a later batch (the first one fails above, tracing, named)
                raise StepError("predict", done, 1, err) from err
            done += 1
            sizes = sizes.numpy()
            for name, value in outputs.items():
                value = value.numpy()
                if len(sizes):  # replica r's rows start at r × (largest share); keep its first sizes[r]
                    width = len(value) // len(sizes)
                    value = np.concatenate([value[r * width : r * width + n] for r, n in enumerate(sizes)])
                chunks.setdefault(name, []).append(value)
        return {name: _concatenate(name, parts) for name, parts in chunks.items()}


def _concatenate(name: str, parts: list[np.ndarray]) -> np.ndarray:
    """The batches of one output as one array; batches whose shapes differ beyond the batch axis are an error."""
    if parts[0].ndim == 0:
        raise DataError(
            f"predict: the output {name!r} is a scalar, with no batch axis to join the batches along (Keras' predict "
            "stacks one value per batch). predict returns per-example outputs: give it a batch axis, or read it from "
            "the model itself."
        )
    shapes = [part.shape[1:] for part in parts]
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise DataError(
                f"predict: the output {name!r} has shape {parts[0].shape} in batch 0 and {parts[i].shape} in batch "
                f"{i}, so its batches cannot be joined into one array (Keras' predict returns a ragged tensor "
                "here). Give batches of one shape — e.g. dataset.padded_batch(n, padded_shapes=...) with a fixed "
                "length — or call the model batch by batch."
            )
    return np.concatenate(parts)
