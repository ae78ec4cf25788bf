"""Dense kernels' Gramian from x and the components' δs (trainer/gramian.py): against NumPy's products of the formed
gradients, which kernels qualify, and Trainer runs with the kernels factored against runs with every gradient
formed."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainer.gramian as gramian_module
import trainer.trainer as trainer_module
from tests import helpers
from tests.test_balancing import heads_apart, three_components
from trainer import Trainer
from trainer.gramian import _by_gradients, _by_kernel, dense_kernels, direction, gramian, graph_mark


@pytest.fixture(autouse=True)
def every_kernel_factored(monkeypatch):
    """These models are small: factor their kernels anyway (the size rule has its own test)."""
    monkeypatch.setattr(gramian_module, "MIN_KERNEL", 1)


def _reference(x: np.ndarray, deltas: list[np.ndarray]) -> np.ndarray:
    rows = np.stack([(x.T.astype(np.float64) @ d).ravel() for d in deltas])
    return rows @ rows.T


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize(("n", "d_in", "d_out"), [(6, 40, 30), (300, 4, 3)])
def test_both_forms_and_the_chosen_one_equal_the_formed_gradients_products(m, n, d_in, d_out):
    rng = np.random.default_rng(m)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    deltas = [rng.normal(size=(n, d_out)).astype(np.float32) * 10.0**i for i in range(m)]  # rows far apart in scale
    want = _reference(x, deltas)
    rows_unknown = [tf.TensorSpec([None, d_in]), [tf.TensorSpec([None, d_out])] * m]
    unknown_rows = tf.function(gramian, input_signature=rows_unknown)
    for got in (_by_kernel(x, deltas), _by_gradients(x, deltas), gramian(x, deltas), unknown_rows(x, deltas)):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-6 * np.abs(want).max())
    weights = rng.random(m).astype(np.float32)
    want_direction = x.T.astype(np.float64) @ sum(w * d for w, d in zip(weights, deltas))
    got = direction(x, deltas, tf.constant(weights), tf.float32)
    np.testing.assert_allclose(got.numpy(), want_direction, rtol=1e-4, atol=1e-5 * np.abs(want_direction).max())
    np.testing.assert_allclose(direction(x, deltas, None, tf.float32).numpy(), x.T @ sum(deltas), rtol=1e-4,
                               atol=1e-5 * np.abs(want_direction).max())  # fmt: skip


def test_only_kernels_read_by_one_plain_matmul_qualify():
    """Found: a plain Dense kernel (also on a 3-D input, which Keras reshapes into one MatMul). Not: a kernel with a
    regularizer (read again by model.losses), a layer called twice, a bias, an EinsumDense (BatchMatMul)."""
    inp = keras.Input((5, 6))
    plain = keras.layers.Dense(4, name="plain")
    regularized = keras.layers.Dense(4, kernel_regularizer="l2", name="regularized")
    twice = keras.layers.Dense(4, name="twice")
    einsum = keras.layers.EinsumDense("btd,de->bte", output_shape=(None, 3), name="einsum")
    out = einsum(twice(twice(regularized(plain(inp)))))
    model = keras.Model(inp, out)
    variables = model.trainable_variables
    names = []

    @tf.function(autograph=False)
    def trace(x):
        mark = graph_mark()
        model(x, training=True)
        tf.add_n(model.losses)
        names.extend(variables[j].path for j in dense_kernels(mark, variables))

    trace(tf.zeros([2, 5, 6]))
    assert names == ["plain/kernel"]
    assert dense_kernels(None, variables) == {}  # eager: nothing to read


def test_only_kernels_of_at_least_min_kernel_elements_are_factored(monkeypatch):
    """Below 2^14 elements the factored form's extra operations cost more than it saves (measured)."""
    monkeypatch.setattr(gramian_module, "MIN_KERNEL", 2**14)
    inp = keras.Input((100,))
    model = keras.Model(inp, keras.layers.Dense(8, name="small")(keras.layers.Dense(256, name="large")(inp)))
    variables, names = model.trainable_variables, []

    @tf.function(autograph=False)
    def trace(x):
        mark = graph_mark()
        model(x)
        names.extend(variables[j].path for j in dense_kernels(mark, variables))

    trace(tf.zeros([2, 100]))
    assert names == ["large/kernel"]  # 25,600 elements; small/kernel has 2,048


def _no_factoring(monkeypatch):
    make = trainer_module.make_balance

    def explicit(trainer, keys):
        balance = make(trainer, keys)
        balance.factorable = False
        return balance

    monkeypatch.setattr(trainer_module, "make_balance", explicit)


def _run(aggregator, loss, batch_size, **kwargs):
    keras.utils.set_random_seed(0)
    model = helpers.example1()
    trainer = Trainer(model, loss=loss, aggregator=aggregator, optimizer=keras.optimizers.SGD(0.002), seed=3,
                      log_grad_norms=True, **kwargs)  # fmt: skip
    x, y = helpers.example1_data(96)
    history = trainer.fit((x, y), batch_size=batch_size, epochs=2, shuffle=False, progress=False).history
    return model.get_weights(), history, trainer._runner.steps.math.balance


@pytest.mark.parametrize(
    ("aggregator", "loss", "batch_size"),
    [("upgrad", heads_apart, 16), ("mgda", three_components, 16), ("pcgrad", three_components, 40),
     ("mean", lambda o, t: {**three_components(o, t), "copy": three_components(o, t)["mse"] * 0.5}, 16)],
    ids=["upgrad-m2", "mgda-m3", "pcgrad-m3-partial-batch", "mean-m4-stacked"],
)  # fmt: skip
def test_a_run_with_dense_kernels_factored_equals_one_with_every_gradient_formed(aggregator, loss, batch_size,
                                                                                 monkeypatch):  # fmt: skip
    weights, history, balance = _run(aggregator, loss, batch_size)
    assert balance.factored  # the trunk's kernels
    _no_factoring(monkeypatch)
    want_weights, want_history, explicit = _run(aggregator, loss, batch_size)
    assert explicit.factored == []
    for a, b in zip(weights, want_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in want_history:
        np.testing.assert_allclose(history[key], want_history[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_mixed_precision_factored_kernels_match_formed_gradients(monkeypatch):
    """float16 x and δs: the Gramian and direction are formed in float32 (the formed gradients are float16
    products), so the two agree to float16's precision."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        weights, history, balance = _run("upgrad", heads_apart, 16)
        assert balance.factored
        _no_factoring(monkeypatch)
        want_weights, want_history, _ = _run("upgrad", heads_apart, 16)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for key in ("mse", "ce", "agg_weight/mse", "grad_norm/ce"):
        np.testing.assert_allclose(history[key], want_history[key], rtol=2e-3, err_msg=key)
    for a, b in zip(weights, want_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3)


def test_under_xla_the_factored_step_equals_the_plain_graphs():
    """``jit_compile=True`` compiles the step with its factored kernels (the form chosen at run time included)."""
    weights, history, balance = _run("upgrad", three_components, 16)
    jit_weights, jit_history, jit_balance = _run("upgrad", three_components, 16, jit_compile=True)
    assert balance.factored and jit_balance.factored == balance.factored
    for a, b in zip(jit_weights, weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in history:
        np.testing.assert_allclose(jit_history[key], history[key], rtol=1e-5, atol=1e-7, err_msg=key)
