"""tapeloop's training loop: ``Trainer`` and the parts it composes."""

from trainer.cadence import Every
from trainer.callbacks import History
from trainer.checkpoints import TrainingInterrupted
from trainer.errors import (
    DataError,
    LossProtocolError,
    MissingKeyError,
    NonFiniteLossError,
    ShapeMismatchError,
    StepError,
    UserCodeError,
)
from trainer.plots import PlotWriter, plot_history
from trainer.schedules import LossWeightSchedule
from trainer.task import Task
from trainer.trainer import Trainer
from trainer.writers import CSVWriter, MultiWriter, ProgressWriter, TensorBoardWriter, Writer, WriterCallback

__all__ = [
    "CSVWriter",
    "DataError",
    "Every",
    "History",
    "LossProtocolError",
    "LossWeightSchedule",
    "MissingKeyError",
    "MultiWriter",
    "NonFiniteLossError",
    "PlotWriter",
    "ProgressWriter",
    "ShapeMismatchError",
    "StepError",
    "Task",
    "TensorBoardWriter",
    "Trainer",
    "TrainingInterrupted",
    "UserCodeError",
    "Writer",
    "WriterCallback",
    "plot_history",
]
