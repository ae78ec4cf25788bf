"""tapeloop losses: the loss protocol and loss callables. Depends on TensorFlow/Keras only, never on ``trainer``."""

from losses import aggregators, boxes
from losses.adapters import (
    SAMPLE_WEIGHT,
    FunctionLoss,
    PerOutputLoss,
    ShapeMismatchError,
    per_output,
    sample_weight_key,
)
from losses.aggregators import IMTLG, MGDA, AlignedMTL, CAGrad, DualProj, Mean, PCGrad, Sum, UPGrad
from losses.distributed import global_normalizer, global_sum, plain_keras_losses, replica_share
from losses.evaluation import average_precision, box_iou, mean_average_precision
from losses.focal import SparseFocalLoss, sparse_focal_loss
from losses.multibox import MultiBoxLoss
from losses.protocol import LossFn, LossProtocolError, LossValue, components
from losses.weighting import DWA, GradNorm, UncertaintyWeighting

__all__ = [
    "DWA",
    "IMTLG",
    "MGDA",
    "SAMPLE_WEIGHT",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "FunctionLoss",
    "GradNorm",
    "LossFn",
    "LossProtocolError",
    "LossValue",
    "Mean",
    "MultiBoxLoss",
    "PCGrad",
    "PerOutputLoss",
    "ShapeMismatchError",
    "SparseFocalLoss",
    "Sum",
    "UPGrad",
    "UncertaintyWeighting",
    "aggregators",
    "average_precision",
    "box_iou",
    "boxes",
    "components",
    "global_normalizer",
    "global_sum",
    "mean_average_precision",
    "per_output",
    "plain_keras_losses",
    "replica_share",
    "sample_weight_key",
    "sparse_focal_loss",
]
