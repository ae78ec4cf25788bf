"""The run directory's rules for scripts/train.py: every problem with it up front, one live run at a time, and
reruns that resume the same run or are refused.

Kept free of TensorFlow imports: these checks run before TensorFlow is loaded, so a bad ``--logdir`` is an error
in a moment, not after seconds of imports.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "IDENTITY",
    "LOCK",
    "PARTS",
    "check_logdir",
    "locked",
    "move_aside",
    "new_run_directory",
    "where_it_stands",
    "write_json",
]

# What a rerun may not change:
IDENTITY = ("task_file", "batch_size", "seed", "strategy", "replicas", "params", "aggregator")
PARTS = ("history.csv", "metrics.json", "config.json", "loss_curves.png", "final.weights.h5", "checkpoints",
         "tensorboard")  # fmt: skip
LOCK = ".lock"


def check_logdir(logdir: Path) -> None:
    """Every problem with the run directory, as a one-line error, before anything is imported or trained."""
    if logdir.exists() and not logdir.is_dir():
        raise SystemExit(f"error: --logdir {logdir} is a file, not a directory.")
    existing = next((p for p in [logdir, *logdir.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: cannot create or write --logdir {logdir}: {existing} is not a writable directory.")
    for part in PARTS:
        path = logdir / part
        if path.exists() and not os.access(path, os.W_OK):
            raise SystemExit(f"error: {path} is not writable; fix its permissions or use another --logdir.")


def new_run_directory(task: str) -> Path:
    """The default ``--logdir``: ``runs/<task>-<timestamp>``, created here so that it is this run's alone — a run
    started in the same second (a shell loop over seeds) gets ``-2``, ``-3``, ... instead of finding the other one's
    directory in use, or resuming it."""
    base = Path("runs") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_logdir(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for logdir in _numbered(base):
        with contextlib.suppress(FileExistsError):
            logdir.mkdir()  # atomic: of two processes, one creates it
            return logdir
    raise AssertionError("unreachable")


def _numbered(path: Path) -> Iterator[Path]:
    """``path``, then ``path-2``, ``path-3``, ..."""
    yield path
    for n in itertools.count(2):
        yield path.with_name(f"{path.name}-{n}")


@contextlib.contextmanager
def locked(logdir: Path):
    """One live run per directory: an flock the kernel releases when the process ends, however it ends."""
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise SystemExit(f"error: --logdir {logdir} is in use by a running run ({owner}); wait for it or use "
                             "another --logdir.") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def move_aside(logdir: Path) -> None:
    """``--fresh``: the old run goes to ``<logdir>.old-<timestamp>`` (``-2``, ... if one was moved there in the same
    second); nothing is deleted."""
    if logdir.is_dir() and any(p.name != LOCK for p in logdir.iterdir()):
        stamped = logdir.with_name(f"{logdir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        aside = next(p for p in _numbered(stamped) if not p.exists())  # (one process: the run's lock is held)
        logdir.rename(aside)
        print(f"--fresh: the previous run in {logdir} was moved to {aside}", flush=True)


def where_it_stands(config: dict, logdir: Path, epochs: int) -> str | None:
    """Refuse a rerun that would be another run; return a line saying where a resumed run stands, or exit 0 when
    there is nothing left to train."""
    previous_file = logdir / "config.json"
    if not previous_file.exists():
        return None
    previous = json.loads(previous_file.read_text())
    changed = [
        f"{key}: {previous[key]!r} -> {config[key]!r}"
        for key in IDENTITY
        if key in previous and previous[key] != config[key]
    ]
    if changed:
        raise SystemExit(
            f"error: {logdir} holds a run with other arguments ({'; '.join(changed)}); resuming it would silently "
            "be another run. Rerun with its arguments, or start fresh: a new --logdir, or --fresh (moves it aside)."
        )
    from trainer.checkpoints import read_meta  # (TensorFlow is loaded by now)

    found = read_meta(logdir / "checkpoints")
    if found is None:
        return None
    path, meta = found
    done, steps = meta["position"]["epoch"], meta["position"]["epoch_steps"]
    if done >= epochs:
        at = f"epoch {done}" + (f" and {steps} steps of the next" if steps else "")
        print(f"already trained to {at} (--epochs {epochs}); nothing to do. Run directory: {logdir}", flush=True)
        raise SystemExit(0)
    where = f"epoch {done}" + (f" + {steps} steps" if steps else "")
    return f"resumed from checkpoint {Path(path).name} ({where}, step {meta['global_step']})"


def write_json(path: Path, value: dict) -> None:
    """Write ``value`` as JSON so that a reader sees the old file or the new one, never a partial one (other
    workers read the chief's config.json while it rewrites it): a temporary file beside it, then a rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(value, indent=2) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
