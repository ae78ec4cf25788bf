"""The small problems of the multi-task aggregators, solved exactly on the Gramian G = J Jᵀ (m x m) in the graph.

- :func:`dual_cone_weights`: the projection of Jᵀu onto the dual cone {x: Jx >= 0} is Jᵀv with
  v = argmin_{v >= u} vᵀGv (UPGrad, DualProj);
- :func:`simplex_weights`: the min-norm point of the rows' convex hull is Jᵀw with w = argmin_{w in simplex} wᵀGw
  (MGDA), optionally with CAGrad's objective aᵀw + k·sqrt(wᵀGw).

The method: every optimum is the solution of the KKT equations on its active set (the entries off their bound), so
the solver solves those linear equations for every one of the 2^m active sets at once (batched), keeps the
candidates that are feasible and returns the one with the least objective. Picking by objective among feasible
points makes it exact also when G is singular (a duplicated or zero row, rank-deficient J): any feasible point is
an upper bound and the optimum is among the candidates. Everything runs in float64 on G scaled to a unit diagonal
(rows 1000x apart in scale are then as easy as equal ones). The cost grows as 2^m: ``MAX_COMPONENTS`` bounds m.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import tensorflow as tf

__all__ = ["MAX_COMPONENTS", "divisor", "dual_cone_weights", "simplex_weights"]

MAX_COMPONENTS = 10  # 1,024 active sets of 10 x 10 systems
_RIDGE = 1e-11  # on the unit diagonal: a singular but consistent system gets its least-norm solution
_TOL = 1e-9  # feasibility, relative to the candidate's size
_HUGE = 1e8  # a candidate this large came from an inconsistent (singular) system: not a solution


def divisor(x: tf.Tensor, ok: tf.Tensor | None = None) -> tf.Tensor:
    """``x`` where ``ok`` (default: where x is not 0), 1 elsewhere: safe to divide by (the result is then masked)."""
    return tf.where(x != 0 if ok is None else ok, x, tf.ones_like(x))


def _constants(m: int, empty: bool) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(masks (K, m, 1), outer (K, m, m), offset (K, m, m)) for every subset of the m indices (the active sets),
    the empty one included or not: G restricted to a set is ``outer * G + offset`` (the identity elsewhere, plus a
    tiny ridge). Made once per m, in NumPy: the step only multiplies and adds."""
    return tuple(tf.constant(a) for a in _numpy_constants(m, empty))


