"""Multi-task aggregators: one update direction from the gradients of several loss components.

An aggregator maps the m x n matrix J, whose row i is the gradient of weighted component i over the shared
variables, to one direction d = Jᵀw. Each one here is defined by its weights w, a function of the Gramian
G = J Jᵀ (m x m) alone — so a training step never builds J: it sums per-variable dot products into G, asks
:meth:`Aggregator.weights` and combines the per-variable gradients with w. Called on a matrix,
``aggregator(J)`` does the same and returns d (float32 or float64, J's dtype).

The quadratic programs (UPGrad, DualProj, MGDA, CAGrad) are solved exactly (``losses/qp.py``). Where TorchJD
differs: it normalises the Gramian and adds 1e-4·I before projecting (UPGrad, DualProj: 0.2-1 % off the exact
projection, 9 % when rows are 1000x apart in scale) and stops MGDA's Frank-Wolfe at a step below 1e-3; here the
projections and the min-norm point are exact. Mean, IMTLG, PCGrad, AlignedMTL and CAGrad follow TorchJD's
definitions (tests/data holds reference values computed once with TorchJD 0.18).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from losses.protocol import check_number
from losses.qp import divisor, dual_cone_weights, simplex_weights
from losses.weighting import DWA, GradNorm, LossWeighting

__all__ = [
    "AGGREGATORS",
    "IMTLG",
    "MGDA",
    "WEIGHTINGS",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "Mean",
    "PCGrad",
    "Sum",
    "UPGrad",
    "get_aggregator",
    "gramian",
    "resolve",
]

_PINV_RCOND = 1e-10  # singular values below this fraction of the largest are zero (float32 rounding is ~1e-14)


def gramian(matrix: tf.Tensor) -> tf.Tensor:
    """G = J Jᵀ in float64."""
    matrix = tf.cast(matrix, tf.float64)
    return tf.matmul(matrix, matrix, transpose_b=True)


class Aggregator:
    """Base class: subclasses define :meth:`weights` on the Gramian.

    Attributes:
        name: the name ``Trainer(aggregator=...)`` and ``--aggregator`` accept.
        needs_jacobian: False only for :class:`Sum`, whose step builds no per-component gradient.
        random: :meth:`weights` uses its ``seed`` (PCGrad).
    """

    name = ""
    needs_jacobian = True
    random = False

    def weights(self, gramian: tf.Tensor, seed: tf.Tensor | None = None) -> tf.Tensor:
        """The (m,) float64 weights w of the direction Jᵀw; ``seed`` (2 ints) for randomised aggregators."""
        raise NotImplementedError

    def __call__(self, matrix: tf.Tensor, seed: tf.Tensor | None = None) -> tf.Tensor:
        """The direction Jᵀw for the (m, n) matrix ``matrix`` (its rows: the components' gradients)."""
        matrix = tf.convert_to_tensor(matrix)
        if matrix.shape.rank != 2:
            raise ValueError(f"{type(self).__name__} takes an (m, n) matrix, got shape {matrix.shape}.")
        w = tf.cast(self.weights(gramian(matrix), seed), tf.float64)
        direction = tf.linalg.matvec(tf.cast(matrix, tf.float64), w, transpose_a=True)
        return tf.cast(direction, matrix.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _m(gramian: tf.Tensor) -> int:
    return int(gramian.shape[-1])


def _entries(gramian: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(|g1|², |g2|², <g1, g2>) of a 2x2 Gramian, in float64."""
    gramian = tf.cast(gramian, tf.float64)
    return gramian[0, 0], gramian[1, 1], gramian[0, 1]


class Sum(Aggregator):
    """The weighted sum of the components (the default: the step differentiates the total, no Jacobian)."""

    name = "sum"
    needs_jacobian = False

    def weights(self, gramian, seed=None):
        return tf.ones([_m(gramian)], tf.float64)


class Mean(Aggregator):
    """The rows' average (TorchJD's ``Mean``)."""

    name = "mean"

    def weights(self, gramian, seed=None):
        return tf.fill([_m(gramian)], tf.constant(1.0 / _m(gramian), tf.float64))


class UPGrad(Aggregator):
    """Each row projected onto the dual cone of the rows, then averaged (Quinton & Rey 2024)."""

    name = "upgrad"

    def weights(self, gramian, seed=None):
        m = _m(gramian)
        if m == 2:  # closed form: a row projected onto the other's half-space when they conflict
            a, b, c = _entries(gramian)
            conflict = c < 0.0  # (then a, b > 0)
            shift = -tf.stack([c / divisor(a, conflict), c / divisor(b, conflict)])
            return 0.5 + 0.5 * tf.where(conflict, shift, tf.zeros_like(shift))
        return tf.reduce_mean(dual_cone_weights(gramian, tf.eye(m, dtype=tf.float64)), axis=0)


class DualProj(Aggregator):
    """The mean of the rows projected onto their dual cone (GEM, Lopez-Paz & Ranzato 2017)."""

    name = "dualproj"

    def weights(self, gramian, seed=None):
        m = _m(gramian)
        if m == 2:  # closed form: at most one of the two constraints binds (Cauchy-Schwarz)
            a, b, c = _entries(gramian)
            half = tf.constant(0.5, tf.float64)
            return tf.stack([
                tf.where(a + c < 0, -c / (2.0 * divisor(a, a + c < 0)), half),
                tf.where(b + c < 0, -c / (2.0 * divisor(b, b + c < 0)), half),
            ])  # fmt: skip
        return dual_cone_weights(gramian, tf.fill([1, m], tf.constant(1.0 / m, tf.float64)))[0]


class MGDA(Aggregator):
    """The min-norm point of the rows' convex hull (Désidéri 2012; Sener & Koltun 2018), exact."""

    name = "mgda"

    def weights(self, gramian, seed=None):
        if _m(gramian) == 2:  # closed form: the point of the segment [g2, g1] nearest 0, γ·g1 + (1-γ)·g2
            a, b, c = _entries(gramian)
            spread = a + b - 2.0 * c  # |g1 - g2|²
            gamma = tf.clip_by_value((b - c) / divisor(spread, spread > 0), 0.0, 1.0)
            gamma = tf.where(spread > 0, gamma, tf.constant(0.5, tf.float64))
            return tf.stack([gamma, 1.0 - gamma])
        return simplex_weights(gramian)


class IMTLG(Aggregator):
    """The direction with equal projections on every normalised row (Liu et al. 2021), as TorchJD generalises it
    to dependent rows: w = G⁺·sqrt(diag G), normalised to sum 1 (0 when the sum vanishes)."""

    name = "imtlg"

    def weights(self, gramian, seed=None):
        gramian = tf.cast(gramian, tf.float64)
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gramian), 0.0))

        def general() -> tf.Tensor:
            return tf.linalg.matvec(tf.linalg.pinv(gramian, rcond=_PINV_RCOND), norms)

        if _m(gramian) == 2:  # G⁻¹ of a 2x2 in closed form unless it is (nearly) singular
            a, b, c = _entries(gramian)
            det = a * b - c * c
            regular = det > _PINV_RCOND * (a + b) ** 2

            def closed() -> tf.Tensor:
                return tf.stack([b * norms[0] - c * norms[1], a * norms[1] - c * norms[0]]) / det

            v = tf.cond(regular, closed, general)
        else:
            v = general()
        total = tf.reduce_sum(v)
        return tf.where(tf.abs(total) < 1e-12, tf.zeros_like(v), v / divisor(total))


