"""The multi-task aggregators on matrices, against independent references.

- UPGrad and DualProj against the dual-cone projections solved by quadprog in the n-dimensional primal
  (min |x - g|² s.t. Jx >= 0), and on their defining property (no row has a negative inner product);
- MGDA on the optimality conditions of the min-norm point (in the hull; every row's inner product >= |d|²);
- Mean, IMTLG, PCGrad (m = 2), AlignedMTL and CAGrad against TorchJD 0.18's outputs, computed once and stored
  (``tests/data/make_torchjd_reference.py``); PCGrad (m = 2) also against the paper's closed form; IMTL-G on its
  defining property (equal projections on the normalised rows).
"""

from pathlib import Path

import numpy as np
import pytest
import quadprog
import tensorflow as tf

import losses
from losses import IMTLG, MGDA, AlignedMTL, CAGrad, DualProj, Mean, PCGrad, Sum, UPGrad
from losses.aggregators import get_aggregator
from losses.qp import MAX_COMPONENTS, simplex_weights

REFERENCE = np.load(Path(__file__).parent / "data" / "torchjd_reference.npz")
CASES = sorted({key.split("/")[0] for key in REFERENCE.files if "/" in key})
HARD = ["scale_1000x", "rank_deficient", "duplicated_row", "zero_row"]


def matrix(case: str) -> np.ndarray:
    return REFERENCE[f"{case}/matrix"]


def project(J: np.ndarray, g: np.ndarray) -> np.ndarray:
    """g (a combination of J's rows) projected onto the dual cone {x: Jx >= 0}, by quadprog in the primal.

    The projection lies in J's row space, so the QP is solved there: x = Qz with Q an orthonormal basis."""
    basis, _ = np.linalg.qr(J.T)
    z = quadprog.solve_qp(np.eye(basis.shape[1]), basis.T @ g, (J @ basis).T.copy(), np.zeros(J.shape[0]))[0]
    return basis @ z


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def test_cases_cover_the_issue():
    shapes = {matrix(case).shape for case in CASES}
    assert {m for m, _ in shapes} == {2, 3, 4, 5, 6} and max(n for _, n in shapes) == 1000
    assert set(HARD) <= set(CASES) and len(CASES) == 34


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES)
def test_upgrad_and_dualproj_are_the_exact_projections(case, dtype):
    J = matrix(case).astype(dtype)
    exact = J.astype(np.float64)  # the matrix the aggregator sees
    tol = 1e-6 if dtype == np.float64 else 1e-4
    upgrad = UPGrad()(tf.constant(J)).numpy()
    dualproj = DualProj()(tf.constant(J)).numpy()
    assert upgrad.dtype == dtype and dualproj.dtype == dtype
    assert relative(upgrad, np.mean([project(exact, g) for g in exact], axis=0)) < tol
    assert relative(dualproj, project(exact, exact.mean(axis=0))) < tol
    for direction in (upgrad, dualproj):  # never against a row
        assert (exact @ direction).min() >= -1e-6 * np.linalg.norm(exact) * np.linalg.norm(direction)


def test_torchjd_upgrad_is_off_where_the_readme_says():
    """TorchJD regularises the Gramian: on rows 1000x apart its UPGrad is 17 % off the exact projection."""
    J = matrix("scale_1000x")
    exact = np.mean([project(J, g) for g in J], axis=0)
    assert relative(REFERENCE["scale_1000x/upgrad"], exact) > 0.1
    assert relative(UPGrad()(tf.constant(J)).numpy(), exact) < 1e-7


@pytest.mark.parametrize("case", CASES)
def test_mgda_is_the_min_norm_point(case):
    J = matrix(case)
    G = J @ J.T
    w = MGDA().weights(tf.constant(G)).numpy()
    d = MGDA()(tf.constant(J)).numpy()
    np.testing.assert_allclose(d, J.T @ w, rtol=1e-10, atol=1e-12)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-9)
    # Optimality: <g_i, d> >= |d|² for every row (d is the hull's point nearest the origin)
    assert (J @ d).min() >= d @ d - 1e-9 * np.trace(G)
    theirs = REFERENCE[f"{case}/mgda"]  # TorchJD's Frank-Wolfe stops early: never shorter than the exact point
    assert np.linalg.norm(d) <= np.linalg.norm(theirs) * (1 + 1e-9) + 1e-12


