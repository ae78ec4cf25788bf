"""tapeloop losses: the loss protocol and loss callables. Depends on TensorFlow/Keras only, never on ``trainer``."""

from losses.adapters import PerOutputLoss, ShapeMismatchError, per_output
from losses.protocol import LossFn, LossProtocolError, LossValue, components

__all__ = [
    "LossFn",
    "LossProtocolError",
    "LossValue",
    "PerOutputLoss",
    "ShapeMismatchError",
    "components",
    "per_output",
]
