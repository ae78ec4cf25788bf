"""Errors in what runs: a user's loss, metric or model raising, and an operation failing inside a compiled block on
a later batch — named (who, what it was given, which steps), before any weight changes where it can be."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer import StepError, Trainer, UserCodeError


def _shapes_model() -> keras.Model:
    inp = keras.layers.Input((32, 1))
    return keras.Model(inp, {"x": keras.layers.Dense(1, activation="sigmoid")(inp)})


def test_an_error_inside_a_users_loss_names_the_loss_and_every_tensor_it_was_given():
    """The issue's case: an output (B, 32, 1) against a target (B, 64, 1) inside a custom loss."""

    def recon(outputs, targets):
        return keras.ops.mean(keras.losses.binary_crossentropy(targets["x"], outputs["x"]))

    trainer = Trainer(_shapes_model(), loss={"recon": recon})
    data = (np.zeros((8, 32, 1), "float32"), {"x": np.zeros((8, 64, 1), "float32")})
    message = (
        "loss 'recon' raised ValueError: Arguments `target` and `output` must have the same shape.*\n"
        "It was given:\n  output 'x': shape \\(4, 32, 1\\), float32\n  target 'x': shape \\(4, 64, 1\\), float32$"
    )
    helpers.fails_before_update(trainer, UserCodeError, message, data, batch_size=4)
    with pytest.raises(UserCodeError) as caught:
        trainer.fit(data, batch_size=4, progress=False)
    assert type(caught.value.__cause__) is ValueError  # the original, kept as the cause


def test_an_error_a_keras_layer_raises_is_named_by_its_own_message_not_keras_wrapper():
    """Keras wraps an error raised in a layer's call: "Exception encountered when calling Boom.call()." first, the
    layer's own message (in bold, ANSI escapes) on a later line; the error showed only Keras' first line."""

    class Boom(keras.layers.Layer):
        def call(self, x):
            if x.shape[0] is not None:  # (not while the functional model is built on symbolic inputs)
                raise ValueError("boom: the layer's own message")
            return x

    inputs = keras.Input((4,))
    trainer = Trainer(keras.Model(inputs, keras.layers.Dense(1)(Boom()(inputs))), optimizer="sgd", loss="mse")
    message = (
        "^the model raised ValueError: boom: the layer's own message \\(in Boom.call\\)\n"
        "It was given:\n  input 'x': shape \\(1, 4\\), float32$"
    )
    helpers.fails_before_update(
        trainer, UserCodeError, message, np.zeros((8, 4), "float32"), np.zeros((8, 1), "float32")
    )


def test_an_error_only_at_trace_time_names_the_metric_too():
    """Eagerly `.numpy()` works (the first-batch check passes); inside the compiled step it cannot."""

    def peak(outputs, targets):
        return float(np.max(outputs["x"].numpy()))

    trainer = Trainer(_shapes_model(), loss="mse", metrics={"peak": peak})
    data = (np.zeros((8, 32, 1), "float32"), {"x": np.zeros((8, 32, 1), "float32")})
    message = "metric 'peak' raised AttributeError: .*numpy.*\nIt was given:\n  output 'x': shape \\(None, 32, 1\\)"
    helpers.fails_before_update(trainer, UserCodeError, message, data, batch_size=4)


def test_a_keras_style_loss_function_gets_a_hint_and_the_model_is_named_when_it_raises():
    def keras_style(y_true, y_pred):
        return keras.ops.mean((y_true - y_pred) ** 2)

    trainer = Trainer(_shapes_model(), loss=keras_style)
    data = (np.zeros((8, 32, 1), "float32"), {"x": np.zeros((8, 32, 1), "float32")})
    helpers.fails_before_update(trainer, UserCodeError, "(?s)the loss raised TypeError.*use losses.per_output", data)
    narrow = Trainer(_shapes_model(), loss={"x": "mse"})
    message = "the model raised ValueError: .*\nIt was given:\n  input 'x': shape \\(8, 16, 1\\), float32"
    helpers.fails_before_update(narrow, UserCodeError, message, (np.zeros((8, 16, 1), "float32"), {"x": data[1]["x"]}))


