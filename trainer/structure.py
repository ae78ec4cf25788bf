"""What flows between model, losses and data: output dicts, and read-checked views of outputs and targets.

``as_output_dict`` applies the design card's keying rules to whatever the model returns. ``KeyedView`` is the
mapping a loss or metric receives: reading a key that does not exist raises :class:`MissingKeyError` naming the
reader, the key and the keys that exist, instead of a bare ``KeyError``.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator, Mapping, Sequence

import keras
import tensorflow as tf

from trainer.errors import OWN_ERRORS, MissingKeyError, UserCodeError, describe_tensors, names

__all__ = [
    "KeyedView",
    "as_output_dict",
    "batch_size_of",
    "by_output_order",
    "call_reader",
    "given",
    "graph_ready",
    "keyed",
    "no_lists",
    "output_hint",
    "preserved",
]


def as_output_dict(value: object, output_names: Sequence[str] | None) -> dict[str, tf.Tensor]:
    """Key a model's return value: a dict of tensors as is, a list/tuple by ``output_names`` (none: ``output_1``,
    ``output_2``, ...), a single tensor as ``"output"``."""
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"The model returned a dict with non-str keys {bad!r}; output names must be str.")
        for key, item in value.items():
            if _tensor_like(item):
                continue
            if not isinstance(item, Mapping) or not item:
                raise TypeError(f"The model's output {key!r} is a {type(item).__name__}, not a tensor.")
            first = next(iter(item))
            raise TypeError(
                f"The model's output {key!r} is a dict (keys {names(list(item))}); tapeloop keys outputs one level "
                f"deep: return a flat dict of tensors (e.g. '{key}_{first}' for outputs[{key!r}][{first!r}])."
            )
        return dict(value)
    if isinstance(value, (list, tuple)):
        output_names = output_names or positional_names(len(value))
        if len(output_names) != len(value):
            raise TypeError(
                f"The model returned {len(value)} outputs as a {type(value).__name__}, but its output names are "
                f"{list(output_names or [])!r}; return a dict {{name: tensor}} or give the model named outputs."
            )
        return dict(zip(output_names, value))
    if _tensor_like(value):
        return {"output": value}
    raise TypeError(
        f"The model returned {type(value).__name__}; expected a tensor, a list/tuple of tensors or a dict of them."
    )


def _tensor_like(value: object) -> bool:
    return tf.is_tensor(value) or (hasattr(value, "shape") and hasattr(value, "dtype"))


def positional_names(count: int) -> list[str]:
    """Names for outputs returned as a list/tuple by a model that has no output names (a subclassed Keras model):
    ``output_1``, ``output_2``, ... (tf.keras 2's names for them)."""
    return [f"output_{i}" for i in range(1, count + 1)]


def by_output_order(what: str, value: object, model: object, *, per_output: bool = True) -> object:
    """Keras compile's list form of ``loss``, ``loss_weights`` or ``metrics`` — one entry per output in
    ``model.output_names`` order, None for none — as the dict by output name tapeloop takes; other values as given.

    ``per_output=False`` (``metrics``): a list of lists, or a flat list of one metric per output of a model with
    several (as Keras); another flat list is Keras' one-output form.
    """
    if not isinstance(value, (list, tuple)) or not value:
        return value
    outputs = list(getattr(model, "output_names", None) or [])
    nested = all(entry is None or isinstance(entry, (list, tuple)) for entry in value)
    if not (per_output or nested or (len(outputs) > 1 and len(value) == len(outputs))):
        return value
    single = _single_output_layer(model)
    if len(value) == 1 and len(outputs) < 2 and single is not None:
        return value[0]  # Keras' list form for a one-output model (a Sequential has no output_names): the entry
    if not outputs and single is None and len(value) > 1:
        outputs = positional_names(len(value))  # a subclassed model's tuple, keyed so by as_output_dict
    if len(outputs) < 2:
        raise TypeError(
            f"`{what}` is a list, Keras' form for a model with several outputs (read in model.output_names order); "
            f"this model has {names(outputs) if outputs else 'no output_names'}: give a dict {{output name: ...}}"
            + (" or the loss itself." if what == "loss" else ".")
        )
    if len(value) != len(outputs):
        raise ValueError(
            f"`{what}` is a list of {len(value)} but the model has {len(outputs)} outputs ({names(outputs)}); give "
            "one entry per output, in that order, or a dict by output name."
        )
    return dict(zip(outputs, value))  # None: no loss (weight, metrics) for that output, as the dict form


def no_lists(structure: object) -> object:
    """Lists as tuples: tf.data reads a list as one tensor to stack, Keras a list of inputs as several inputs."""
    if isinstance(structure, list):
        return tuple(no_lists(value) for value in structure)
    if isinstance(structure, Mapping):
        return {key: no_lists(value) for key, value in structure.items()}
    if type(structure) is tuple:
        return tuple(no_lists(value) for value in structure)
    return structure


def _single_output_layer(model: object) -> str | None:
    """The name of the layer making a one-output Keras model's output (Keras' output name), else None."""
    try:
        outputs = list(getattr(model, "outputs", None) or [])
    except Exception:  # a subclassed model not built yet
        return None
    if len(outputs) != 1:
        return None
    names_ = list(getattr(model, "output_names", None) or [])
    if names_:
        return names_[0]
    layers = getattr(model, "layers", None) or []
    return layers[-1].name if layers else None


def output_hint(model: object) -> Callable[[str], str]:
    """A function giving an extra hint for a missing output name, e.g. when it names an inner layer of the model."""

    def hint(key: str) -> str:
        get_layer = getattr(model, "get_layer", None)
        if get_layer is None:
            return ""
        if key == _single_output_layer(model):
            return (
                f" {key!r} makes the model's only output, which the model returns as one tensor: tapeloop names it "
                "'output' (read outputs['output']; a Keras loss name or object can be given alone, loss='mse')."
            )
        try:
            get_layer(key)
        except ValueError:
            return ""
        return (
            f" {key!r} is a layer inside the model but not one of its outputs: give the output layers "
            "themselves these names (name=... on the layer that produces each output)."
        )

    return hint


class KeyedView(Mapping):
    """A read-only mapping of outputs or targets that names the reader when a key is missing."""

    def __init__(self, data: Mapping[str, tf.Tensor], *, kind: str, reader: str, hint=None) -> None:
        self._data = data
        self._kind = kind  # "output" or "target"
        self._reader = reader  # e.g. "loss 'det'"
        self._hint = hint

    def __getitem__(self, key: str) -> tf.Tensor:
        try:
            return self._data[key]
        except KeyError:
            where = "the model's outputs" if self._kind == "output" else "the data's targets"
            extra = self._hint(key) if self._hint else ""
            raise MissingKeyError(
                f"{self._reader} reads {self._kind} {key!r}, which does not exist; {where} are: "
                f"{names(self._data)}.{extra}",
                key,
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"KeyedView({self._kind}s: {names(self._data)})"


def batch_size_of(inputs: object) -> tf.Tensor:
    """The number of examples in a batch, as float32 (the weight of the batch in epoch means)."""
    first = tf.nest.flatten(inputs)[0]
    return tf.cast(tf.shape(first)[0], tf.float32)


def graph_ready(fn: Callable) -> Callable:
    """A user's loss as autograph converts it: a Python ``if``/``for`` on tensors becomes graph control flow.

    The compiled blocks are traced without autograph (tapeloop's own code has no such flow, and converting it cost
    ~3 s at every process's first fit), so user code is converted here, once and alone. Keras', TensorFlow's and
    tapeloop's own callables are called as written (Keras 3 converts none of its code either).
    """
    target = fn if isinstance(fn, (types.FunctionType, types.MethodType)) else type(fn).__call__
    if (getattr(target, "__module__", None) or "").split(".")[0] in ("keras", "tensorflow", "losses", "trainer"):
        return fn
    try:
        if isinstance(fn, types.MethodType):
            return functools.partial(tf.autograph.to_graph(fn.__func__), fn.__self__)
        if isinstance(fn, types.FunctionType):
            return tf.autograph.to_graph(fn)
        return functools.partial(tf.autograph.to_graph(type(fn).__call__), fn)
    except Exception:  # not convertible (a builtin, a C extension, a partial): called as written
        return fn


def call_reader(
    fn: Callable, outputs: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor], *, reader: str, hint=None
) -> object:
    """Call a loss or metric ``fn(outputs, targets)``: a missing key is reported with context, and any other error
    it raises becomes a :class:`UserCodeError` naming ``reader`` and listing every output and target it was given."""
    call = graph_ready(fn)  # (autograph's own cache makes this cheap after the first time)
    try:
        if not isinstance(fn, keras.layers.Layer):
            return call(
                KeyedView(outputs, kind="output", reader=reader, hint=hint),
                KeyedView(targets, kind="target", reader=reader),
            )
        # Keras layers accept only plain nested structures as positional arguments: pass dicts.
        return call(dict(outputs), dict(targets))
    except OWN_ERRORS:
        raise
    except KeyError as err:  # a Layer's dict lookup
        key = err.args[0] if err.args else None
        if key in outputs or key in targets:
            raise UserCodeError(reader, err, given(outputs, targets)) from err
        raise MissingKeyError(
            f"{reader} reads {key!r}, which is neither an output nor a target; the model's outputs are "
            f"{names(outputs)} and the data's targets are {names(targets)}.",
            key,
        ) from None
    except Exception as err:
        hint = KERAS_STYLE_HINT if isinstance(err, (TypeError, AttributeError)) else ""
        raise UserCodeError(reader, err, given(outputs, targets), hint) from err


KERAS_STYLE_HINT = (
    "A loss or metric callable receives (outputs, targets), two dicts keyed by name; for a Keras-style "
    "fn(y_true, y_pred) on one output, use losses.per_output(fn, output=...)."
)


@contextlib.contextmanager
def preserved(variables: Sequence[tf.Variable]) -> Iterator[None]:
    """Leave ``variables`` as they were: a pass that only inspects (the first-batch check) must not advance a random
    generator's state or any other state a forward pass touches."""
    saved = [(variable, tf.identity(variable)) for variable in variables]
    try:
        yield
    finally:
        for variable, value in saved:
            variable.assign(value)


def keyed(structure: object) -> dict[str, object]:
    """A nested structure of tensors as a flat ``{name: tensor}`` dict (dict keys, or positions), for messages."""
    if isinstance(structure, Mapping):
        return dict(structure)
    if isinstance(structure, (list, tuple)):
        return {str(i): value for i, value in enumerate(structure)}
    return {"x": structure}


def given(outputs: Mapping[str, object], targets: Mapping[str, object]) -> list[str]:
    """What a loss or metric was given, a line per tensor (for error messages)."""
    return describe_tensors("output", outputs) + describe_tensors("target", targets)
