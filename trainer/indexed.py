"""A ``keras.utils.PyDataset`` as tapeloop's data: batches taken by index, in an order drawn from the seed.

Keras' contract for a ``PyDataset`` is ``dataset[i]`` -> batch ``i``, ``len(dataset)`` batches, and the hooks
``on_epoch_begin``/``on_epoch_end``. Like numpy input, an epoch's order is a pure function of (seed, epoch) and a
resumed epoch starts at its next batch, so a resume is exact (the batches of an index must not change in between).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainer.errors import DataError
from trainer.structure import no_lists

__all__ = ["IndexedBatches", "standardize"]


def standardize(batch: Any, what: str) -> tuple | dict:
    """A ``PyDataset`` item as Keras reads it: ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``."""
    if isinstance(batch, Mapping):
        return (batch,)  # a dict is the inputs (Keras' rule)
    if isinstance(batch, list):
        batch = tuple(batch)
    if not isinstance(batch, tuple):
        return (batch,)
    if len(batch) not in (1, 2, 3):
        raise DataError(
            f"{what}: a PyDataset item must be x, (x,), (x, y) or (x, y, sample_weight); got a tuple of {len(batch)}."
        )
    return batch


def _spec(value: Any) -> tf.TensorSpec:
    array = np.asarray(value)
    dtype = np.dtype(keras.config.floatx()) if array.dtype == np.float64 else array.dtype  # as for numpy input
    return tf.TensorSpec((None, *array.shape[1:]), tf.as_dtype(dtype))


class IndexedBatches:
    """A ``PyDataset`` and how to read one of its items (``key``: the standardized item -> tapeloop's element).

    Args:
        source: the ``keras.utils.PyDataset`` (finite: ``num_batches`` known).
        key: maps a standardized item to ``(inputs, {target name: array})``, or to the inputs alone (predict).
        what: how messages name this data.
    """

    def __init__(self, source: Any, key: Callable[[tuple], Any], what: str) -> None:
        self.num_batches = source.num_batches
        if self.num_batches is None:
            raise DataError(
                f"{what}: an endless PyDataset (num_batches None) is not taken; give it a __len__, or wrap it in a "
                "tf.data.Dataset and pass steps_per_epoch."
            )
        if self.num_batches == 0:
            raise DataError(f"{what} is empty: the PyDataset has 0 batches.")
        self.source, self.key, self.what = source, key, what
        first = self._item(0)
        self.signature = tf.nest.map_structure(_spec, first)
        self.first = tf.nest.map_structure(lambda a, s: tf.convert_to_tensor(a, s.dtype), first, self.signature)

    def _item(self, index: int) -> Any:
        return no_lists(self.key(standardize(self.source[index], self.what)))

    def dataset(self, order: np.ndarray) -> tf.data.Dataset:
        """The batches at ``order``, in that order; the ``PyDataset``'s epoch hooks run around them.

        ``on_epoch_end`` runs once the last batch is taken, before it is handed on: a generator's code after its
        last ``yield`` runs only if tf.data asks for one more element, which an exact epoch may never do.
        """

        def batches():
            self.source.on_epoch_begin()
            for k, index in enumerate(order):
                item = self._item(int(index))
                if k == len(order) - 1:
                    self.source.on_epoch_end()
                yield tf.nest.map_structure(lambda a, s: np.asarray(a, s.dtype.as_numpy_dtype), item, self.signature)

        ds = tf.data.Dataset.from_generator(batches, output_signature=self.signature)
        return ds.apply(tf.data.experimental.assert_cardinality(len(order)))
