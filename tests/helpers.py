"""Models from the seed articles (seed 001), and small helpers shared by the tests."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import losses
from trainer import Trainer

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
RTOL, ATOL = 1e-5, 1e-6  # tapeloop against Keras on the same model, data and order


def script_module(name: str):
    """Import ``scripts/<name>.py`` (the bench's and the CLI's helpers), the scripts folder on ``sys.path`` only
    while it imports (its siblings import each other by name)."""
    import importlib
    import sys

    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(scripts)


def fails_before_update(trainer: Trainer, exc: type[BaseException], match: str, *args, **kwargs) -> None:
    """``trainer.fit(*args, **kwargs)`` raises ``exc`` matching ``match``, and no weight or step count changed."""
    import pytest

    before = weights(trainer.model)
    with pytest.raises(exc, match=match):
        trainer.fit(*args, progress=False, **kwargs)
    for a, b in zip(before, weights(trainer.model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert trainer.global_step == 0


def assert_weights_close(a: keras.Model, b: keras.Model) -> None:
    for x, y in zip(weights(a), weights(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


def assert_history_close(ours: dict, theirs: dict, keys: dict[str, str]) -> None:
    """``ours[mine]`` against ``theirs[keras_key]`` for each ``mine: keras_key`` of ``keys``."""
    for mine, keras_key in keys.items():
        np.testing.assert_allclose(ours[mine], theirs[keras_key], rtol=RTOL, atol=ATOL, err_msg=mine)


def readme_definition(name: str):
    """Execute the README's definition of function or class ``name`` (as printed) and return it."""
    heads = (f"def {name}(", f"class {name}(")
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", README, re.S)]
    lines = next(b for b in blocks if any(h in b for h in heads)).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heads))
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    namespace = {"keras": keras, "tf": tf, "losses": losses}
    exec("\n".join(lines[start:end]), namespace)
    return namespace[name]


def example1(regularizer: float | None = None) -> keras.Model:
    """Seed 001 example 1: 100 -> 64 -> 32 -> (regression 1, classification 3 softmax)."""
    reg = keras.regularizers.L2(regularizer) if regularizer else None
    inp = layers.Input((100,))
    x = layers.Dense(64, activation="relu", kernel_regularizer=reg)(inp)
    x = layers.Dense(32, activation="relu", kernel_regularizer=reg)(x)
    r = layers.Dense(1, activation="linear", name="regression_output")(x)
    c = layers.Dense(3, activation="softmax", name="classification_output")(x)
    return keras.Model(inp, [r, c])


def example1_data(n: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 100), dtype=np.float32)
    y = {
        "regression_output": rng.random((n, 1), dtype=np.float32),
        "classification_output": np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)],
    }
    return x, y


def example2(image_size: int = 28) -> keras.Model:
    """Seed 001 example 2. ``image_size=14`` is the article as printed (its image output is 14x14)."""
    inp = layers.Input((28, 28, 1))
    x = layers.Conv2D(4, (3, 3), activation="relu")(inp)
    x = layers.MaxPooling2D((2, 2))(x)
    x = layers.Flatten()(x)
    x = layers.Dense(16, activation="relu")(x)
    v = layers.Dense(10, activation="sigmoid", name="vector_output")(x)
    y = layers.Dense(7 * 7 * 4, activation="relu")(x)
    y = layers.Reshape((7, 7, 4))(y)
    y = layers.Conv2DTranspose(4, (3, 3), activation="relu", padding="same", strides=(2, 2))(y)
    last_stride = 2 if image_size == 28 else 1  # the printed article upsamples only once
    img = layers.Conv2DTranspose(
        1, (3, 3), activation="sigmoid", padding="same", strides=last_stride, name="image_output"
    )(y)
    return keras.Model(inp, [v, img])


def example2_data(n: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 28, 28, 1), dtype=np.float32), {
        "vector_output": rng.random((n, 10), dtype=np.float32),
        "image_output": rng.random((n, 28, 28, 1), dtype=np.float32),
    }


def example3(as_printed: bool) -> keras.Model:
    """Seed 001 example 3 (shared layer). As printed, the names sit on the hidden layers, not the outputs."""
    inp = layers.Input((100,))
    shared = layers.Dense(64, activation="relu")(inp)
    h1 = layers.Dense(32, activation="relu", name="output_1" if as_printed else "hidden_1")(shared)
    o1 = layers.Dense(1, activation="linear", name=None if as_printed else "output_1")(h1)
    h2 = layers.Dense(32, activation="relu", name="output_2" if as_printed else "hidden_2")(shared)
    o2 = layers.Dense(5, activation="softmax", name=None if as_printed else "output_2")(h2)
    return keras.Model(inp, [o1, o2])


def example3_data(n: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 100), dtype=np.float32), {
        "output_1": rng.random((n, 1), dtype=np.float32),
        "output_2": np.eye(5, dtype=np.float32)[rng.integers(0, 5, n)],
    }


def clone(model: keras.Model) -> keras.Model:
    """A second model with the same architecture and the same weights."""
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def fit_both(model: keras.Model, x, y, optimizer=lambda: keras.optimizers.SGD(0.05), **compile_kwargs):
    """``model`` trained by a Trainer and its clone by ``Model.fit``, each with ``optimizer()`` and ``compile_kwargs``
    (batches of 8, 2 epochs, in order); returns (our history, Keras' history, the clone)."""
    twin = clone(model)
    twin.compile(optimizer=optimizer(), **compile_kwargs)
    theirs = twin.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    trainer = Trainer(model, optimizer=optimizer(), **compile_kwargs)
    ours = trainer.fit(x, y, batch_size=8, epochs=2, shuffle=False, progress=False).history
    return ours, theirs, twin


def weights(model: keras.Model) -> list[np.ndarray]:
    return [np.array(w) for w in model.get_weights()]


class Crash(keras.callbacks.Callback):
    """Raises once the trainer's global step reaches ``step``: a crash at a known point, after its checkpoints."""

    def __init__(self, trainer, step: int) -> None:
        super().__init__()
        self.trainer, self.step = trainer, step

    def on_train_batch_end(self, batch, logs=None):
        if self.trainer.global_step >= self.step:
            raise RuntimeError("simulated crash")


def small_model(seed: int = 0, dropout: float = 0.2) -> keras.Model:
    """The seed fixes the initial weights and the dropout layer's own RNG seed."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5,))
    hidden = keras.layers.Dropout(dropout)(keras.layers.Dense(8, activation="relu")(inp))
    return keras.Model(inp, keras.layers.Dense(1, name="y")(hidden))


class Batches(keras.utils.PyDataset):
    """A keras.utils.PyDataset over arrays: batch i is examples [i·b, (i+1)·b); counts its epoch hooks."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.x, self.y, self.batch_size = x, y, batch_size
        self.ends = 0

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        part = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[part], self.y[part]

    def on_epoch_end(self) -> None:
        self.ends += 1


def small_data(n: int = 44):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 5)).astype("float32")
    return x, {"output": x[:, :1] * 2 - x[:, 1:2]}
