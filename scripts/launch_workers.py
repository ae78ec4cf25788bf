"""Launch a multi-worker run on this machine: N worker processes of scripts/train.py on 127.0.0.1.

    python scripts/launch_workers.py --workers 2 -- --task digits --logdir runs/digits-2w [other train.py flags]

Each worker gets a free port and its ``TF_CONFIG`` (``{"cluster": {"worker": [...]}, "task": {"type": "worker",
"index": i}}``) and runs ``train.py --strategy multiworker``. Worker 0 is the chief: its output is shown and it
alone writes the run directory; the others' output goes to temporary log files, printed if a worker fails. When one
worker fails, every worker is stopped by process id. On SIGINT/SIGTERM the launcher sends SIGTERM to every worker:
they agree on the step to stop at, write a checkpoint and exit; rerun the same command to resume. The exit status is
the first failing worker's (0 when all succeed; 128 + the signal number when interrupted). On several machines, run
train.py on each with a TF_CONFIG naming every host instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = Path(__file__).resolve().parent / "train.py"
PREEMPTION_GRACE = 120.0  # seconds the workers get to finish their block and write the checkpoint


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def stop(processes: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM every process still running, then SIGKILL those still there after ``grace`` seconds."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def launch(workers: int, train_args: list[str]) -> int:
    """Run ``workers`` train.py processes as one multi-worker job; returns the exit status."""
    ports = free_ports(workers)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    # closed in the finally below
    logs = [tempfile.NamedTemporaryFile("w+", prefix=f"worker{i}-", suffix=".log") for i in range(1, workers)]  # noqa: SIM115
    processes: list[subprocess.Popen] = []

    def on_signal(signum, frame):
        # Every worker gets SIGTERM: they agree to stop at the same block, write a checkpoint and exit.
        stop(processes, grace=PREEMPTION_GRACE)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for index in range(workers):
            config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            env = {**os.environ, "TF_CONFIG": json.dumps(config)}
            out = None if index == 0 else logs[index - 1]
            command = [sys.executable, str(TRAIN), "--strategy", "multiworker", *train_args]
            processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None))
        while True:
            codes = [p.poll() for p in processes]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                index, code = failed[0]
                stop(processes)
                if index > 0:
                    logs[index - 1].seek(0)
                    print(f"worker {index} failed (status {code}):\n{logs[index - 1].read()[-5000:]}", file=sys.stderr)
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        stop(processes)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for log in logs:
            log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="number of worker processes (2)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the flags for scripts/train.py")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    return launch(args.workers, train_args)


if __name__ == "__main__":
    raise SystemExit(main())
