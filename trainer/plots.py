"""Loss curves: one panel per logged key, training and validation, as a PNG (matplotlib's Agg canvas, no pyplot)."""

from __future__ import annotations

import math
import os
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
    """Rewrites ``loss_curves.png`` after every epoch, so a run that dies still leaves its curves."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.history: dict[str, list[float]] = {}

    def resume(self, history: Mapping[str, Sequence[float]], step: int) -> None:
        self.history = {key: [float(v) for v in values] for key, values in history.items()}

    def write_epoch(self, epoch: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.history.setdefault(key, []).append(float(value))
        plot_history(self.history, self.path)
