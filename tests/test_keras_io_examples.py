"""Held against keras.io's examples run under Model.fit as printed there: the VAE (its own train_step), knowledge
distillation (its Distiller's compute_loss), each against the same objective written as a tapeloop loss; the
endpoint layer (add_loss and a metric inside a layer, compile without a loss) and the Functional API guide's
multi-input, multi-output model, run as printed."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers, ops
from sklearn.datasets import load_digits

from tests import helpers
from tests.helpers import ATOL, RTOL, assert_history_close, assert_weights_close
from trainer import Trainer

# -- the keras.io VAE (examples/generative/vae.py, Keras 3 form) -------------------------------------------------------


class Sampling(layers.Layer):
    """keras.io's: draws from its own SeedGenerator whatever ``training`` is."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        batch, dim = ops.shape(z_mean)[0], ops.shape(z_mean)[1]
        epsilon = keras.random.normal(shape=(batch, dim), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon


def _vae_parts(latent_dim: int = 2):
    keras.utils.set_random_seed(11)  # the same initial weights for the reference and for the Trainer
    encoder_inputs = keras.Input(shape=(28, 28, 1))
    x = layers.Conv2D(32, 3, activation="relu", strides=2, padding="same")(encoder_inputs)
    x = layers.Conv2D(64, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(16, activation="relu")(x)
    z_mean = layers.Dense(latent_dim, name="z_mean")(x)
    z_log_var = layers.Dense(latent_dim, name="z_log_var")(x)
    z = Sampling()([z_mean, z_log_var])
    encoder = keras.Model(encoder_inputs, [z_mean, z_log_var, z], name="encoder")
    latent_inputs = keras.Input(shape=(latent_dim,))
    x = layers.Dense(7 * 7 * 64, activation="relu")(latent_inputs)
    x = layers.Reshape((7, 7, 64))(x)
    x = layers.Conv2DTranspose(64, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Conv2DTranspose(32, 3, activation="relu", strides=2, padding="same")(x)
    decoder_outputs = layers.Conv2DTranspose(1, 3, activation="sigmoid", padding="same")(x)
    return encoder, keras.Model(latent_inputs, decoder_outputs, name="decoder")


class VAE(keras.Model):
    """keras.io's VAE with its own train_step, run by Model.fit."""

    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.decoder = encoder, decoder
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.kl_loss_tracker]

    def train_step(self, data):
        with tf.GradientTape() as tape:
            z_mean, z_log_var, z = self.encoder(data)
            reconstruction = self.decoder(z)
            reconstruction_loss = ops.mean(ops.sum(keras.losses.binary_crossentropy(data, reconstruction), axis=(1, 2)))
            kl_loss = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
            kl_loss = ops.mean(ops.sum(kl_loss, axis=1))
            total_loss = reconstruction_loss + kl_loss
        grads = tape.gradient(total_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.total_loss_tracker.update_state(total_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return {m.name: m.result() for m in self.metrics}


def vae_loss(outputs, targets):
    """The same objective as a tapeloop loss: one callable reading all three outputs, two components."""
    reconstruction = ops.mean(
        ops.sum(keras.losses.binary_crossentropy(targets["image"], outputs["reconstruction"]), axis=(1, 2))
    )
    z_mean, z_log_var = outputs["z_mean"], outputs["z_log_var"]
    kl = ops.mean(ops.sum(-0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var)), axis=1))
    return {"reconstruction": reconstruction, "kl": kl}


def test_keras_io_vae_matches_its_own_train_step_under_fit():
    digits = load_digits().images[:128] / 16.0  # 8x8 -> 24x24 -> padded 28x28, in [0, 1]
    images = np.pad(np.kron(digits, np.ones((3, 3))), ((0, 0), (2, 2), (2, 2)))[..., None].astype("float32")
    reference = VAE(*_vae_parts())
    reference.compile(optimizer=keras.optimizers.Adam())
    theirs = reference.fit(images, epochs=3, batch_size=32, shuffle=False, verbose=0).history
    encoder, decoder = _vae_parts()
    inputs = keras.Input(shape=(28, 28, 1))
    z_mean, z_log_var, z = encoder(inputs)
    model = keras.Model(inputs, {"z_mean": z_mean, "z_log_var": z_log_var, "reconstruction": decoder(z)})
    trainer = Trainer(model, optimizer=keras.optimizers.Adam(), loss=vae_loss, steps_per_execution=1)
    ours = trainer.fit((images, {"image": images}), batch_size=32, epochs=3, shuffle=False, progress=False).history
    assert_history_close(ours, theirs, {"loss": "total_loss", "reconstruction": "reconstruction_loss", "kl": "kl_loss"})
    for mine, keras_weight in zip(
        encoder.weights + decoder.weights, reference.encoder.weights + reference.decoder.weights
    ):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(keras_weight), rtol=RTOL, atol=ATOL)


def test_the_keras_io_vae_itself_is_told_that_its_train_step_is_not_called():
    """Passing the VAE class as printed: tapeloop would silently bypass its train_step (and with no loss there was
    only "`loss` is required"); likewise a compiled model's loss is named, not read."""
    vae = VAE(*_vae_parts())
    with pytest.raises(ValueError, match=r"`loss` is required\. VAE\.train_step will not be called: the Trainer runs"):
        Trainer(vae)
    with pytest.warns(UserWarning, match=r"VAE\.train_step will not be called"):
        Trainer(vae, loss=vae_loss)
    inputs = keras.Input((3,))
    compiled = keras.Model(inputs, layers.Dense(1)(inputs))
    compiled.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match=r"does not read model\.compile\(\)'s arguments; .* loss='mse'"):
        Trainer(compiled)


