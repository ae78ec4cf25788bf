"""A training run for the kill/resume tests: ``python resume_worker.py DIR OUT [--stall-at STEP]``.

Numpy input reshuffled each epoch, Dropout (RNG state), Adam (slots), 8 steps per epoch with a partial last batch.
With ``--stall-at``, a callback writes ``DIR/stalled`` once the global step reaches STEP and then sleeps, so the
test can kill the process at a known point (after the checkpoint at a multiple of 3, mid-epoch). With the
environment variable ``KILL_BEFORE_INDEX=STEP`` the process SIGKILLs itself in the middle of saving ckpt-STEP.
On a normal end it writes the final weights and the History to OUT (an .npz).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
import numpy as np

from trainer import Trainer, TrainingInterrupted


class Stall(keras.callbacks.Callback):
    def __init__(self, trainer: Trainer, step: int, marker: Path) -> None:
        super().__init__()
        self.trainer, self.step, self.marker = trainer, step, marker

    def on_train_batch_end(self, batch, logs=None):
        if self.trainer.global_step >= self.step and not self.marker.exists():
            self.marker.write_text(str(self.trainer.global_step))
            time.sleep(float(os.environ.get("STALL_SECONDS", "60")))


def die_before_naming(step: int) -> None:
    """SIGKILL this process once checkpoint ``ckpt-<step>`` is written but before the index names it: the commit
    point of a save, where a kill during a save lands at the latest."""
    from tensorflow.python.checkpoint import checkpoint_management

    record = checkpoint_management.CheckpointManager._record_state

    def record_or_die(manager):
        if manager.latest_checkpoint and manager.latest_checkpoint.endswith(f"ckpt-{step}"):
            os.kill(os.getpid(), signal.SIGKILL)
        record(manager)

    checkpoint_management.CheckpointManager._record_state = record_or_die


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--stall-at", type=int)
    args = parser.parse_args()
    if os.environ.get("KILL_BEFORE_INDEX"):
        die_before_naming(int(os.environ["KILL_BEFORE_INDEX"]))
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype("float32")
    y = {"output": (x @ rng.normal(size=(5, 1))).astype("float32")}
    inp = keras.Input((5,))
    hidden = keras.layers.Dropout(0.3)(keras.layers.Dense(16, activation="relu")(inp))
    model = keras.Model(inp, keras.layers.Dense(1, name="y")(hidden))
    trainer = Trainer(
        model, optimizer=keras.optimizers.Adam(0.01), loss={"output": "mse"}, steps_per_execution=2, seed=3
    )
    callbacks = [Stall(trainer, args.stall_at, args.dir / "stalled")] if args.stall_at else []
    try:
        history = trainer.fit(
            (x, y),
            batch_size=8,
            epochs=3,
            validation_data=(x[:16], {"output": y["output"][:16]}),
            callbacks=callbacks,
            progress=False,
            checkpoint_dir=args.dir / "checkpoints",
            checkpoint_every=3,
        )
    except TrainingInterrupted as stop:
        print(stop, flush=True)
        raise SystemExit(128 + stop.signum) from None
    np.savez(args.out, *model.get_weights(), history=json.dumps(history.history))


if __name__ == "__main__":
    main()