STORED = [(c, n) for c in CASES for n in ("mean", "imtlg", "alignedmtl", "pcgrad") if f"{c}/{n}" in REFERENCE]


@pytest.mark.parametrize(("case", "name"), STORED)  # PCGrad is random for m > 2: stored for m = 2 only
def test_equal_to_torchjd(case, name):
    key = f"{case}/{name}"
    ours = get_aggregator(name)(tf.constant(matrix(case))).numpy()
    assert relative(ours, REFERENCE[key]) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_cagrad_gives_torchjds_direction(case):
    """TorchJD solves CAGrad's problem with cvxpy/Clarabel (tolerance ~1e-8); here it is solved in closed form on
    every active set."""
    ours = CAGrad(c=0.5)(tf.constant(matrix(case))).numpy()
    assert relative(ours, REFERENCE[f"{case}/cagrad"]) < 1e-3


def test_pcgrad_for_two_rows_is_the_papers_formula():
    for case in [c for c in CASES if matrix(c).shape[0] == 2]:
        g1, g2 = matrix(case)
        dot = g1 @ g2
        expected = g1 + g2 if dot >= 0 else g1 - dot / (g2 @ g2) * g2 + g2 - dot / (g1 @ g1) * g1
        np.testing.assert_allclose(PCGrad()(tf.constant(np.stack([g1, g2]))).numpy(), expected, rtol=1e-10)


def test_pcgrad_order_comes_from_the_seed():
    J = tf.constant(matrix("conflict_5x5"))
    np.testing.assert_array_equal(PCGrad(seed=3)(J).numpy(), PCGrad(seed=3)(J).numpy())
    results = {tuple(PCGrad()(J, seed=tf.constant([0, step])).numpy().round(9)) for step in range(20)}
    assert len(results) > 1  # the order matters for m > 2, and the seed changes it


@pytest.mark.parametrize("case", ["random_3x100", "conflict_4x100", "random_6x1000"])
def test_imtlg_projects_equally_on_every_row(case):
    J = matrix(case)
    d = IMTLG()(tf.constant(J)).numpy()
    projections = J @ d / np.linalg.norm(J, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-7)