# -- keras.io "Knowledge Distillation" (its Keras 3 form: compute_loss) -----------------------------------------------


class Distiller(keras.Model):
    """keras.io's Distiller: ``alpha``·student loss + (1 - alpha)·T²·KL(soft teacher || soft student)."""

    def __init__(self, student, teacher):
        super().__init__()
        self.teacher = teacher
        self.student = student

    def compile(self, optimizer, metrics, student_loss_fn, distillation_loss_fn, alpha=0.1, temperature=3):
        super().compile(optimizer=optimizer, metrics=metrics)
        self.student_loss_fn = student_loss_fn
        self.distillation_loss_fn = distillation_loss_fn
        self.alpha = alpha
        self.temperature = temperature

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, allow_empty=False):
        teacher_pred = self.teacher(x, training=False)
        student_loss = self.student_loss_fn(y, y_pred)
        distillation_loss = self.distillation_loss_fn(
            ops.softmax(teacher_pred / self.temperature, axis=1), ops.softmax(y_pred / self.temperature, axis=1)
        ) * (self.temperature**2)
        return self.alpha * student_loss + (1 - self.alpha) * distillation_loss

    def call(self, x):
        return self.student(x)


def _teacher_and_student() -> tuple[keras.Model, keras.Model]:
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((12,)), layers.Dense(32, "relu"), layers.Dropout(0.5), layers.Dense(5)])
    student = keras.Sequential([keras.Input((12,)), layers.Dense(8, "relu"), layers.Dense(5)])
    teacher.trainable = False
    return teacher, student


@pytest.mark.parametrize("wrapped", [True, False], ids=["inference-layer", "functional-training-false"])
def test_readme_distillation_matches_the_keras_io_distiller_under_fit(wrapped):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(128, 12)).astype("float32"), rng.integers(0, 5, 128)
    teacher, student = _teacher_and_student()
    reference = Distiller(student, teacher)
    reference.compile(
        keras.optimizers.Adam(1e-2),
        [],
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras.losses.KLDivergence(),
        alpha=0.1,
        temperature=3,
    )
    theirs = reference.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0).history

    inference, distillation = helpers.readme_definition("Inference"), helpers.readme_definition("distillation")
    teacher, mine = _teacher_and_student()
    inp = keras.Input((12,))
    soft_targets = inference(teacher)(inp) if wrapped else teacher(inp, training=False)
    model = keras.Model(inp, {"student": mine(inp), "teacher": soft_targets})
    weights = {"kd/student": 0.1, "kd/distillation": 0.9}
    trainer = Trainer(model, optimizer=keras.optimizers.Adam(1e-2), loss={"kd": distillation}, loss_weights=weights)
    ours = trainer.fit((x, {"label": y}), batch_size=16, epochs=3, shuffle=False, progress=False).history

    if not wrapped:  # Keras 3 passes the model's training=True on to the teacher: its dropout is on
        assert not np.allclose(ours["loss"], theirs["loss"], rtol=1e-2)
        return
    assert_history_close(ours, theirs, {"loss": "loss"})
    np.testing.assert_allclose(0.1 * np.array(ours["kd/student"]) + 0.9 * np.array(ours["kd/distillation"]),
                               ours["loss"], rtol=RTOL)  # fmt: skip
    assert_weights_close(mine, student)
    assert not teacher.trainable_weights and all(
        np.array_equal(a, b) for a, b in zip(helpers.weights(teacher), helpers.weights(reference.teacher))
    )


# -- keras.io "Training & evaluation with the built-in methods": the endpoint layer pattern ---------------------------


class LogisticEndpoint(layers.Layer):
    """keras.io's: the layer adds its loss (``add_loss``) and updates its own metric; the model has no loss."""

    def __init__(self, name=None):
        super().__init__(name=name)
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
        self.accuracy_fn = keras.metrics.BinaryAccuracy()

    def call(self, targets, logits, sample_weights=None):
        loss = self.loss_fn(targets, logits, sample_weights)
        self.add_loss(loss)
        self.accuracy_fn.update_state(targets, logits, sample_weights)
        return ops.softmax(logits)


