"""Data adaptation: numpy arrays or a ``tf.data.Dataset`` in, validated per-epoch pipelines of batches out.

Numpy input is ``(x, {name: array})`` with ``batch_size``; it is shuffled each epoch in ``fit`` with a seed derived
from (base seed, epoch), so an epoch's order is a pure function of its number. A last partial batch is kept. Above
``COPY_LIMIT`` (64 MB) batches are gathered by index from the arrays themselves, so no copy of the data is made.
A dataset must yield ``(inputs, {name: tensor})`` batches; it is used as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainer.errors import DataError
from trainer.indexed import IndexedBatches
from trainer.options import positive_int
from trainer.structure import no_lists

__all__ = ["Data"]

_SHAPE_HINT = "(inputs, {target name: array})"
COPY_LIMIT = 2**26  # bytes of numpy input up to which an epoch's batches slice a permuted copy (see Data.dataset)


def _as_array(value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == np.float64:
        array = array.astype(keras.config.floatx())  # Keras' floatx (float32 by default), as Model.fit does
    return array


def _in_floatx(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """A dataset's float64 tensors (NumPy's default float) in Keras' floatx, as numpy input is cast: Keras' losses
    cast targets to it themselves, and tapeloop's callables see them as given."""
    floatx = tf.as_dtype(keras.config.floatx())
    if floatx == tf.float64 or not any(spec.dtype == tf.float64 for spec in tf.nest.flatten(dataset.element_spec)):
        return dataset

    def cast(*element: Any) -> Any:  # tf.data passes a tuple element's parts as arguments
        cast_ = tf.nest.map_structure(lambda t: tf.cast(t, floatx) if t.dtype == tf.float64 else t, element)
        return cast_ if isinstance(dataset.element_spec, tuple) else cast_[0]

    return dataset.map(cast)


def _leaves(structure: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(structure, Mapping):
        return [pair for key, value in structure.items() for pair in _leaves(value, f"{prefix}[{key!r}]")]
    if isinstance(structure, (list, tuple)):
        return [pair for i, value in enumerate(structure) for pair in _leaves(value, f"{prefix}[{i}]")]
    return [(prefix, structure)]


def _element_tuple(spec: Any) -> bool:
    return isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Mapping)


