"""tapeloop losses: the loss protocol and loss callables. Depends on TensorFlow/Keras only, never on ``trainer``."""

from losses import boxes
from losses.adapters import (
    SAMPLE_WEIGHT,
    FunctionLoss,
    PerOutputLoss,
    ShapeMismatchError,
    per_output,
    sample_weight_key,
)
from losses.distributed import global_normalizer, global_sum, replica_share
from losses.evaluation import average_precision, box_iou, mean_average_precision
from losses.focal import SparseFocalLoss, sparse_focal_loss
from losses.multibox import MultiBoxLoss
from losses.protocol import LossFn, LossProtocolError, LossValue, components
from losses.weighting import UncertaintyWeighting

__all__ = [
    "SAMPLE_WEIGHT",
    "FunctionLoss",
    "LossFn",
    "LossProtocolError",
    "LossValue",
    "MultiBoxLoss",
    "PerOutputLoss",
    "ShapeMismatchError",
    "SparseFocalLoss",
    "UncertaintyWeighting",
    "average_precision",
    "box_iou",
    "boxes",
    "components",
    "global_normalizer",
    "global_sum",
    "mean_average_precision",
    "per_output",
    "replica_share",
    "sample_weight_key",
    "sparse_focal_loss",
]
