"""losses/: MultiBox, focal, uncertainty weighting — each against a NumPy reference written independently."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from losses import (
    DWA,
    CAGrad,
    GradNorm,
    MultiBoxLoss,
    PCGrad,
    SparseFocalLoss,
    UncertaintyWeighting,
    per_output,
    sparse_focal_loss,
)
from trainer import MissingKeyError, Trainer


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def numpy_multibox(box_pred, logits, box_true, labels, ratio=3.0):
    """Per image, with Python loops: smooth-L1 on positives; CE on positives plus the k hardest negatives."""
    log_p = _log_softmax(logits.astype(np.float64))
    total_pos = max(int((labels > 0).sum()), 1)
    loc = conf = 0.0
    for i in range(len(labels)):
        pos = labels[i] > 0
        neg = labels[i] == 0
        d = np.abs(box_pred[i] - box_true[i])
        loc += np.where(d < 1, 0.5 * d**2, d - 0.5).sum(-1)[pos].sum()
        conf += -log_p[i][pos, labels[i][pos]].sum()
        k = int(min(np.floor(ratio * pos.sum()), neg.sum()))
        background = -log_p[i][:, 0]
        hardest = np.sort(background[neg])[::-1][:k]
        conf += hardest.sum()
    return loc / total_pos, conf / total_pos


def _case(seed, batch=4, anchors=30, classes=4):
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1, 0, 0, 0, 0, 0, 1, 2, 3], size=(batch, anchors)).astype(np.int32)
    labels[0] = np.where(labels[0] > 0, 0, labels[0])  # an image with no objects (and some ignored anchors)
    return (
        rng.normal(size=(batch, anchors, 4)).astype(np.float32) * 2,
        rng.normal(size=(batch, anchors, classes)).astype(np.float32) * 3,
        rng.normal(size=(batch, anchors, 4)).astype(np.float32),
        labels,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio", [3.0, 0.5])
def test_multibox_matches_numpy_eager_graph_and_xla(seed, ratio):
    box_pred, logits, box_true, labels = _case(seed)
    loss = MultiBoxLoss(neg_pos_ratio=ratio)
    expected = numpy_multibox(box_pred, logits, box_true, labels, ratio)
    outputs = {"boxes": tf.constant(box_pred), "classes": tf.constant(logits)}
    targets = {"boxes": tf.constant(box_true), "classes": tf.constant(labels)}
    for run in (loss, tf.function(loss), tf.function(loss, jit_compile=True)):
        got = run(outputs, targets)
        assert got["loc"].numpy() == pytest.approx(expected[0], rel=1e-4)
        assert got["conf"].numpy() == pytest.approx(expected[1], rel=1e-4)


def test_multibox_with_no_positive_in_the_batch_is_zero_and_gradients_are_finite():
    box_pred, logits, box_true, labels = _case(3)
    labels = np.where(labels > 0, 0, labels)  # no object anywhere in the batch
    variables = [tf.Variable(box_pred), tf.Variable(logits)]
    with tf.GradientTape() as tape:
        got = MultiBoxLoss()({"boxes": variables[0], "classes": variables[1]}, {"boxes": box_true, "classes": labels})
        total = got["loc"] + got["conf"]
    assert got["loc"].numpy() == 0.0 and got["conf"].numpy() == 0.0  # no positives: k = 0, nothing counts
    for grad in tape.gradient(total, variables):  # 0/max(0, 1): zero gradients, not NaN
        assert grad is not None and np.isfinite(grad.numpy()).all() and not grad.numpy().any()
    box_pred, logits, box_true, labels = _case(4)
    with tf.GradientTape() as tape:
        outputs = {"boxes": variables[0], "classes": variables[1]}
        got = MultiBoxLoss()(outputs, {"boxes": box_true, "classes": labels})
        total = got["loc"] + got["conf"]
    for grad in tape.gradient(total, variables):
        assert np.isfinite(grad.numpy()).all() and np.abs(grad.numpy()).sum() > 0


def test_multibox_key_names_are_configurable_and_missing_keys_are_named():
    box_pred, logits, box_true, labels = _case(5)
    loss = MultiBoxLoss(boxes="loc_out", classes="cls_out")
    got = loss({"loc_out": box_pred, "cls_out": logits}, {"loc_out": box_true, "cls_out": labels})
    assert got["conf"].numpy() == pytest.approx(numpy_multibox(box_pred, logits, box_true, labels)[1], rel=1e-4)
    # A model whose class output is named "classes" (the default) while the loss reads "cls_out".
    inp = keras.layers.Input((30, 4))
    model = keras.Model(inp, {"loc_out": keras.layers.Dense(4)(inp), "classes": keras.layers.Dense(4)(inp)})
    trainer = Trainer(model, loss=loss)
    data = (box_true, {"loc_out": box_true, "cls_out": labels})
    with pytest.raises(MissingKeyError, match=r"the loss reads output 'cls_out', .* outputs are: 'classes', 'loc_out'"):
        trainer.fit(data, batch_size=4, progress=False)
    assert trainer.global_step == 0


def numpy_focal(labels, logits, gamma, alpha):
    log_p = _log_softmax(logits.astype(np.float64))
    log_pt = np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
    weight = 1.0 if alpha is None else np.where(labels > 0, alpha, 1 - alpha)
    return -weight * (1 - np.exp(log_pt)) ** gamma * log_pt


@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, 0.25), (0.0, None), (1.5, None)])
def test_focal_loss_matches_numpy(gamma, alpha):
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 4, (5, 7))
    logits = rng.normal(size=(5, 7, 4)).astype(np.float32) * 2
    got = sparse_focal_loss(labels, logits, gamma=gamma, alpha=alpha).numpy()
    np.testing.assert_allclose(got, numpy_focal(labels, logits, gamma, alpha), rtol=1e-5)
    # As a per-output loss: the mean over examples, labels with or without a trailing 1.
    loss = per_output(SparseFocalLoss(gamma=gamma, alpha=alpha), output="cls")
    value = loss({"cls": logits[0]}, {"cls": labels[0][:, None]})
    assert value.numpy() == pytest.approx(numpy_focal(labels[0], logits[0], gamma, alpha).mean(), rel=1e-5)


@pytest.mark.parametrize(("gamma", "alpha"), [(0.0, None), (2.0, None), (3.5, 0.4)])
def test_focal_loss_matches_keras_categorical_focal_crossentropy(gamma, alpha):
    """Keras' own focal loss (one-hot labels, a scalar alpha for every class) is the outside reference; tapeloop's
    alpha weighs the background class 0 by 1 - alpha, so with an alpha the labels here are object classes only."""
    rng = np.random.default_rng(8)
    labels = rng.integers(0 if alpha is None else 1, 5, 64)
    logits = rng.normal(size=(64, 5)).astype(np.float32) * 2
    keras_focal = keras.losses.CategoricalFocalCrossentropy(alpha=1.0 if alpha is None else alpha, gamma=gamma,
                                                            from_logits=True)  # fmt: skip
    expected = keras_focal(np.eye(5, dtype=np.float32)[labels], logits).numpy()
    assert SparseFocalLoss(gamma=gamma, alpha=alpha)(labels, logits).numpy() == pytest.approx(expected, rel=1e-6)


def test_sparse_focal_loss_survives_keras_serialization():
    """``from_config`` failed ("unexpected keyword argument 'reduction'"): a saved model or loss could not load."""
    loss = SparseFocalLoss(gamma=3.0, alpha=None)
    again = keras.losses.deserialize(keras.losses.serialize(loss), custom_objects={"SparseFocalLoss": SparseFocalLoss})
    labels, logits = np.array([0, 2, 1]), np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    assert (again.gamma, again.alpha, again.reduction) == (3.0, None, "sum_over_batch_size")
    assert again(labels, logits).numpy() == loss(labels, logits).numpy()


@pytest.mark.parametrize(
    ("make", "exc", "message"),
    [
        (lambda: SparseFocalLoss(gamma=-1), ValueError, "SparseFocalLoss' gamma must be >= 0, got -1"),
        (lambda: SparseFocalLoss(alpha=2), ValueError, "SparseFocalLoss' alpha must be <= 1, got 2"),
        (lambda: MultiBoxLoss("3"), TypeError, "MultiBoxLoss' neg_pos_ratio must be a finite number, got '3'"),
        (lambda: MultiBoxLoss(focal_gamma=float("nan")), TypeError, "focal_gamma must be a finite number, got nan"),
        (lambda: CAGrad(c="a"), TypeError, "CAGrad's c must be a finite number, got 'a'"),
        (lambda: PCGrad(seed="x"), TypeError, "PCGrad's seed must be an int, got 'x'"),
        (lambda: GradNorm(alpha=-1), ValueError, "GradNorm's alpha must be >= 0, got -1"),
        (lambda: DWA(0), ValueError, "DWA's temperature must be > 0, got 0"),
        (lambda: UncertaintyWeighting({"a": "mse"}), TypeError, "takes {name: loss callable(outputs, targets)}"),
        (  # a misspelt key was silently weighed as classification, twice the regression term
            lambda: UncertaintyWeighting({"a": lambda o, t: 0.0}, regression=["A"], keys=["a"]),
            ValueError,
            "regression names 'A', which are not component keys; the keys are 'a'",
        ),
    ],
)
def test_constructor_arguments_are_checked_with_their_names(make, exc, message):
    """A string or NaN where a number goes was a bare comparison or int() error, or no error at all."""
    with pytest.raises(exc, match=re.escape(message)):
        make()


def test_multibox_focal_option_matches_numpy():
    box_pred, logits, box_true, labels = _case(7)
    got = MultiBoxLoss(focal_gamma=2.0, focal_alpha=0.25)(
        {"boxes": box_pred, "classes": logits}, {"boxes": box_true, "classes": labels}
    )
    focal = numpy_focal(np.maximum(labels, 0), logits, 2.0, 0.25)
    expected = (focal * (labels >= 0)).sum() / max((labels > 0).sum(), 1)
    assert got["conf"].numpy() == pytest.approx(expected, rel=1e-5)
    assert got["loc"].numpy() == pytest.approx(numpy_multibox(box_pred, logits, box_true, labels)[0], rel=1e-5)


def test_uncertainty_weighting_objective_matches_numpy_and_its_variables_train():
    inp = keras.layers.Input((3,))
    model = keras.Model(inp, {"a": keras.layers.Dense(1)(inp), "b": keras.layers.Dense(2)(inp)})
    rng = np.random.default_rng(8)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = {"a": rng.normal(size=(16, 1)).astype("float32"), "b": rng.integers(0, 2, 16)}
    weighting = UncertaintyWeighting(
        {
            "reg": per_output("mse", output="a"),
            "cls": per_output(keras.losses.SparseCategoricalCrossentropy(True), output="b"),
        },
        regression={"reg"},
    )
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.1), loss=weighting, metrics={"uw": weighting.observe})
    assert not weighting.log_variances
    trainer.evaluate((x, y), batch_size=16)  # the first (eager) call creates one log-variance per component
    assert set(weighting.log_variances) == {"reg", "cls"}
    weighting.log_variances["reg"].assign(0.3)
    weighting.log_variances["cls"].assign(-0.2)
    logs = trainer.evaluate((x, y), batch_size=16)
    out = model.predict(x, verbose=0)
    mse = np.mean((out["a"] - y["a"]) ** 2)
    ce = -np.mean(_log_softmax(out["b"].astype(np.float64))[np.arange(16), y["b"]])
    assert logs["uw/reg"] == pytest.approx(mse, rel=1e-5)
    assert logs["uw/weight/cls"] == pytest.approx(np.exp(0.2), rel=1e-6)
    assert logs["reg"] == pytest.approx(0.5 * np.exp(-0.3) * mse + 0.5 * 0.3, rel=1e-5)
    assert logs["cls"] == pytest.approx(np.exp(0.2) * ce + 0.5 * -0.2, rel=1e-5)
    assert logs["loss"] == pytest.approx(logs["reg"] + logs["cls"], rel=1e-6)
    trainer.fit((x, y), batch_size=8, epochs=3, progress=False)
    assert weighting.log_variances["reg"].numpy() != pytest.approx(0.3)
    assert weighting.log_variances["cls"].numpy() != pytest.approx(-0.2)


def test_focal_and_uncertainty_weighting_agree_eagerly_in_graph_and_under_xla():
    rng = np.random.default_rng(9)
    labels = tf.constant(rng.integers(0, 4, (6, 5)))
    logits = tf.constant(rng.normal(size=(6, 5, 4)).astype(np.float32))
    weighting = UncertaintyWeighting(
        {"f": lambda o, t: tf.reduce_mean(sparse_focal_loss(t["y"], o["z"]))}, keys=["f"], regression=()
    )
    weighting.log_variances["f"].assign(0.4)

    def both(z, y):
        return tf.reduce_mean(sparse_focal_loss(y, z, gamma=2.0)), weighting({"z": z}, {"y": y})["f"]

    eager = both(logits, labels)
    for run in (tf.function(both), tf.function(both, jit_compile=True)):
        for got, want in zip(run(logits, labels), eager):
            assert got.numpy() == pytest.approx(want.numpy(), rel=1e-5)
    focal_mean = numpy_focal(labels.numpy(), logits.numpy(), 2.0, 0.25).mean()
    assert eager[1].numpy() == pytest.approx(np.exp(-0.4) * focal_mean + 0.2, rel=1e-5)