def test_an_operation_failing_on_a_later_batch_names_the_steps_and_keeps_the_steps_before():
    """A label out of range in the 3rd batch: the first-batch check cannot see it; TensorFlow's error was bare."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    labels = rng.integers(0, 4, 64)
    labels[40] = 7  # batch 3 of 16

    def model():
        keras.utils.set_random_seed(0)
        inp = keras.layers.Input((5,))
        return keras.Model(inp, keras.layers.Dense(4, activation="softmax")(inp))

    reference = model()
    args = {"batch_size": 16, "shuffle": False, "progress": False}
    Trainer(reference, optimizer="sgd", loss="sparse_categorical_crossentropy").fit(x[:32], labels[:32], **args)
    for spe, where in ((1, "step 3"), (4, "steps 1-4")):
        trained = model()
        trainer = Trainer(trained, optimizer="sgd", loss="sparse_categorical_crossentropy", steps_per_execution=spe)
        # TensorFlow's first failing op differs between runs: the loss's label check or a gather of the label's column
        failed = r"(Received a label value of 7|indices\[\d+\] = 7 is not in \[0, 4\))"
        message = rf"Training failed at {where} \(one compiled block\) with InvalidArgumentError: {failed}"
        with pytest.raises(StepError, match=message) as info:
            trainer.fit(x, labels, **args)
        assert isinstance(info.value.__cause__, tf.errors.InvalidArgumentError)
        assert ("steps_per_execution=1 names the exact step" in str(info.value)) == (spe > 1)
        helpers.assert_weights_close(trained, reference)  # the steps before the failing one were applied
    with pytest.raises(StepError, match=r"Evaluation failed at batch 3 \(one compiled block\) with InvalidArg"):
        Trainer(model(), loss="sparse_categorical_crossentropy", steps_per_execution=1).evaluate(
            x, labels, batch_size=16
        )


def test_a_dataset_whose_batches_change_shape_names_the_steps():
    x = np.ones((32, 5), "float32")
    data = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(16)
    data = data.concatenate(tf.data.Dataset.from_tensor_slices((x[:, :4], x[:, :1])).batch(16))
    inp = keras.layers.Input((5,))
    trainer = Trainer(keras.Model(inp, keras.layers.Dense(1)(inp)), loss="mse", steps_per_execution=1)
    with pytest.raises(StepError, match=r"Training failed at step 3 .*Matrix size-incompatible: In\[0\]: \[16,4\]"):
        trainer.fit(data, progress=False)
    with pytest.raises(StepError, match=r"Prediction failed at batch 3 \(one compiled block\) with InvalidArgument"):
        trainer.predict(data.map(lambda x, y: x))


@pytest.mark.parametrize(
    "metric, error",
    [
        ("mae", "InvalidArgumentError: Incompatible shapes: \\[4\\] vs. \\[4,3\\]$"),  # was a StepError naming none
        (
            "top_k_categorical_accuracy",
            "InvalidArgumentError: targets must be 1-dimensional$",
        ),  # was a bare trace-time error
    ],
)
def test_a_keras_metric_that_fails_on_the_first_batch_is_named_before_any_update(metric, error):
    """Sparse labels (B,) against a softmax (B, 3): both metrics fail in Model.fit too (with TensorFlow's error)."""
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    trainer = Trainer(model, loss="sparse_categorical_crossentropy", metrics=[metric])
    x, y = np.zeros((8, 5), "float32"), np.zeros(8, "int64")
    message = (
        f"(?m)Keras metric '{metric}' on output 'output' raised {error}\nIt was given:\n"
        "  target 'output': shape \\(4,\\), int64\n  output 'output': shape \\(4, 3\\), float32"
    )
    helpers.fails_before_update(trainer, UserCodeError, message, x, y, batch_size=4)
