"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): learned per-task weights from homoscedastic noise.

Each component k of the wrapped losses gets a trainable log-variance s_k (initial 0). The optimised terms are

    regression components:      0.5 · exp(-s_k) · L_k + 0.5 · s_k     (1/(2σ²)·L + log σ)
    classification components:  exp(-s_k) · L_k + 0.5 · s_k           (1/σ²·L + log σ)

What is logged: the loss returns these terms as its components (so ``loss`` is the optimised objective); add
``metrics={"uw": weighting.observe}`` to log the raw component values (``uw/<key>``) and the learned weights
(``uw/weight/<key>`` = exp(-s_k), the factor in front of L_k before the 0.5 of regression terms).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import tensorflow as tf

from losses.protocol import components

__all__ = ["UncertaintyWeighting"]


class UncertaintyWeighting(tf.Module):
    """Wrap named losses; learn one log-variance per component.

    Args:
        losses: ``{name: loss}``; each loss follows the protocol (a scalar gives key ``name``, a dict ``name/part``).
        regression: component keys treated as regression (the ½ factor on the loss term); others as classification.
        keys: the component keys, if known: creates the variables now. Otherwise they are created at the first
            call, which must be eager (the Trainer's structure check is).
    """

    def __init__(
        self,
        losses: Mapping[str, Callable],
        *,
        regression: Iterable[str] = (),
        keys: Iterable[str] | None = None,
        name: str = "uncertainty_weighting",
    ) -> None:
        super().__init__(name=name)
        if not losses:
            raise ValueError("UncertaintyWeighting needs at least one loss.")
        self.losses = dict(losses)
        self.regression = set(regression)
        self.log_variances: dict[str, tf.Variable] = {}
        if keys is not None:
            self._create(list(keys))

    def _create(self, keys: list[str]) -> None:
        with self.name_scope:
            for key in keys:
                self.log_variances[key] = tf.Variable(0.0, name=f"log_variance_{key.replace('/', '_')}")

    def raw(self, outputs: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """The unweighted components of the wrapped losses."""
        values: dict[str, tf.Tensor] = {}
        for name, fn in self.losses.items():
            values.update(components(name, fn(outputs, targets)))
        if not self.log_variances:
            if not tf.executing_eagerly():
                raise RuntimeError(
                    "UncertaintyWeighting creates its variables at the first call, which must be eager; pass keys=."
                )
            self._create(list(values))
        missing = sorted(set(values) - set(self.log_variances))
        if missing:
            raise KeyError(f"UncertaintyWeighting has no log-variance for component(s) {missing}; pass keys=.")
        return values

    def __call__(self, outputs: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        terms = {}
        for key, value in self.raw(outputs, targets).items():
            s = self.log_variances[key]
            half = 0.5 if key in self.regression else 1.0
            terms[key] = half * tf.exp(-s) * value + 0.5 * s
        return terms

    def observe(self, outputs: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """A metric callable: the raw components and the learned weights exp(-s) (recomputes the losses)."""
        values = self.raw(outputs, targets)
        return {**values, **{f"weight/{k}": tf.exp(-self.log_variances[k]) for k in values}}
