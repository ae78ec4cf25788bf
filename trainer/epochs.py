"""Training epochs over one data source: a fresh pass per epoch, or one iterator running on (``steps_per_epoch``).

The runner decides which batches an epoch sees; the Trainer's ``_run_blocks`` runs them in compiled blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.callbacks import CallbackList
from trainer.data import Data
from trainer.errors import DataError

if TYPE_CHECKING:
    from trainer.trainer import Trainer

__all__ = ["EpochRunner"]


class EpochRunner:
    """Training epochs over one data source: a fresh pass per epoch, or (with steps_per_epoch) one running on."""

    def __init__(self, trainer: Trainer, data: Data, steps_per_epoch: int | None) -> None:
        self.trainer = trainer
        self.data = data
        self.steps_per_epoch = steps_per_epoch
        self.iterator: Any = None

    def epoch(self, epoch: int, cbs: CallbackList) -> dict[str, float]:
        trainer = self.trainer
        logs: dict[str, float] = {}

        def on_block(event: str, index: int, block_logs: dict[str, float] | None) -> None:
            if event == "end":
                logs.clear()
                logs.update(block_logs)
            getattr(cbs, f"on_train_batch_{event}")(index, block_logs)

        if self.steps_per_epoch is None:
            done, _ = trainer._run_blocks(
                "train", trainer._distribute(self.data.dataset(epoch)), self.data.steps, on_block, known_length=True
            )
            if done == 0:
                raise DataError("training data is empty: the first epoch ran no step.")
            return logs
        done = 0
        while done < self.steps_per_epoch:
            fresh = self.iterator is None
            if fresh:
                self.iterator = trainer._distribute(self.data.dataset(epoch))
            ran, ended = trainer._run_blocks(
                "train", self.iterator, self.steps_per_epoch - done, _offset(on_block, done)
            )
            done += ran
            if ended:
                self.iterator = None  # finite data: the next block starts a new pass
                if ran == 0 and fresh:
                    raise DataError("training data is empty: a pass over it yielded no batch.")
            if trainer._stop.stop_training:
                break
        return logs


def _offset(on_block, offset: int):
    return lambda event, index, logs: on_block(event, index + offset, logs)