class PCGrad(Aggregator):
    """Projecting conflicting gradients (Yu et al. 2020): each row, taken in turn, loses its component along every
    other row it conflicts with, in a random order per row; the results are summed (as TorchJD).

    Args:
        seed: seed of the orders when called on a matrix; inside the Trainer the order comes from the Trainer's
            seed and the step, so a run and its resume are reproducible. For m = 2 the order does not matter.
    """

    name = "pcgrad"
    random = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_number("PCGrad's seed", seed, integer=True)

    def weights(self, gramian, seed=None):
        gramian = tf.cast(gramian, tf.float64)
        m = _m(gramian)
        if m == 2:  # no order to draw: each row loses its part along the other when they conflict (2x UPGrad's)
            return 2.0 * UPGrad().weights(gramian)
        seed = tf.constant([self.seed, 0], tf.int64) if seed is None else tf.cast(seed, tf.int64)
        orders = tf.argsort(tf.random.stateless_uniform([m, m], seed=seed), axis=-1)  # row i: the order for row i
        current = tf.eye(m, dtype=tf.float64)  # row i: the weights of g_i's projected version
        diagonal = tf.linalg.diag_part(gramian)
        rows = tf.range(m)
        for t in range(m):
            j = orders[:, t]
            inner = tf.reduce_sum(tf.gather(gramian, j) * current, axis=-1)  # <g_i^PC, g_j>
            project = (j != rows) & (inner < 0.0) & (tf.gather(diagonal, j) > 0.0)
            step = tf.where(project, inner / divisor(tf.gather(diagonal, j), project), tf.zeros_like(inner))
            current -= step[:, None] * tf.one_hot(j, m, dtype=tf.float64)
        return tf.reduce_sum(current, axis=0)

    def __repr__(self) -> str:
        return f"PCGrad(seed={self.seed})"


