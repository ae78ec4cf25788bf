"""Loss curves: one panel per logged key, training and validation, as a PNG (matplotlib's Agg canvas, no pyplot)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from trainer.writers import Writer

__all__ = ["PlotWriter", "plot_history"]


def plot_history(history: Mapping[str, Sequence[float]], path: str | os.PathLike | None = None) -> Figure:
    """Draw ``{key: [value per epoch]}`` (a History's ``history``): a panel per key, ``val_<key>`` in the same panel.

    Returns the figure; writes it to ``path`` (PNG) when given.
    """
    keys = [k for k in history if not k.startswith("val_")]
    keys += [k[4:] for k in history if k.startswith("val_") and k[4:] not in history]
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    figure = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for i, key in enumerate(keys):
        axes = figure.add_subplot(rows, cols, i + 1)
        for name, label, style in ((key, "train", "-o"), (f"val_{key}", "validation", "--s")):
            values = history.get(name)
            if values:
                axes.plot(range(1, len(values) + 1), values, style, markersize=3, label=label)
        axes.set_title(key)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("value")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        figure.savefig(path, dpi=100)
    return figure


class PlotWriter(Writer):
    """Rewrites ``loss_curves.png`` as epochs end — at most every ``min_interval`` seconds (a plot takes ~0.45 s on
    this machine, more than a small model's epoch) and always when the run ends, also when it failed — so a run
    that dies still leaves its curves."""

    def __init__(self, path: str | os.PathLike, *, min_interval: float = 10.0) -> None:
        self.path = os.fspath(path)
        self.min_interval = min_interval
        self.history: dict[str, list[float]] = {}
        self._written = -math.inf  # time of the last write
        self._dirty = False

    def resume(self, history: Mapping[str, Sequence[float]], step: int) -> None:
        self.history = {key: [float(v) for v in values] for key, values in history.items()}

    def write_epoch(self, epoch: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.history.setdefault(key, []).append(float(value))
        self._dirty = True
        if time.monotonic() - self._written >= self.min_interval:
            self._plot()

    def _plot(self) -> None:
        plot_history(self.history, self.path)
        self._written, self._dirty = time.monotonic(), False

    def close(self) -> None:
        if self._dirty:
            self._plot()