class Data:
    """One source of batches.

    Args:
        source: ``(x, {name: array})`` numpy data, ``x`` alone (``with_targets=False``), or a ``tf.data.Dataset``.
        what: how messages name this data ("training data", "validation data", ...).
        batch_size: batch size for numpy input (default 32, as Keras); must be None for a dataset.
        shuffle: reshuffle numpy input every epoch.
        seed: base seed of the shuffle.
        with_targets: whether elements carry a target dict (fit/evaluate) or are inputs only (predict).
    """

    def __init__(
        self,
        source: Any,
        *,
        what: str,
        batch_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        with_targets: bool = True,
    ) -> None:
        self.what = what
        self.shuffle = shuffle
        self.seed = int(seed)
        self.with_targets = with_targets
        self.is_dataset = isinstance(source, tf.data.Dataset)
        self._batches = source if isinstance(source, IndexedBatches) else None
        if self._batches is not None:  # a keras.utils.PyDataset: batches by index, ordered like numpy input
            if batch_size is not None:
                raise DataError(f"{what}: batch_size applies to numpy input only; a PyDataset is batched already.")
            self._arrays = self._dataset = None
            self.steps, self.infinite = self._batches.num_batches, False
            return
        if self.is_dataset:
            if batch_size is not None:
                raise DataError(
                    f"{what}: batch_size applies to numpy input only; a tf.data.Dataset is batched already."
                )
            self._arrays = None
            self._dataset = self._check_dataset(source)
            cardinality = int(self._dataset.cardinality())
            self.steps: int | None = cardinality if cardinality >= 0 else None
            self.infinite = cardinality == tf.data.INFINITE_CARDINALITY
            if cardinality == 0:
                raise DataError(f"{what} is empty: the dataset yields no batches.")
            return
        if batch_size is None:
            batch_size = 32
        self.batch_size = positive_int(f"{what}: batch_size", batch_size, error=DataError)
        self._arrays = self._check_arrays(source)
        self._dataset = None
        self.num_examples = len(_leaves(self._arrays, "")[0][1])
        self.nbytes = sum(leaf.nbytes for leaf in tf.nest.flatten(self._arrays))
        self.steps = -(-self.num_examples // batch_size)
        self.infinite = False

    def check_finite(self, steps: int | None, option: str) -> None:
        """An infinite dataset (``repeat()`` without a count) needs a number of steps: a DataError naming the option
        (Keras would loop forever, e.g. validating on an infinite dataset without ``validation_steps``)."""
        if self.infinite and steps is None:
            raise DataError(f"{self.what} is infinite (repeat() without a count); pass {option}.")

    def _check_dataset(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        spec = dataset.element_spec
        if not self.with_targets:  # the inputs: x of (x, targets) and of Keras' (x,), (x, y), (x, y, sample_weight)
            inputs = dataset.map(lambda x, *rest: x) if isinstance(spec, tuple) and len(spec) <= 3 else dataset
            return _in_floatx(inputs)
        if not _element_tuple(spec):
            raise DataError(
                f"{self.what}: each dataset element must be {_SHAPE_HINT} with the targets a dict keyed by name; "
                f"got elements of spec {spec}."
            )
        return _in_floatx(dataset)

    def _check_arrays(self, source: Any) -> Any:
        if self.with_targets:
            if not isinstance(source, (tuple, list)) or len(source) != 2:
                raise DataError(
                    f"{self.what}: numpy input must be a pair {_SHAPE_HINT}; got a {type(source).__name__}"
                    + (f" of length {len(source)}" if isinstance(source, (tuple, list)) else "")
                    + "."
                )
            x, y = source
            if not isinstance(y, Mapping):
                raise DataError(
                    f"{self.what}: targets must be a dict {{target name: array}} (each named after the output it "
                    f"belongs to, e.g. {{'output': y}}; {{}} for a loss that reads no target); "
                    f"got a {type(y).__name__}."
                )
            arrays = (no_lists(tf.nest.map_structure(_as_array, x)), {k: _as_array(v) for k, v in y.items()})
            leaves = _leaves(arrays[0], "x") + _leaves(arrays[1], "targets")
        else:
            arrays = no_lists(tf.nest.map_structure(_as_array, source))
            leaves = _leaves(arrays, "x")
        scalars = [name for name, a in leaves if a.ndim == 0]
        if scalars:
            raise DataError(f"{self.what}: {', '.join(scalars)} is a scalar; every array needs a first (example) axis.")
        for name, a in leaves:
            if a.dtype.kind in "OV":  # object or structured arrays: strings and numbers only become tensors
                try:
                    tf.convert_to_tensor(a)
                except (ValueError, TypeError) as err:
                    raise DataError(
                        f"{self.what}: {name} ({a.dtype}) holds values that cannot become a tensor ({err}); give "
                        "numbers or strings."
                    ) from None
        lengths = {name: len(a) for name, a in leaves}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{name}: {n}" for name, n in lengths.items())
            raise DataError(f"{self.what}: arrays differ in length (number of examples): {shown}.")
        if next(iter(lengths.values())) == 0:
            raise DataError(f"{self.what} is empty: the arrays hold 0 examples.")
        return arrays

    def dataset(self, epoch: int = 0, *, skip_batches: int = 0) -> tf.data.Dataset:
        """The batches of one pass over the data (numpy input: shuffled for ``epoch`` when shuffling).

        ``skip_batches`` (numpy input) starts the pass that many batches in, for a resumed epoch. It skips examples
        before batching: ``tf.distribute`` rewrites the batch size to split batches over replicas, so a ``skip``
        after ``batch`` would count per-replica batches.
        """
        if self._dataset is not None:
            if skip_batches:
                raise ValueError("skip_batches applies to numpy input; a dataset's iterator is checkpointed instead.")
            return self._dataset
        if self._batches is not None:  # a PyDataset: its items by index, read ahead like numpy batches
            ds = self._batches.dataset(self._order(self._batches.num_batches, epoch)[skip_batches:])
        else:
            ds = self._array_batches(self._order(self.num_examples, epoch)[skip_batches * self.batch_size :])
        ds = ds.prefetch(2)
        options = tf.data.Options()
        # A fixed prefetch without autotune: autotune can stall 9-39 s when an epoch stops early (PITFALLS.md).
        options.autotune.enabled = False
        options.deterministic = True
        return ds.with_options(options)

    def _array_batches(self, order: np.ndarray) -> tf.data.Dataset:
        """Numpy input's batches of the examples at ``order``."""
        if self.nbytes <= COPY_LIMIT:
            # Small data: a permuted copy sliced by tf.data, the fastest per batch (half the cost of a gather).
            permuted = tf.nest.map_structure(lambda a: a[order], self._arrays)
            return tf.data.Dataset.from_tensor_slices(permuted).batch(self.batch_size)
        # Large data: indices, not data. Each batch gathers its examples from the NumPy arrays themselves, in
        # tf.data's threads (two batches at a time, kept in order, overlapping the step). No copy is made: a
        # permuted copy per epoch, or the 2x the arrays tf.convert_to_tensor takes, is what runs a large data
        # set out of memory. The same batches as the copy.
        indices = tf.data.Dataset.from_tensor_slices(order).batch(self.batch_size)
        return indices.map(self._gather, num_parallel_calls=2)

    def _order(self, n: int, epoch: int) -> np.ndarray:
        """Examples' (PyDataset: batches') order in ``epoch``: a pure function of (seed, epoch) — NumPy's, not
        tf.data's shuffle, whose order also depends on TensorFlow's global seed — so a resumed process sees the
        same epoch whatever it seeded."""
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def _gather(self, indices: tf.Tensor) -> Any:
        """The examples at ``indices`` (a batch), gathered by NumPy from the arrays, with their static shapes."""
        leaves = tf.nest.flatten(self._arrays)

        def take(i: np.ndarray) -> list[np.ndarray]:
            return [leaf[i] for leaf in leaves]

        gathered = tf.numpy_function(take, [indices], [tf.as_dtype(leaf.dtype) for leaf in leaves], stateful=False)
        for tensor, leaf in zip(gathered, leaves, strict=True):
            tensor.set_shape((None, *leaf.shape[1:]))
        return tf.nest.pack_sequence_as(self._arrays, gathered)

    def first_batch(self) -> Any:
        """The first batch, for checking structure before training. Raises DataError when there is none."""
        if self._batches is not None:
            return self._batches.first
        if self._arrays is not None:
            return tf.nest.map_structure(lambda a: tf.convert_to_tensor(a[: self.batch_size]), self._arrays)
        for element in self._dataset.take(1):
            return element
        raise DataError(f"{self.what} is empty: the dataset yields no batches.")
