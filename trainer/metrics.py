"""Metrics: observed, never optimised.

Two forms, in one dict: ``{output name: [str | keras.metrics.Metric, ...]}`` (a Keras metric on one output and the
target of the same name, logged as ``output/metric``) and ``{name: callable(outputs, targets)}`` (any function of all
outputs and targets, following the loss protocol; logged as ``name`` or ``name/part``). ``weighted_metrics`` takes
the first form: those are updated with the batch's sample weights (``sample_weight``, ``class_weight``), as Keras'.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence

import keras
import tensorflow as tf

from losses import components
from losses.adapters import binary_or_sparse, display_name, sample_weight_of
from trainer.errors import OWN_ERRORS, UserCodeError, describe_tensors, names
from trainer.structure import KeyedView, call_reader

__all__ = ["MetricSpec"]


def _metric_names() -> list[str]:
    """Every metric name tapeloop accepts (Keras' functions and its own "accuracy"/"acc"), for suggestions."""
    keras_names = {n for n in dir(keras.metrics) if not n.startswith("_") and n.islower() and n != "get"}
    return sorted(keras_names | {"accuracy", "acc"})


def _resolve(identifier: object, y_true: tf.Tensor, y_pred: tf.Tensor, output: str) -> keras.metrics.Metric:
    """A fresh Keras metric object for ``identifier`` on this output/target pair; a Metric object that its config
    cannot rebuild (a custom metric without ``get_config``) is used itself, in every mode, as Keras uses it."""
    if isinstance(identifier, keras.metrics.Metric):
        try:
            return type(identifier).from_config(identifier.get_config())
        except (TypeError, ValueError):
            return identifier
    if isinstance(identifier, str):
        if identifier.lower() in ("accuracy", "acc"):
            is_binary, is_sparse = binary_or_sparse(y_true, y_pred)
            cls = (
                keras.metrics.BinaryAccuracy
                if is_binary
                else keras.metrics.SparseCategoricalAccuracy
                if is_sparse
                else keras.metrics.CategoricalAccuracy
            )
            return cls(name=identifier)
        try:
            resolved = keras.metrics.get(identifier)
        except ValueError:
            close = difflib.get_close_matches(identifier, _metric_names(), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"Unknown Keras metric {identifier!r} for output {output!r}.{hint}") from None
        if isinstance(resolved, keras.metrics.Metric):
            resolved.name = identifier
            return resolved
        return keras.metrics.MeanMetricWrapper(resolved, name=identifier)
    return keras.metrics.MeanMetricWrapper(identifier, name=getattr(identifier, "__name__", "metric"))


class MetricSpec:
    """The metrics a Trainer observes; :meth:`build` makes a fresh set of Keras metric objects per mode."""

    def __init__(
        self,
        metrics: Mapping[str, object] | Sequence[object] | None,
        weighted_metrics: Mapping[str, object] | Sequence[object] | None = None,
    ) -> None:
        self.per_output: dict[str, list[object]] = {}
        self.weighted: dict[str, list[object]] = {}  # updated with the batch's sample weights, as Keras' own
        self.callables: dict[str, Callable] = {}
        self._output_of: dict[str, str] = {}
        self._weighted_keys: set[str] = set()
        self._unbound: dict[str, list[object]] = {}  # Keras-style lists, for the model's single output
        self._plain = False  # keys without the output prefix (the list form)
        self.keras_names: dict[str, str] = {}  # logged key -> Keras' log name (set by build)
        self.keras_listed: list[str] = []  # the names Model.evaluate lists first (its CompileMetrics' metrics)
        self._parse("metrics", metrics, self.per_output)
        self._parse("weighted_metrics", weighted_metrics, self.weighted)

    def _parse(self, what: str, metrics: object, per_output: dict[str, list[object]]) -> None:
        if metrics is None:
            return
        if isinstance(metrics, (list, tuple)):
            self._unbound[what] = self._entries(what, list(metrics))
            return
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"`{what}` must be a dict ({{output: [metrics]}} and/or {{name: callable}}) or, for a single-output "
                f"model, a list of Keras metrics; got {type(metrics).__name__}."
            )
        for key, value in metrics.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"{what} keys must be non-empty str; got {key!r}.")
            if value is None:  # none for this output, as Keras
                continue
            if isinstance(value, (list, tuple)):
                entries = list(value)
            elif isinstance(value, (str, keras.metrics.Metric)):
                entries = [value]
            elif callable(value) and what == "metrics":
                self.callables[key] = value
                continue
            else:
                raise TypeError(
                    f"{what}[{key!r}] is a {type(value).__name__}; expected a list of Keras metrics for output {key!r}"
                    + (
                        " or a callable metric(outputs, targets)."
                        if what == "metrics"
                        else " (a callable metric(outputs, targets) goes in `metrics` and reads the targets' "
                        "'sample_weight' itself)."
                    )
                )
            per_output[key] = self._entries(f"{what}[{key!r}]", entries)

    @staticmethod
    def _entries(where: str, entries: list[object]) -> list[object]:
        # A Metric class is one of its kind, as Keras' compile makes it (metrics=[keras.metrics.AUC]).
        entries = [e() if isinstance(e, type) and issubclass(e, keras.metrics.Metric) else e for e in entries]
        for entry in entries:
            if not (isinstance(entry, (str, keras.metrics.Metric)) or callable(entry)):
                raise TypeError(f"{where} holds {entry!r}; expected a metric name or Metric object.")
        seen = [display_name(e) for e in entries]
        dupes = sorted({n for n in seen if seen.count(n) > 1})
        if dupes:
            raise ValueError(f"{where} names {names(dupes)} more than once.")
        return entries

    def bind_outputs(self, output_names: list[str]) -> None:
        """Bind a Keras-style ``metrics=[...]`` list to the model's single output; logged by metric name alone,
        as Keras logs them (``mae``, ``val_mae``)."""
        if not self._unbound:
            return
        if len(output_names) != 1:
            what = next(iter(self._unbound))
            raise ValueError(
                f"`{what}` is a list, which applies to a single-output model (or, as Keras, holds one metric per "
                f"output), but the model has {len(output_names)} outputs ({names(output_names)}); give a dict "
                "{output: [metrics]}."
            )
        for what, entries in self._unbound.items():
            (self.per_output if what == "metrics" else self.weighted)[output_names[0]] = entries
        self._unbound, self._plain = {}, True

    def build(
        self, outputs: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor], output_hint=None
    ) -> dict[str, keras.metrics.Metric]:
        """Fresh Keras metric objects keyed ``output/name``, resolved from the shapes of outputs and targets."""
        built: dict[str, keras.metrics.Metric] = {}
        single = len(outputs) == 1  # Keras prefixes metric names with the output's only with several outputs
        self.keras_listed = []
        for weighted, group in ((False, self.per_output), (True, self.weighted)):
            for output, entries in group.items():
                reader = f"{'weighted_' * weighted}metrics[{output!r}]"
                y_pred = KeyedView(outputs, kind="output", reader=reader, hint=output_hint)[output]
                y_true = KeyedView(targets, kind="target", reader=reader)[output]
                for entry in entries:
                    name = display_name(entry)
                    key = name if self._plain else f"{output}/{name}"
                    twin = key in built  # as Keras names a weighted metric that has an unweighted twin
                    if twin:
                        key = f"weighted_{name}" if self._plain else f"{output}/weighted_{name}"
                    short = f"weighted_{name}" if twin else name
                    self.keras_names[key] = short if single else f"{output}_{short}"
                    self.keras_listed.append(name)
                    built[key] = _resolve(entry, y_true, y_pred, output)
                    self._output_of[key] = output
                    if weighted:
                        self._weighted_keys.add(key)
        return built

    def update(
        self,
        metric_objects: Mapping[str, keras.metrics.Metric],
        outputs: Mapping[str, tf.Tensor],
        targets: Mapping[str, tf.Tensor],
    ) -> None:
        """Update every Keras metric on its output/target pair (in the compiled step)."""
        for key, metric in metric_objects.items():
            output = self._output_of[key]
            weight = sample_weight_of(targets, output) if key in self._weighted_keys else None
            metric.update_state(targets[output], outputs[output], sample_weight=weight)

    def check(
        self,
        metric_objects: Mapping[str, keras.metrics.Metric],
        outputs: Mapping[str, tf.Tensor],
        targets: Mapping[str, tf.Tensor],
    ) -> None:
        """Update each Keras metric once, eagerly, on the first batch and reset it, so a metric that cannot take its
        output and target fails before any update, by name, with their shapes (in the step it would fail without
        a name, or at trace time with TensorFlow's error)."""
        for key, metric in metric_objects.items():
            output = self._output_of[key]
            try:
                self.update({key: metric}, outputs, targets)
            except OWN_ERRORS:
                raise
            except Exception as err:
                given = describe_tensors("target", {output: targets[output]})
                given += describe_tensors("output", {output: outputs[output]})
                raise UserCodeError(f"Keras metric {metric.name!r} on output {output!r}", err, given) from err
            finally:
                metric.reset_state()

    def keras_list(self, logs: Mapping[str, float], loss_names: Mapping[str, str | None]) -> float | list[float]:
        """``Model.evaluate(return_dict=False)``'s list, by Keras' rule (``_flatten_metrics_in_order`` in
        keras/src/trainers/trainer.py): ``loss``, the metrics' own names in compile's order (they match only for a
        one-output model), each output's loss (``loss_names``: logged key -> Keras' name, None for a value Keras does
        not log), then every other value sorted by its Keras name. A name may come twice, as in Keras; one value
        alone."""
        keras_names = {**self.keras_names, **loss_names}
        renamed = {key: keras_names.get(key, key) for key in logs}
        named = {renamed[key]: value for key, value in logs.items() if renamed[key] is not None}
        listed = ["loss", *self.keras_listed, *(name for name in loss_names.values() if name)]
        values = [named[name] for name in listed if name in named]
        values += [named[name] for name in sorted(named) if name not in listed]
        return values[0] if len(values) == 1 else values

    def callable_values(
        self, outputs: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor], output_hint=None
    ) -> dict[str, tf.Tensor]:
        """The values of the metric callables, normalised like loss components (``name`` or ``name/part``)."""
        found: dict[str, tf.Tensor] = {}
        for name, fn in self.callables.items():
            value = call_reader(fn, outputs, targets, reader=f"metric {name!r}", hint=output_hint)
            found.update(components(name, value, kind="metric"))
        return found
