"""Loss weightings: per-component weights learned or derived from the components themselves.

- :class:`GradNorm` (Chen et al. 2018) and :class:`DWA` (Liu et al. 2019) multiply each component's loss weight by
  a factor they keep (``Trainer(aggregator=GradNorm(1.5))``; logged ``loss_weight/<key>``);
- :class:`UncertaintyWeighting` (below) wraps the losses themselves.

Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): learned per-task weights from homoscedastic noise.

Each component k of the wrapped losses gets a trainable log-variance s_k (initial 0). The optimised terms are

    regression components:      0.5 · exp(-s_k) · L_k + 0.5 · s_k     (1/(2σ²)·L + log σ)
    classification components:  exp(-s_k) · L_k + 0.5 · s_k           (1/σ²·L + log σ)

What is logged: the loss returns these terms as its components (so ``loss`` is the optimised objective); add
``metrics={"uw": weighting.observe}`` to log the raw component values (``uw/<key>``) and the learned weights
(``uw/weight/<key>`` = exp(-s_k), the factor in front of L_k before the 0.5 of regression terms).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import tensorflow as tf

from losses.protocol import check_number, components

__all__ = ["DWA", "GradNorm", "LossWeighting", "UncertaintyWeighting"]


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
        if not isinstance(losses, Mapping) or not all(callable(fn) for fn in losses.values()):
            raise TypeError(f"UncertaintyWeighting takes {{name: loss callable(outputs, targets)}}, got {losses!r}.")
        if not losses:
            raise ValueError("UncertaintyWeighting needs at least one loss.")
        self.losses = dict(losses)
        self.regression = {regression} if isinstance(regression, str) else set(regression)
        self.log_variances: dict[str, tf.Variable] = {}
        if keys is not None:
            self._create(list(keys))

    def _create(self, keys: list[str]) -> None:
        unknown = sorted(self.regression - set(keys))
        if unknown:  # a misspelt key would silently be weighed as classification (twice the regression term)
            raise ValueError(
                f"UncertaintyWeighting: regression names {', '.join(map(repr, unknown))}, which are not component keys;"
                f" the keys are {', '.join(map(repr, keys))}."
            )
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


class LossWeighting(tf.Module):
    """Base class: one factor per component (``factors``, initially 1), multiplied into its loss weight.

    The Trainer calls :meth:`build` with the component keys, reads ``factors`` at every step and logs them as
    ``loss_weight/<key>``; :meth:`observe` (in the step, after an update, when ``needs_jacobian``) and
    :meth:`end_epoch` (on the host) change them. Every state is a variable: checkpoints hold it.
    """

    needs_jacobian = False

    def build(self, keys: Sequence[str]) -> None:
        """Create the state for the components ``keys``."""
        self.keys = list(keys)
        with self.name_scope:
            self.factors = tf.Variable(tf.ones([len(self.keys)]), trainable=False, name="factors")

    def observe(self, gramian: tf.Tensor, values: tf.Tensor) -> None:
        """After an applied step: the weighted components' Gramian over the shared variables, their values."""

    def end_epoch(self, means: Mapping[str, float]) -> None:
        """After an epoch: each component's epoch mean (unweighted), by key."""


class GradNorm(LossWeighting):
    """GradNorm (Chen et al., ICML 2018): factors learned so that the components' gradient norms on the shared
    variables train at similar rates.

    At each step, with G_i the norm of weighted component i's gradient over the shared variables, L̃_i its loss over
    its first step's loss and r_i = L̃_i / mean(L̃), the factors take one gradient step of ``learning_rate`` on
    Σ_i |G_i - mean(G)·r_i^alpha| (the target held constant), are kept positive and renormalised to sum m.

    Args:
        alpha: how strongly slower-training components are pulled up (the paper's α; 0 equalises the norms).
        learning_rate: the factors' step size (plain gradient descent).
    """

    needs_jacobian = True

    def __init__(self, alpha: float = 1.5, learning_rate: float = 0.025) -> None:
        super().__init__(name="gradnorm")
        self.alpha = check_number("GradNorm's alpha", alpha, at_least=0)
        self.learning_rate = check_number("GradNorm's learning_rate", learning_rate, above=0)

    def build(self, keys: Sequence[str]) -> None:
        super().build(keys)
        with self.name_scope:
            self.initial = tf.Variable(tf.zeros([len(self.keys)]), trainable=False, name="initial_losses")
            self.started = tf.Variable(False, trainable=False, name="started")

    def observe(self, gramian: tf.Tensor, values: tf.Tensor) -> None:
        values = tf.cast(values, tf.float32)
        initial = tf.where(self.started, self.initial, values)
        self.initial.assign(initial)
        self.started.assign(True)
        norms = tf.cast(tf.sqrt(tf.maximum(tf.linalg.diag_part(gramian), 0.0)), tf.float32)
        ratios = tf.math.divide_no_nan(values, initial)
        rates = tf.math.divide_no_nan(ratios, tf.reduce_mean(ratios))
        target = tf.reduce_mean(norms) * rates**self.alpha
        factors = tf.convert_to_tensor(self.factors)
        # d G_i / d factor_i = G_i / factor_i (G_i is the norm of factor_i·w_i·∇L_i)
        grad = tf.sign(norms - target) * tf.math.divide_no_nan(norms, factors)
        updated = tf.maximum(factors - self.learning_rate * grad, 1e-3)
        self.factors.assign(updated * len(self.keys) / tf.reduce_sum(updated))

    def __repr__(self) -> str:
        return f"GradNorm(alpha={self.alpha}, learning_rate={self.learning_rate})"


class DWA(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019): after each epoch t (from the third on),
    factor_i = m·softmax_i(r_i / temperature) with r_i = L_i(t-1) / L_i(t-2), the ratio of component i's last
    two epoch means; 1 for the first two epochs.

    Args:
        temperature: the softmax temperature T (the paper's 2; large T gives equal weights).
    """

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__(name="dwa")
        self.temperature = check_number("DWA's temperature", temperature, above=0)

    def build(self, keys: Sequence[str]) -> None:
        super().build(keys)
        with self.name_scope:
            self.history = tf.Variable(tf.zeros([2, len(self.keys)]), trainable=False, name="last_two_epochs")
            self.epochs = tf.Variable(0, trainable=False, name="epochs_seen")

    def end_epoch(self, means: Mapping[str, float]) -> None:
        missing = [key for key in self.keys if key not in means]
        if missing:
            raise KeyError(f"DWA needs the epoch means of {missing}; the logs hold {sorted(means)}.")
        latest = tf.constant([means[key] for key in self.keys], tf.float32)
        self.history.assign(tf.stack([self.history[1], latest]))
        self.epochs.assign_add(1)
        if int(self.epochs.numpy()) >= 2:
            ratios = tf.math.divide_no_nan(self.history[1], self.history[0])
            self.factors.assign(len(self.keys) * tf.nn.softmax(ratios / self.temperature))

    def __repr__(self) -> str:
        return f"DWA(temperature={self.temperature})"