def _endpoint_model() -> keras.Model:
    keras.utils.set_random_seed(3)
    inputs = keras.Input(shape=(3,), name="inputs")
    targets = keras.Input(shape=(10,), name="targets")
    logits = layers.Dense(10)(inputs)
    sample_weights = keras.Input(shape=(1,), name="sample_weights")
    preds = LogisticEndpoint(name="predictions")(targets, logits, sample_weights)
    return keras.Model(inputs=[inputs, targets, sample_weights], outputs=preds)


def test_the_keras_io_endpoint_layer_trains_without_a_loss_and_logs_its_metric_as_fit():
    """``compile(optimizer="adam")`` with no loss: Model.fit trains ``model.losses`` and logs the layer's metric
    (was: "`loss` is required", and a layer's metric was never logged)."""
    rng = np.random.default_rng(0)
    data = {
        "inputs": rng.random((96, 3)).astype("float32"),
        "targets": rng.integers(0, 2, (96, 10)).astype("float32"),
        "sample_weights": rng.random((96, 1)).astype("float32"),
    }
    reference = _endpoint_model()
    reference.compile(optimizer=keras.optimizers.Adam(0.05))
    theirs = reference.fit(data, batch_size=32, epochs=3, shuffle=False, verbose=0, validation_data=(data,)).history
    model = _endpoint_model()
    trainer = Trainer(model, optimizer=keras.optimizers.Adam(0.05))
    ours = trainer.fit(data, batch_size=32, epochs=3, shuffle=False, progress=False, validation_data=(data,)).history
    keys = ("loss", "binary_accuracy", "val_loss", "val_binary_accuracy")
    assert_history_close(ours, theirs, {key: key for key in keys})
    np.testing.assert_allclose(ours["regularization"], ours["loss"], rtol=RTOL)  # model.losses: the whole objective
    assert len(set(np.round(ours["binary_accuracy"], 6))) > 1  # it moves: a live metric, not a constant
    assert_weights_close(model, reference)
    assert trainer.evaluate(data, batch_size=32)["binary_accuracy"] == pytest.approx(
        reference.evaluate(data, batch_size=32, verbose=0, return_dict=True)["binary_accuracy"], rel=RTOL
    )


def test_no_loss_and_a_model_without_losses_is_named_before_any_update():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layers.Dense(1)(inputs))
    before = helpers.weights(model)
    with pytest.raises(ValueError, match=r"no `loss` was given and the model has no losses of its own \(add_loss\)"):
        Trainer(model).fit(np.zeros((4, 3), "float32"), np.zeros((4, 1), "float32"), progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(before, helpers.weights(model)))


# -- keras.io "The Functional API": the multi-input, multi-output model ------------------------------------------------


def _ticket_model() -> keras.Model:
    """keras.io's ticket classifier (title, body, tags -> priority, department), smaller; its outputs a dict."""
    keras.utils.set_random_seed(0)
    title, body = keras.Input(shape=(None,), name="title"), keras.Input(shape=(None,), name="body")
    tags = keras.Input(shape=(12,), name="tags")
    title_features = layers.LSTM(8)(layers.Embedding(100, 16)(title))
    body_features = layers.LSTM(8)(layers.Embedding(100, 16)(body))
    x = layers.concatenate([title_features, body_features, tags])
    outputs = {"priority": layers.Dense(1, name="priority")(x), "department": layers.Dense(4, name="department")(x)}
    return keras.Model(inputs=[title, body, tags], outputs=outputs)


@pytest.mark.parametrize("form", ["dicts", "lists"])
def test_the_keras_io_multi_input_multi_output_model_matches_fit(form):
    """As printed (dicts), and compile's lists with ``y=[...]``, which follow ``model.output_names`` — sorted for a
    dict of outputs: department, then priority (the lists were read in the dict's order, b before a: swapped)."""
    rng = np.random.default_rng(0)
    inputs = [rng.integers(100, size=(64, 10)), rng.integers(100, size=(64, 20)), rng.integers(2, size=(64, 12))]
    priority, department = rng.random(size=(64, 1)), rng.integers(2, size=(64, 4))
    bce, cce = keras.losses.BinaryCrossentropy(from_logits=True), keras.losses.CategoricalCrossentropy(from_logits=True)
    if form == "dicts":
        x = dict(zip(("title", "body", "tags"), inputs))
        y, kwargs = (
            {"priority": priority, "department": department},
            {"loss": {"priority": bce, "department": cce}, "loss_weights": {"priority": 1.0, "department": 0.2}},
        )
    else:
        x, y, kwargs = inputs, [department, priority], {"loss": [cce, bce], "loss_weights": [0.2, 1.0]}
    reference = _ticket_model()
    reference.compile(optimizer=keras.optimizers.RMSprop(1e-3), **kwargs)
    theirs = reference.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
    model = _ticket_model()
    trainer = Trainer(model, optimizer=keras.optimizers.RMSprop(1e-3), **kwargs)
    ours = trainer.fit(x, y, batch_size=32, epochs=2, shuffle=False, progress=False).history
    assert_history_close(ours, theirs, {"loss": "loss", "priority": "priority_loss", "department": "department_loss"})
    assert_weights_close(model, reference)
