"""Keras' ``fit``/``evaluate`` arguments, with Keras' meanings, turned into tapeloop's one form of data.

tapeloop's form is ``(inputs, {target name: array})`` (or a dataset of such pairs): sample weights are targets like
any other — ``sample_weight`` for every output, ``sample_weight/<output>`` for one (``losses.sample_weight_key``) —
so a loss callable can read them, and the Keras-style loss entries (``per_output``) apply them as Keras' compiled
losses do. Here Keras' ``x, y, sample_weight, class_weight`` become that form, and ``validation_split`` takes the
last fraction of the arrays before any shuffling, as ``Model.fit`` does.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from losses import sample_weight_key
from trainer.cadence import Every
from trainer.data import Data
from trainer.errors import DataError, names
from trainer.indexed import IndexedBatches

__all__ = [
    "VERBOSE",
    "check_validation_freq",
    "class_weights",
    "eval_budget",
    "fit_data",
    "keras_source",
    "python_source",
    "split_validation",
    "validation_due",
]

VERBOSE = ("auto", 0, 1, 2)
OutputNames = Callable[[Any], list[str]]  # first inputs -> the model's output names


def _first_inputs(x: Any) -> Any:
    return tf.nest.map_structure(lambda a: np.asarray(a)[:1], x)


def _keyed(value: Any, output_names: list[str], what: str, role: str) -> dict[str, Any]:
    """Keras' forms of ``y`` or ``sample_weight`` (a dict, a list in output order, one array) as a dict by output."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (list, tuple)):
        if len(value) != len(output_names):
            raise DataError(
                f"{what}: {role} is a list of {len(value)} arrays but the model has {len(output_names)} outputs "
                f"({names(output_names)}); give one per output, or a dict keyed by output name."
            )
        return dict(zip(output_names, value))
    if len(output_names) != 1 and role == "y":
        raise DataError(
            f"{what}: y is one array but the model has {len(output_names)} outputs ({names(output_names)}); give a "
            "dict {output name: array}."
        )
    return {output_names[0]: value}


def _check_class_weight(class_weight: object, what: str) -> None:
    if not isinstance(class_weight, Mapping):
        raise DataError(
            f"{what}: class_weight must be a dict {{class index: weight}}, got {type(class_weight).__name__}."
        )
    bad = [c for c in class_weight if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0]
    if bad:
        raise DataError(
            f"{what}: class_weight keys must be class indices (ints >= 0); got {', '.join(map(repr, bad))}."
        )
    bad = [c for c, w in class_weight.items() if isinstance(w, bool) or not isinstance(w, (int, float, np.number))]
    if bad:
        raise DataError(
            f"{what}: class_weight values must be numbers; those of classes {', '.join(map(repr, bad))} are not."
        )


def class_weights(y: Any, class_weight: Mapping[int, float]) -> tf.Tensor:
    """Each example's class weight, eagerly (arrays) or in a dataset's graph — Keras' rule
    (``class_weight_to_sample_weights``, ``make_class_weight_map_fn``): a one-hot or probability row counts as its
    argmax, a trailing axis of 1 is dropped, labels are rounded; a class missing from ``class_weight`` weighs 1 (Keras'
    dataset path fails on it)."""
    y = tf.convert_to_tensor(y)
    if y.shape.rank == 0:
        raise DataError(f"class_weight needs a batch of labels; the target is a scalar ({y.dtype.name}).")
    rounded = tf.round(y) if y.dtype.is_floating else y
    if y.shape.rank == 1 or y.shape.rank is None:
        labels = tf.cast(rounded, tf.int64)
    elif y.shape[-1] == 1:
        labels = tf.cast(tf.squeeze(rounded, axis=-1), tf.int64)
    else:  # one-hot or probabilities, also when the width is unknown (then a width of 1 would be argmax 0: Keras')
        labels = tf.argmax(y, axis=-1)
    size = max(class_weight, default=-1) + 1
    table = tf.constant([float(class_weight.get(c, 1.0)) for c in range(size)] or [1.0], tf.float32)
    known = (labels >= 0) & (labels < size)
    return tf.where(known, tf.gather(table, tf.clip_by_value(labels, 0, max(size - 1, 0))), 1.0)