class AlignedMTL(Aggregator):
    """Aligned-MTL (Senushkin et al. 2023): the mean weights through the balance transformation
    B = sqrt(λ_min)·V Λ^{-1/2} Vᵀ of the Gramian's eigendecomposition (TorchJD's ``scale_mode="min"``)."""

    name = "alignedmtl"

    def weights(self, gramian, seed=None, eps: float = float(np.finfo(np.float32).eps)):
        gramian = tf.cast(gramian, tf.float64)
        if _m(gramian) == 2:  # full rank: B = sqrt(λ_min)·G^(-1/2), with the 2x2 square root in closed form
            a, b, c = _entries(gramian)
            largest = 0.5 * (a + b) + tf.sqrt(0.25 * (a - b) ** 2 + c * c)
            smallest = (a * b - c * c) / divisor(largest)  # λ_min·λ_max = det
            s = tf.sqrt(tf.maximum(a * b - c * c, 0.0))

            def closed() -> tf.Tensor:  # (G + sI)/sqrt(a + b + 2s) is sqrt(G); its inverse times (1/2, 1/2)
                scale = tf.sqrt(smallest) / (2.0 * s * tf.sqrt(a + b + 2.0 * s))
                return scale * tf.stack([b + s - c, a + s - c])

            return tf.cond(smallest > largest * 2 * eps, closed, lambda: self._general(gramian, eps))
        return self._general(gramian, eps)

    @staticmethod
    def _general(gramian: tf.Tensor, eps: float) -> tf.Tensor:
        m = _m(gramian)
        values, vectors = tf.linalg.eigh(gramian)
        keep = values > tf.reduce_max(values) * m * eps  # the numerical rank (TorchJD's tolerance, float32 eps)
        smallest = tf.reduce_min(tf.where(keep, values, np.inf))
        inverse_roots = tf.where(keep, tf.math.rsqrt(divisor(values, keep)), tf.zeros_like(values))
        balance = tf.sqrt(tf.where(tf.reduce_any(keep), smallest, tf.zeros_like(smallest))) * tf.matmul(
            vectors * inverse_roots[None, :], vectors, transpose_b=True
        )
        balance = tf.where(tf.reduce_any(keep), balance, tf.eye(m, dtype=tf.float64))
        return tf.linalg.matvec(balance, tf.fill([m], tf.constant(1.0 / m, tf.float64)))