@functools.cache
def _numpy_constants(m: int, empty: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    masks = np.array(list(itertools.product((0.0, 1.0), repeat=m))[0 if empty else 1 :], dtype=np.float64)
    eye = np.eye(m)
    outer = masks[:, :, None] * masks[:, None, :]
    offset = (1.0 - masks)[:, :, None] * eye + _RIDGE * eye
    return masks[:, :, None], outer, offset


def _unit_diagonal(gramian: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(D G D, d) with d = 1/sqrt(diag G) (1 for a zero row): the same problem in coordinates x = D x̂."""
    diag = tf.linalg.diag_part(gramian)
    d = tf.math.rsqrt(tf.where(diag > 0, diag, tf.ones_like(diag)))
    return gramian * d[:, None] * d[None, :], d


def _pick(candidates: tf.Tensor, feasible: tf.Tensor, size: tf.Tensor, objective: tf.Tensor) -> tf.Tensor:
    """Per column p, the feasible candidate (K, m, p) of least objective (K, p): returns (p, m)."""
    ok = feasible & tf.math.is_finite(objective) & (size < _HUGE)
    best = tf.argmin(tf.where(ok, objective, np.inf), axis=0)
    return tf.gather(tf.transpose(candidates, [2, 0, 1]), best, axis=1, batch_dims=1)


def _check(gramian: tf.Tensor) -> tuple[tf.Tensor, int]:
    gramian = tf.cast(tf.convert_to_tensor(gramian), tf.float64)
    m = gramian.shape[-1]
    if m is None or gramian.shape.rank != 2 or gramian.shape[0] != m:
        raise ValueError(f"The Gramian must be a square matrix of static size, got shape {gramian.shape}.")
    if m > MAX_COMPONENTS:
        raise ValueError(
            f"{m} components: the exact solvers enumerate 2^m active sets and support at most {MAX_COMPONENTS}. "
            "Group components into fewer losses, or use Mean, IMTLG, PCGrad or AlignedMTL (no QP)."
        )
    return gramian, m


def dual_cone_weights(gramian: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """argmin_{v >= u_p} vᵀGv for each row u_p of ``u`` (p, m): Jᵀv is Jᵀu_p projected onto the dual cone."""
    gramian, m = _check(gramian)
    scaled, d = _unit_diagonal(gramian)
    masks, outer, offset = _constants(m, empty=True)  # where v > u: the multiplier μ = v - u is free there
    u_hat = tf.transpose(tf.cast(u, tf.float64)) / d[:, None]  # (m, p); v >= u  <=>  v̂ >= u/d, with v = d·v̂
    # Stationarity on the active set A: (Ĝ(û + μ))_A = 0, μ = 0 off A.
    rhs = -masks * tf.matmul(scaled, u_hat)[None]  # (K, m, p)
    mu = masks * tf.linalg.solve(outer * scaled + offset, rhs)
    size = 1.0 + tf.reduce_max(tf.abs(mu), axis=1)  # (K, p)
    feasible = tf.reduce_min(mu, axis=1) >= -_TOL * size
    v_hat = u_hat[None] + tf.maximum(mu, 0.0)
    objective = tf.reduce_sum(v_hat * tf.matmul(scaled[None], v_hat), axis=1)  # v̂ᵀĜv̂ per (K, p)
    return _pick(v_hat, feasible, size, objective) * d


def simplex_weights(gramian: tf.Tensor, *, linear: tf.Tensor | None = None, norm: float = 0.0) -> tf.Tensor:
    """argmin over the simplex of wᵀGw (``linear=None``), or of aᵀw + norm·sqrt(wᵀGw) (CAGrad; ``linear`` = a).

    For the CAGrad objective, the KKT equations on an active set S with r = sqrt(wᵀGw) give w_S = (νp - q)/sqrt(Δ)
    where p = G_S⁻¹1, q = G_S⁻¹a_S and ν solves ν²·1ᵀp - 2ν·1ᵀq + aᵀq = norm² (Δ its discriminant / 4): a closed
    form per active set. The min-norm point is a candidate too (there sqrt(wᵀGw) may be 0 and not differentiable).
    """
    gramian, m = _check(gramian)
    scaled, d = _unit_diagonal(gramian)
    masks, outer, offset = _constants(m, empty=False)  # the support of w
    systems = outer * scaled + offset
    dm = masks * d[:, None]  # (K, m, 1): the simplex constraint 1ᵀw = 1 is dᵀŵ = 1 in scaled coordinates
    # Min-norm: Ĝ_S ŵ_S = ν d_S and d_Sᵀ ŵ_S = 1  ->  ŵ = p / dᵀp with p = Ĝ_S⁻¹ d_S.
    if linear is None:
        p = masks * tf.linalg.solve(systems, dm)
    else:
        linear_hat = tf.cast(linear, tf.float64) * d
        a_hat = masks * linear_hat[:, None]
        both = masks * tf.linalg.solve(systems, tf.concat([dm, a_hat], axis=2))  # one solve, two right sides
        p, q = both[:, :, :1], both[:, :, 1:]
    dp = tf.reduce_sum(dm * p, axis=1)  # (K, 1)
    candidates = p / divisor(dp)[:, None]
    if linear is not None:
        alpha, beta, gamma = dp, tf.reduce_sum(dm * q, axis=1), tf.reduce_sum(a_hat * q, axis=1)
        delta = beta**2 - alpha * (gamma - norm**2)
        root = tf.sqrt(tf.maximum(delta, 0.0))
        nu = (beta + root) / divisor(alpha)
        w_ca = (nu[:, None] * p - q) / divisor(root)[:, None]
        solvable = tf.concat([tf.ones_like(delta, tf.bool), (delta > 0) & (tf.abs(alpha) > 0)], axis=0)
        candidates = tf.concat([candidates, w_ca], axis=0)
        dm = tf.concat([dm, dm], axis=0)
    size = 1.0 + tf.reduce_max(tf.abs(candidates), axis=1)  # (K, 1)
    total = tf.reduce_sum(dm * candidates, axis=1)
    feasible = (tf.reduce_min(candidates, axis=1) >= -_TOL * size) & (tf.abs(total - 1.0) < 1e-7 * size)
    quad = tf.reduce_sum(candidates * tf.matmul(scaled[None], candidates), axis=1)  # (K, 1)
    if linear is None:
        objective = quad
    else:
        feasible &= solvable
        objective = tf.reduce_sum(candidates * linear_hat[:, None], axis=1) + norm * tf.sqrt(tf.maximum(quad, 0.0))
    return _pick(tf.maximum(candidates, 0.0), feasible, size, objective)[0] * d