def _with_weights(
    targets: dict[str, Any], sample_weight: Any, class_weight: Any, output_names: list[str], what: str,
    weigh: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """``targets`` with the sample weights added (``weigh=False``: only check that class_weight applies)."""
    if class_weight is not None:
        if sample_weight is not None:
            raise DataError(f"{what}: class_weight and sample_weight exclude each other (as in Keras); give one.")
        if len(targets) != 1:
            raise DataError(
                f"{what}: class_weight applies to a single output (as in Keras); the targets are {names(targets)}. "
                "Give sample_weight per output instead."
            )
        if not weigh:
            return targets
        sample_weight = class_weights(np.asarray(next(iter(targets.values()))), class_weight).numpy()
    if sample_weight is None:
        return targets
    if isinstance(sample_weight, (Mapping, list, tuple)):
        weights = _keyed(sample_weight, output_names, what, "sample_weight")
        unknown = sorted(set(weights) - set(output_names))
        if unknown:
            raise DataError(f"{what}: sample_weight names {names(unknown)}; the outputs are {names(output_names)}.")
        return {**targets, **{sample_weight_key(name): w for name, w in weights.items()}}
    return {**targets, sample_weight_key(): sample_weight}


def _keyed_dataset(
    dataset: tf.data.Dataset, output_names: OutputNames, what: str, class_weight: Mapping[int, float] | None = None
) -> tf.data.Dataset:
    """A dataset of Keras' ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)`` elements in tapeloop's form:
    ``y`` and ``sample_weight`` a dict, a tuple in output order or one tensor, as ``Model.fit`` takes them;
    ``class_weight`` adds each example's class weight as its sample weight, as ``Model.fit`` does."""
    spec = dataset.element_spec
    if isinstance(spec, tf.TypeSpec) or (isinstance(spec, tuple) and len(spec) == 1):
        if class_weight is not None:
            raise DataError(f"{what}: class_weight needs targets, and the dataset's elements are inputs alone.")
        return dataset.map(lambda x: (x, {}))  # inputs alone, as Keras reads them: no targets
    own_form = isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Mapping)
    if not isinstance(spec, tuple) or len(spec) not in (2, 3) or (own_form and class_weight is None):
        return dataset  # tapeloop's form already, or something Data will reject with its own message
    outputs = list(spec[1]) if own_form else output_names(next(iter(dataset.take(1)))[0])
    if not isinstance(spec[1], (Mapping, tuple, list)) and len(outputs) != 1:
        return dataset  # one target tensor for several outputs: Data says the targets must be a dict

    def keyed(x, y, weight=None, graph=True):
        targets = _keyed(y, outputs, what, "y")
        if class_weight is not None:  # the checks of the arrays' path, then the weights in the graph
            _with_weights(targets, weight, class_weight, outputs, what, weigh=False)
            weight = class_weights(next(iter(targets.values())), class_weight) if graph else None
        return x, _with_weights(targets, weight, None, outputs, what)

    keyed(*spec, graph=False)  # the same on the element's structure: a DataError here, not inside tf.data's tracing
    return dataset.map(keyed)


def python_source(
    x: Any, what: str, output_names: OutputNames | None = None, class_weight: Mapping[int, float] | None = None
) -> Any:
    """A ``keras.utils.PyDataset`` as :class:`IndexedBatches` (``output_names`` None: its inputs only, for predict;
    ``class_weight`` weighs each batch's examples by class); a Python generator is refused with what to do instead;
    anything else as given."""
    if isinstance(x, types.GeneratorType):
        raise DataError(
            f"{what}: a Python generator can be read only once; give a keras.utils.PyDataset, or "
            "tf.data.Dataset.from_generator(make_generator, output_signature=...) with a function that makes one."
        )
    if not isinstance(x, keras.utils.PyDataset):
        return x
    if output_names is None:
        return IndexedBatches(x, lambda batch: batch[0], what)

    def key(batch: tuple) -> tuple[Any, dict[str, Any]]:
        inputs, y, weight = (*batch, None, None)[:3]
        if y is None:
            if class_weight is not None:
                raise DataError(f"{what}: class_weight needs targets, and the PyDataset's batches are inputs alone.")
            return inputs, {}
        outputs = output_names(inputs)
        return inputs, _with_weights(_keyed(y, outputs, what, "y"), weight, class_weight, outputs, what)

    return IndexedBatches(x, key, what)


def keras_source(
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    class_weight: Mapping[int, float] | None = None,
    *,
    what: str,
    output_names: OutputNames,
) -> Any:
    """``x``/``y``/``sample_weight``/``class_weight`` as ``Model.fit`` takes them, in tapeloop's form.

    ``y=None`` keeps tapeloop's own forms (``x = (inputs, {name: array})`` or a dataset); any other ``x`` (an array,
    a dict, a list or tuple of other than two) is inputs alone, with no targets, as in ``Model.fit(x)``.
    ``y`` may be a dict by output name, a list in output order, or one array for a single-output model.
    """
    if class_weight is not None:
        _check_class_weight(class_weight, what)
    x = python_source(x, what, output_names, class_weight)
    if isinstance(x, (tf.data.Dataset, IndexedBatches)):
        if y is not None or sample_weight is not None:
            raise DataError(
                f"{what}: y and sample_weight must be None when x is a tf.data.Dataset or a PyDataset: its elements "
                "carry the targets (and sample weights, as a third element)."
            )
        return x if isinstance(x, IndexedBatches) else _keyed_dataset(x, output_names, what, class_weight)
    if y is None:
        if sample_weight is not None or class_weight is not None:
            raise DataError(f"{what}: sample_weight and class_weight need y (or x = (inputs, {{name: target}})).")
        if isinstance(x, (tuple, list)) and len(x) == 2:
            return x  # tapeloop's (inputs, {name: target}); Data names what is wrong with any other pair
        return x, {}  # inputs alone, as Model.fit(x) takes them: a loss that reads no target
    needs_names = not isinstance(y, Mapping) or isinstance(sample_weight, (Mapping, list, tuple))
    outputs = output_names(_first_inputs(x)) if needs_names else list(y)
    targets = _with_weights(_keyed(y, outputs, what, "y"), sample_weight, class_weight, outputs, what)
    return x, targets