class CAGrad(Aggregator):
    """Conflict-averse gradient descent (Liu et al. 2021), as TorchJD: w* = argmin over the simplex of
    g₀ᵀg_w + c·|g₀|·|g_w| (g₀ the mean row, g_w = Jᵀw); weights 1/m + c·|g₀|/|g_w|·w* (no 1/(1+c²) rescaling);
    zero when |g_w| < 1e-4·|J| (on the Pareto front).

    Args:
        c: the radius of the ball around g₀, relative to |g₀| (0 gives Mean).
    """

    name = "cagrad"

    def __init__(self, c: float = 0.5) -> None:
        self.c = check_number("CAGrad's c", c, at_least=0)

    def weights(self, gramian, seed=None):
        gramian = tf.cast(gramian, tf.float64)
        m = _m(gramian)
        if m == 2:
            return self._two_rows(gramian)
        mean = tf.fill([m], tf.constant(1.0 / m, tf.float64))
        linear = tf.linalg.matvec(gramian, mean)  # g₀ᵀ g_i
        radius = self.c * tf.sqrt(tf.maximum(tf.tensordot(mean, linear, 1), 0.0))  # c·|g₀|
        w = simplex_weights(gramian, linear=linear, norm=radius)
        norm = tf.sqrt(tf.maximum(tf.tensordot(w, tf.linalg.matvec(gramian, w), 1), 0.0))
        scale = tf.sqrt(tf.maximum(tf.linalg.trace(gramian), 0.0))  # |J| (Frobenius)
        on_front = norm < 1e-4 * scale
        return tf.where(on_front, tf.zeros_like(w), mean + radius / divisor(norm, ~on_front) * w)

    def _two_rows(self, gramian: tf.Tensor) -> tf.Tensor:
        """m = 2 in closed form, w* = (t, 1 - t) with g_t = t·g1 + (1 - t)·g2. The objective is convex in t; where
        its derivative (g1ᵀg₀ - g2ᵀg₀) + r·<g_t, u>/|g_t| (u = g1 - g2, r = c·|g₀|) vanishes, |g_t|² = det G /
        (|u|² - τ²) with τ = <g_t, u>/|g_t| = (g2ᵀg₀ - g1ᵀg₀)/r, which gives t; when |τ| >= |u| the objective is
        monotone and an end wins. A third of the general solver's graph ops, on the step's critical path."""
        a, b, c = _entries(gramian)
        radius = self.c * tf.sqrt(tf.maximum(a + b + 2.0 * c, 0.0)) / 2.0
        spread, along, slope = a + b - 2.0 * c, c - b, (a - b) / 2.0  # |u|², <g2, u>, g1ᵀg₀ - g2ᵀg₀
        interior = radius * radius * spread > slope * slope
        tau = -slope / divisor(radius, interior)
        norm2 = tf.maximum(a * b - c * c, 0.0) / divisor(spread - tau * tau, interior)
        end = tf.where(slope > 0, tf.constant(0.0, tf.float64), tf.constant(1.0, tf.float64))
        t = tf.where(interior, (tau * tf.sqrt(norm2) - along) / divisor(spread, interior), end)
        t = tf.clip_by_value(t, 0.0, 1.0)
        w = tf.stack([t, 1.0 - t])
        norm = tf.sqrt(tf.maximum(b + 2.0 * along * t + spread * t * t, 0.0))  # |g_t|
        on_front = norm < 1e-4 * tf.sqrt(tf.maximum(a + b, 0.0))
        return tf.where(on_front, tf.zeros_like(w), 0.5 + radius / divisor(norm, ~on_front) * w)

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c})"


AGGREGATORS: dict[str, Callable[[], Aggregator]] = {
    cls.name: cls for cls in (Sum, Mean, UPGrad, DualProj, MGDA, IMTLG, PCGrad, AlignedMTL, CAGrad)
}


WEIGHTINGS: dict[str, Callable[[], LossWeighting]] = {"gradnorm": GradNorm, "dwa": DWA}


def get_aggregator(value: str | Aggregator | None) -> Aggregator:
    """An aggregator from its name (``"upgrad"``, case-insensitive) or an instance; None is :class:`Sum`."""
    aggregator, weighting = resolve(value)
    if weighting is not None:
        raise ValueError(f"{value!r} is a loss weighting, not an aggregator of gradients.")
    return aggregator


def resolve(value: str | Aggregator | LossWeighting | None) -> tuple[Aggregator, LossWeighting | None]:
    """``Trainer(aggregator=...)``: a name, an aggregator or a loss weighting -> (aggregator, weighting or None).

    A loss weighting (GradNorm, DWA) changes the components' weights and keeps the weighted sum (``Sum``).
    """
    if value is None:
        return Sum(), None
    if isinstance(value, Aggregator):
        return value, None
    if isinstance(value, LossWeighting):
        return Sum(), value
    name = value.lower() if isinstance(value, str) else None
    if name in AGGREGATORS:
        return AGGREGATORS[name](), None
    if name in WEIGHTINGS:
        return Sum(), WEIGHTINGS[name]()
    known = ", ".join(map(repr, [*AGGREGATORS, *WEIGHTINGS]))
    raise ValueError(f"Unknown aggregator {value!r}; the aggregators and loss weightings are {known}.")
