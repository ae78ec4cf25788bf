"""Bad input gets a clear error naming what is wrong and what exists — raised before any weight changes."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from trainer import (
    DataError,
    MissingKeyError,
    NonFiniteLossError,
    ShapeMismatchError,
    Trainer,
)

LOSSES = {"regression_output": "mse", "classification_output": "categorical_crossentropy"}


def test_loss_reading_a_missing_output_names_it_and_lists_outputs():
    def loss(outputs, targets):
        return tf.reduce_mean(outputs["boxes"])

    trainer = Trainer(helpers.example1(), loss={"det": loss})
    helpers.fails_before_update(
        trainer,
        MissingKeyError,
        "loss 'det' reads output 'boxes', which does not exist; the model's outputs are: "
        "'classification_output', 'regression_output'",
        helpers.example1_data(8),
    )


def test_loss_reading_a_missing_target_names_it_and_lists_targets():
    trainer = Trainer(helpers.example1(), loss=lambda o, t: tf.reduce_mean(o["regression_output"] - t["regresion"]))
    helpers.fails_before_update(
        trainer,
        MissingKeyError,
        "the loss reads target 'regresion', which does not exist; the data's targets are: "
        "'classification_output', 'regression_output'",
        helpers.example1_data(8),
    )


def test_metric_reading_a_missing_output_or_target():
    trainer = Trainer(helpers.example1(), loss=LOSSES, metrics={"regression": ["mae"]})
    helpers.fails_before_update(
        trainer, MissingKeyError, "metrics\\['regression'\\] reads output 'regression'", helpers.example1_data(8)
    )
    x, y = helpers.example1_data(8)
    trainer = Trainer(helpers.example1(), loss=LOSSES, metrics={"peek": lambda o, t: tf.reduce_mean(t["weights"])})
    helpers.fails_before_update(trainer, MissingKeyError, "metric 'peek' reads target 'weights'", (x, y))


def test_validation_data_missing_a_target_fails_before_training():
    x, y = helpers.example1_data(8)
    trainer = Trainer(helpers.example1(), loss=LOSSES)
    val = (x, {"regression_output": y["regression_output"]})
    helpers.fails_before_update(
        trainer, MissingKeyError, "reads target 'classification_output'", (x, y), validation_data=val
    )


def test_seed001_example2_as_printed_14x14_output_against_28x28_targets():
    trainer = Trainer(
        helpers.example2(image_size=14), loss={"vector_output": "binary_crossentropy", "image_output": "mse"}
    )
    helpers.fails_before_update(
        trainer,
        ShapeMismatchError,
        re.escape(
            "Output 'image_output' has shape (8, 14, 14, 1) but its target 'image_output' has shape (8, 28, 28, 1)"
        ),
        helpers.example2_data(8),
        batch_size=8,
    )


def test_seed001_example3_as_printed_names_on_inner_layers():
    trainer = Trainer(
        helpers.example3(as_printed=True), loss={"output_1": "mse", "output_2": "categorical_crossentropy"}
    )
    helpers.fails_before_update(
        trainer,
        MissingKeyError,
        "loss 'output_1' reads output 'output_1', which does not exist; the model's outputs are: 'dense_.*'. "
        "'output_1' is a layer inside the model but not one of its outputs",
        helpers.example3_data(8),
    )


def test_sparse_labels_of_the_wrong_shape():
    inp = keras.layers.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(3, name="cls")(inp))
    trainer = Trainer(model, loss={"output": keras.losses.SparseCategoricalCrossentropy(from_logits=True)})
    x = np.zeros((6, 4), "float32")
    helpers.fails_before_update(
        trainer, ShapeMismatchError, "sparse loss wants integer labels of shape", (x, {"output": np.zeros((6, 2))})
    )


def test_inputs_alone_for_a_loss_that_reads_targets_names_the_target():
    trainer = Trainer(helpers.example1(), loss=LOSSES)
    message = "reads target 'regression_output', which does not exist; the data's targets are: (none)"
    helpers.fails_before_update(trainer, MissingKeyError, re.escape(message), np.zeros((4, 100), np.float32))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ((np.zeros((4, 100)), np.zeros((4, 1))), "targets must be a dict"),
        ((np.zeros((0, 100)), {"regression_output": np.zeros((0, 1))}), "training data is empty"),
        (
            (np.zeros((4, 100)), {"regression_output": np.zeros((4, 1)), "classification_output": np.zeros((3, 3))}),
            re.escape(
                "arrays differ in length (number of examples): x: 4, targets['regression_output']: 4, "
                "targets['classification_output']: 3"
            ),
        ),
        (tf.data.Dataset.from_tensor_slices((np.zeros((4, 100)), np.zeros((4, 1)))).batch(2), "targets a dict"),
        (
            tf.data.Dataset.from_tensor_slices((np.zeros((4, 100)), {"regression_output": np.zeros((4, 1))}))
            .batch(2)
            .filter(lambda x, y: False),
            "training data is empty",
        ),
        (tf.data.Dataset.range(0).map(lambda i: (i, {"a": i})), "training data is empty"),
        (  # was TensorFlow's "Failed to convert a NumPy array to a Tensor (Unsupported object type NoneType)"
            (np.zeros((4, 100)), {"regression_output": np.array([None] * 4), "classification_output": np.zeros(4)}),
            re.escape("targets['regression_output'] (object) holds values that cannot become a tensor (Failed to"),
        ),
    ],
)
def test_bad_data_gets_its_own_message(data, message):
    trainer = Trainer(helpers.example1(), loss=LOSSES)
    helpers.fails_before_update(trainer, DataError, message, data)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"optimizer": "adamm"}, ValueError, "Unknown optimizer 'adamm'; known names: .*adam"),
        ({"steps_per_execution": 0}, ValueError, "`steps_per_execution` must be a positive int or 'auto', got 0"),
        ({"steps_per_execution": "fast"}, ValueError, "must be a positive int or 'auto', got 'fast'"),
        ({"loss": {"regression_output": "msee"}}, ValueError, "Unknown Keras loss 'msee'.*Did you mean"),
        ({"loss": "msee"}, ValueError, "Unknown Keras loss 'msee'.*Did you mean 'mse'"),  # also at the top level
        ({"loss": {"loss": "mse"}}, ValueError, "'loss' is a reserved key"),
        ({"loss": 3}, TypeError, "`loss` is a int"),
        ({"loss_weights": {"a": "big"}}, TypeError, "loss_weights\\['a'\\] must be a number"),
        ({"metrics": "accuracy"}, TypeError, "`metrics` must be a dict"),  # a list is Keras' form: see below
        ({"metrics": {"classification_output": [3]}}, TypeError, "holds 3"),
        ({"strategy": "mirrored"}, TypeError, "`strategy` must be a tf.distribute.Strategy"),
        ({"jit_compile": "yes"}, TypeError, "`jit_compile` must be True or False"),
    ],
)
def test_invalid_options_fail_in_the_constructor(kwargs, exc, message):
    kwargs = {"loss": LOSSES, **kwargs}
    with pytest.raises(exc, match=message):
        Trainer(helpers.example1(), **kwargs)


def test_unknown_loss_weight_key_lists_names_and_components():
    trainer = Trainer(helpers.example1(), loss=LOSSES, loss_weights={"regresion_output": 2.0})
    helpers.fails_before_update(
        trainer,
        ValueError,
        "loss_weights has keys 'regresion_output' that are neither a loss name nor a component key",
        helpers.example1_data(8),
    )


def test_top_level_keras_loss_on_an_output_with_a_reserved_name_is_named():
    inp = keras.layers.Input((2,))
    model = keras.Model(inp, {"loss": keras.layers.Dense(1)(inp), "b": keras.layers.Dense(1)(inp)})
    data = (np.ones((8, 2), "float32"), {"loss": np.ones((8, 1), "float32"), "b": np.ones((8, 1), "float32")})
    message = "`loss='mse'` applies to every output, and outputs 'loss' have a reserved key"
    helpers.fails_before_update(Trainer(model, loss="mse"), ValueError, message, data)


def test_loss_returning_a_vector_is_named():
    trainer = Trainer(helpers.example1(), loss={"reg": lambda o, t: tf.square(o["regression_output"])})
    helpers.fails_before_update(trainer, Exception, "loss 'reg' returned shape \\(8, 1\\)", helpers.example1_data(8))


def test_non_finite_loss_names_component_and_step_and_keeps_last_good_weights():
    """The loss turns NaN at the 3rd step (a counter inside the graph); weights stay those after step 2."""
    inp = keras.layers.Input((2,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    calls = tf.Variable(0)

    def loss(outputs, targets):
        calls.assign_add(1)
        mse = tf.reduce_mean(tf.square(outputs["output"] - targets["output"]))
        poison = tf.where(calls >= 4, np.nan, 0.0)  # call 1 is the structure check; step k is call k + 1
        return {"mse": mse, "aux": mse + poison}

    x = np.ones((8, 2), "float32")
    y = {"output": np.zeros((8, 1), "float32")}
    reference = helpers.clone(model)
    Trainer(
        reference,
        optimizer=keras.optimizers.SGD(0.1),
        loss=lambda o, t: {
            "mse": tf.reduce_mean(tf.square(o["output"] - t["output"])),
            "aux": tf.reduce_mean(tf.square(o["output"] - t["output"])),
        },
    ).fit((x, y), batch_size=2, epochs=1, steps_per_epoch=2, shuffle=False, progress=False)
    trainer = Trainer(model, optimizer=keras.optimizers.SGD(0.1), loss=loss, steps_per_execution=4)
    with pytest.raises(NonFiniteLossError, match="Non-finite loss at training step 3: loss=nan, aux=nan") as info:
        trainer.fit((x, y), batch_size=2, epochs=1, shuffle=False, progress=False)
    assert info.value.keys == ["loss", "aux"] and info.value.step == 3
    assert np.isfinite(info.value.values["mse"])
    assert trainer.global_step == 2
    for a, b in zip(helpers.weights(model), helpers.weights(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_suggestions_list_the_names_tapeloop_accepts():
    trainer = Trainer(helpers.example1(), loss=LOSSES, metrics={"classification_output": ["acuracy"]})
    helpers.fails_before_update(
        trainer, ValueError, "Unknown Keras metric 'acuracy'.*Did you mean 'accuracy'", *helpers.example1_data(8)
    )


def test_numpy_training_data_with_a_tf_data_validation_set():
    x, y = helpers.example1_data(32)
    val = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    trainer = Trainer(helpers.example1(), loss=LOSSES)
    logs = trainer.fit((x, y), batch_size=8, validation_data=val, shuffle=False, progress=False).history
    assert logs["val_loss"] == pytest.approx([trainer.evaluate(val)["loss"]], rel=1e-6)


def test_validation_problems_name_the_validation_data():
    x, y = helpers.example1_data(16)
    trainer = Trainer(helpers.example1(), loss=LOSSES)
    bad = (x, {"regression_output": y["regression_output"], "classes": y["classification_output"]})
    message = "validation data: loss 'classification_output' reads target 'classification_output'"
    helpers.fails_before_update(trainer, MissingKeyError, message, (x, y), validation_data=bad)
    nan = (x, {key: np.full_like(value, np.nan) for key, value in y.items()})
    with pytest.warns(RuntimeWarning, match=r"validation data gave non-finite values at epoch 1: val_loss=nan"):
        trainer.fit((x, y), validation_data=nan, progress=False)


def test_infinite_data_without_a_step_count_is_named_for_every_use():
    """fit refused infinite training data without steps_per_epoch, but validated, evaluated and predicted on an
    infinite dataset forever (Model.fit does too)."""
    x, y = helpers.small_data()
    endless = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    trainer = Trainer(helpers.small_model(), loss={"output": "mse"})
    for use, kwargs in [("training", {}), ("validation", {"steps_per_epoch": 2, "validation_data": endless})]:
        option = "validation_steps" if kwargs else "steps_per_epoch"
        message = rf"{use} data is infinite \(repeat\(\) without a count\); pass {option}\."
        helpers.fails_before_update(trainer, DataError, message, endless, **kwargs)
    with pytest.raises(DataError, match=r"evaluation data is infinite .*; pass steps\."):
        trainer.evaluate(endless)
    with pytest.raises(DataError, match=r"prediction data is infinite .*; pass steps\."):
        trainer.predict(endless)
    first_two = (x[:16], {"output": y["output"][:16]})
    assert trainer.evaluate(endless, steps=2)["loss"] == pytest.approx(trainer.evaluate(first_two)["loss"], rel=1e-6)
    assert len(trainer.predict(endless, steps=3)["output"]) == 24


def test_predict_names_an_output_it_cannot_join_across_batches():
    """Sequences padded per batch: the output is (2, 2, 2) in one batch and (2, 5, 2) in the next; numpy's own
    'all the input array dimensions except for the concatenation axis must match exactly' named neither. A scalar
    output: 'zero-dimensional arrays cannot be concatenated'."""
    inputs = keras.Input((None, 3))
    model = keras.Model(inputs, {"seq": keras.layers.Dense(2)(inputs)})
    sequences = [np.ones((n, 3), "float32") for n in (2, 2, 5, 5)]
    signature = tf.TensorSpec((None, 3), tf.float32)
    data = tf.data.Dataset.from_generator(lambda: iter(sequences), output_signature=signature).padded_batch(2)
    trainer = Trainer(model, optimizer="sgd", loss=lambda o, t: tf.reduce_mean(o["seq"]))
    message = (r"predict: the output 'seq' has shape \(2, 2, 2\) in batch 0 and \(2, 5, 2\) in batch 1.*"
               r"padded_shapes")  # fmt: skip
    with pytest.raises(DataError, match=message):
        trainer.predict(data)
    scale = keras.layers.Lambda(lambda t: tf.constant(2.0), output_shape=())(inputs)
    scalar = keras.Model(inputs, {"seq": model(inputs)["seq"], "scale": scale})
    with pytest.raises(DataError, match=r"predict: the output 'scale' is a scalar, with no batch axis"):
        Trainer(scalar, optimizer="sgd", loss=lambda o, t: tf.reduce_mean(o["seq"])).predict(np.ones((4, 5, 3)))
    fixed = tf.data.Dataset.from_generator(lambda: iter(sequences), output_signature=signature)
    found = trainer.predict(fixed.padded_batch(2, padded_shapes=(5, 3)))["seq"]
    np.testing.assert_allclose(found, model.predict(fixed.padded_batch(2, padded_shapes=(5, 3)), verbose=0)["seq"])