def split_validation(source: Any, fraction: float) -> tuple[Any, Any]:
    """``validation_split``: the last ``fraction`` of the arrays, taken before any shuffling (as ``Model.fit``)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"`validation_split` must be a number in [0, 1), got {fraction!r}.")
    if isinstance(source, tf.data.Dataset) or not isinstance(source, (tuple, list)) or len(source) != 2:
        raise DataError("validation_split needs numpy data (x, y); for a tf.data.Dataset pass validation_data instead.")
    leaves = tf.nest.flatten(source)
    n = len(leaves[0])
    split_at = math.floor(n * (1.0 - fraction))
    if split_at in (0, n):
        raise DataError(f"validation_split={fraction} leaves no training or no validation example of {n}.")
    part = lambda lo, hi: tf.nest.map_structure(lambda a: np.asarray(a)[lo:hi], source)  # noqa: E731
    return part(0, split_at), part(split_at, n)


def check_validation_freq(validation_freq: object) -> None:
    """Keras' forms: a positive int, or a list of positive (1-based) epoch numbers."""
    values = validation_freq if isinstance(validation_freq, (list, tuple, set)) else [validation_freq]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in values):
        raise ValueError(
            f"`validation_freq` must be a positive int or a list of epoch numbers (from 1), got {validation_freq!r}."
        )


def validation_due(epoch: int, validation_freq: int | Sequence[int]) -> bool:
    """Keras' ``validation_freq``: an int validates every that many epochs, a list on those (1-based) epochs."""
    if isinstance(validation_freq, (list, tuple, set)):
        return epoch + 1 in validation_freq
    return Every(validation_freq).due(epoch, epoch + 1)


def fit_data(
    x: Any,
    y: Any,
    *,
    sample_weight: Any,
    class_weight: Mapping[int, float] | None,
    validation_split: float,
    validation_data: Any,
    batch_size: int | None,
    validation_batch_size: int | None,
    shuffle: bool,
    seed: int,
    output_names: OutputNames,
    steps: tuple[int | None, int | None] = (None, None),
) -> tuple[Data, Data | None]:
    """The training and validation data of a ``fit`` call, from ``Model.fit``'s arguments; ``steps``
    (``steps_per_epoch``, ``validation_steps``) must be given for infinite data."""
    source = keras_source(x, y, sample_weight, class_weight, what="training data", output_names=output_names)
    val_source = None
    if validation_data is not None:  # Keras ignores validation_split when validation_data is given
        if isinstance(validation_data, (tf.data.Dataset, keras.utils.PyDataset)):
            val_source = keras_source(validation_data, what="validation data", output_names=output_names)
        elif isinstance(validation_data, (tuple, list)) and len(validation_data) in (1, 2, 3):  # Keras': (x,) too
            val_source = keras_source(*validation_data, what="validation data", output_names=output_names)
        else:
            raise DataError(
                "validation data must be (x,), (x, y), (x, y, sample_weight) or a tf.data.Dataset; got "
                f"{type(validation_data).__name__}."
            )
    elif validation_split:
        source, val_source = split_validation(source, validation_split)
        if class_weight is not None:  # Keras weighs only the training examples by class, not the validation split
            val_source = val_source[0], {k: v for k, v in val_source[1].items() if k != sample_weight_key()}
    train = Data(source, what="training data", batch_size=batch_size, shuffle=shuffle, seed=seed)
    train.check_finite(steps[0], "steps_per_epoch")
    val = None
    if val_source is not None:
        val_batch = (
            None if isinstance(val_source, (tf.data.Dataset, IndexedBatches)) else validation_batch_size or batch_size
        )
        val = Data(val_source, what="validation data", batch_size=val_batch)
        val.check_finite(steps[1], "validation_steps")
    return train, val


def eval_budget(data: Data, steps: int | None) -> tuple[int | None, bool]:
    """(steps to evaluate, whether the data surely holds them): all batches, or the first ``steps`` (as Keras)."""
    if steps is None:
        return data.steps, data.steps is not None
    if data.steps is None:
        return steps, False
    return min(steps, data.steps), True