def test_sum_and_mean():
    J = matrix("random_4x100")
    np.testing.assert_allclose(Sum()(tf.constant(J)).numpy(), J.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(Mean()(tf.constant(J)).numpy(), J.mean(axis=0), rtol=1e-12)
    assert not Sum().needs_jacobian and Mean().needs_jacobian


def test_names_instances_and_errors():
    assert set(losses.aggregators.AGGREGATORS) == {
        "sum", "mean", "upgrad", "dualproj", "mgda", "imtlg", "pcgrad", "alignedmtl", "cagrad",
    }  # fmt: skip
    assert isinstance(get_aggregator("UPGrad"), UPGrad) and isinstance(get_aggregator(None), Sum)
    assert isinstance(get_aggregator(AlignedMTL()), AlignedMTL)
    with pytest.raises(ValueError, match=r"Unknown aggregator 'upgrd'.*'upgrad'.*'gradnorm'"):
        get_aggregator("upgrd")
    with pytest.raises(ValueError, match="c must be >= 0"):
        CAGrad(c=-1)
    with pytest.raises(ValueError, match=f"at most {MAX_COMPONENTS}"):
        UPGrad()(tf.ones([MAX_COMPONENTS + 1, 3]))
    with pytest.raises(ValueError, match=r"\(m, n\) matrix"):
        UPGrad()(tf.ones([3]))


@pytest.mark.parametrize("case", ["conflict_2x100", "conflict_4x100"])  # m = 2: UPGrad's and MGDA's closed forms
def test_aggregators_run_in_a_graph(case):
    J = tf.constant(matrix(case), tf.float32)
    for name in losses.aggregators.AGGREGATORS:
        aggregator = get_aggregator(name)
        eager = aggregator(J).numpy()
        np.testing.assert_allclose(tf.function(aggregator)(J).numpy(), eager, rtol=1e-6, atol=1e-6)


def _two_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    g, h = rng.normal(size=(2, 50))
    return {
        "scale_1000x": np.stack([1000.0 * g, h]),
        "opposed": np.stack([g, -0.5 * g + 0.1 * h]),
        "collinear": np.stack([g, 2.0 * g]),
        "anti_collinear": np.stack([g, -3.0 * g]),
        "zero_row": np.stack([g, 0.0 * h]),
    }


def _aligned_mtl_numpy(G: np.ndarray) -> np.ndarray:
    """TorchJD's AlignedMTLWeighting (scale_mode="min"), in NumPy."""
    values, vectors = np.linalg.eigh(G)
    keep = values > values.max() * len(G) * np.finfo(np.float32).eps
    if not keep.any():
        return np.full(len(G), 1.0 / len(G))
    values, vectors = values[keep], vectors[:, keep]
    balance = np.sqrt(values.min()) * (vectors / np.sqrt(values)) @ vectors.T
    return balance @ np.full(len(G), 1.0 / len(G))


@pytest.mark.parametrize("case", list(_two_rows()))
def test_two_row_closed_forms_equal_the_general_definitions(case):
    """For m = 2, UPGrad, DualProj, MGDA, PCGrad, IMTLG and AlignedMTL have closed forms; held against quadprog,
    the min-norm conditions, and NumPy versions of TorchJD's definitions, also on singular and zero rows."""
    J = _two_rows()[case]
    G = J @ J.T
    scale = np.linalg.norm(J)

    def close(ours, reference):
        assert np.linalg.norm(ours - reference) <= 1e-7 * (np.linalg.norm(reference) + scale), (ours, reference)

    close(UPGrad()(tf.constant(J)).numpy(), np.mean([project(J, g) for g in J], axis=0))
    close(DualProj()(tf.constant(J)).numpy(), project(J, J.mean(axis=0)))
    close(PCGrad()(tf.constant(J)).numpy(), 2 * UPGrad()(tf.constant(J)).numpy())
    d = MGDA()(tf.constant(J)).numpy()
    assert (J @ d).min() >= d @ d - 1e-9 * scale**2
    v = np.linalg.pinv(G, rcond=1e-10) @ np.sqrt(np.diag(G))
    close(IMTLG()(tf.constant(J)).numpy(), J.T @ (v / v.sum() if abs(v.sum()) >= 1e-12 else 0 * v))
    close(AlignedMTL()(tf.constant(J)).numpy(), J.T @ _aligned_mtl_numpy(G))


@pytest.mark.parametrize("case", list(_two_rows()))
def test_two_row_cagrad_equals_a_dense_search(case):
    """CAGrad for m = 2 is a 1-D convex problem over w = (t, 1 - t): held against its minimum on a grid of 200,001
    points (the closed form in losses/aggregators.py solves f'(t) = 0)."""
    J = _two_rows()[case]
    G = J @ J.T
    linear, radius = G @ [0.5, 0.5], 0.5 * np.sqrt(G.sum() / 4)
    t = np.linspace(0.0, 1.0, 200_001)
    q = np.maximum(t * t * G[0, 0] + 2 * t * (1 - t) * G[0, 1] + (1 - t) ** 2 * G[1, 1], 0.0)
    best = t[np.argmin(t * linear[0] + (1 - t) * linear[1] + radius * np.sqrt(q))]
    w = np.array([best, 1 - best])
    norm = np.sqrt(w @ G @ w)
    weights = np.zeros(2) if norm < 1e-4 * np.sqrt(np.trace(G)) else 0.5 + radius / norm * w
    ours = CAGrad(c=0.5)(tf.constant(J)).numpy()
    assert np.linalg.norm(ours - J.T @ weights) <= 1e-4 * (np.linalg.norm(J.T @ weights) + 1e-6 * np.linalg.norm(J))


@pytest.mark.parametrize("case", list(_two_rows()))
def test_two_row_cagrad_equals_the_active_set_solver(case):
    """The m = 2 closed form against the general solver (every active set, used for m >= 3) on the same problem."""
    J = _two_rows()[case]
    G = J @ J.T
    mean = np.array([0.5, 0.5])
    radius = 0.5 * np.sqrt(mean @ G @ mean)
    w = simplex_weights(tf.constant(G), linear=tf.constant(G @ mean), norm=radius).numpy()
    norm = np.sqrt(max(w @ G @ w, 0.0))
    expected = np.zeros(2) if norm < 1e-4 * np.sqrt(np.trace(G)) else mean + radius / norm * w
    ours = CAGrad(c=0.5).weights(tf.constant(G)).numpy()
    assert np.linalg.norm(J.T @ (ours - expected)) <= 1e-7 * (np.linalg.norm(J.T @ expected) + np.linalg.norm(J))
