"""PNG charts for report.md: test accuracy per class, training-loss curves, attack recovery curves.

Each function draws one chart with matplotlib (its Agg canvas, imported on first use so that `unlearn --help`
stays fast) at a fixed size and resolution, and writes it atomically. The PNG carries no software version or
time stamp, so drawing the same numbers again writes the same bytes. The colours name the same model in every
chart: the original grey, the unlearned model blue, Retrain green.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .checkpoints import atomic_path

DPI = 110
WIDTH = 7.0  # inches: 770 pixels at DPI, a report's column width
COLOURS = {"original": "#8c8c8c", "unlearned": "#1f77b4", "Retrain": "#2ca02c"}
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
}
LOG_FIELDS = {"stage", "epoch", "step", "phase", "lr", "elapsed_s"}  # train.jsonl fields that are not losses
MAX_STAGES = 6  # training-loss panels drawn; later stages are left out (the log keeps them)


def per_class_chart(accuracy: dict[str, dict[int, float]], forgotten, path: str | Path) -> Path:
    """Test accuracy per class, one bar (or, past 20 classes, one line) per model.

    Args:
        accuracy: {model: {class: percent}}: "original", "unlearned", "Retrain" (those present are drawn).
        forgotten: the forgotten classes: starred on the axis and shaded.
        path: the PNG to write.
    """
    forgotten = set(forgotten)
    classes = sorted({c for values in accuracy.values() for c in values})
    models = [m for m in accuracy if accuracy[m]]
    with _style():
        figure, axes = _figure(WIDTH, 3.0)
        ax = axes[0]
        for c in forgotten & set(classes):
            ax.axvspan(c - 0.5, c + 0.5, color="#f3d9d9", zorder=0)
        many = len(classes) > 20
        width = 0.8 / max(len(models), 1)
        for i, model in enumerate(models):
            values = [accuracy[model].get(c, math.nan) for c in classes]
            colour = COLOURS.get(model)
            if many:
                ax.plot(classes, values, marker=".", linewidth=1, color=colour, label=model)
            else:
                offsets = [c + (i - (len(models) - 1) / 2) * width for c in classes]
                ax.bar(offsets, values, width=width, color=colour, label=model)
                # A bar too short to see (a forgotten class's) gets its number.
                for x, value in zip(offsets, values):
                    if value < 5:
                        ax.text(
                            x, value + 1, f"{value:.0f}", ha="center", va="bottom", fontsize=7, color=colour
                        )
        if not many:
            ax.set_xticks(classes, [f"{c}*" if c in forgotten else str(c) for c in classes])
        ax.set_xlim(min(classes) - 0.6, max(classes) + 0.6)
        ax.set_ylim(0, 105)
        ax.set_yticks(range(0, 101, 20))
        ax.set_xlabel("class (* forgotten, shaded)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Test accuracy per class")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        return _save(figure, path)


def loss_chart(log: str | Path, path: str | Path) -> Path | None:
    """The training losses a run logged (`train.jsonl`, see `unlearn.train.Trainer`) against the optimizer
    step, one panel per training stage; None (nothing written) when the log is absent or holds no loss.

    A resumed run's log repeats the steps it redid: the last record of a step is drawn. A panel whose positive
    losses span more than two orders of magnitude has a logarithmic axis.
    """
    stages = read_losses(log)
    if not stages:
        return None
    shown = list(stages)[:MAX_STAGES]
    columns = min(len(shown), 3)
    rows = math.ceil(len(shown) / columns)
    with _style():
        figure, axes = _figure(WIDTH, 2.6 * rows, rows, columns)
        for index, (ax, stage) in enumerate(zip(axes, shown)):
            series = stages[stage]
            for name, points in series.items():
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) <= 25 else None, markersize=3, label=name)
            values = [v for points in series.values() for _, v in points if math.isfinite(v)]
            if values and min(values) > 0 and max(values) / min(values) > 100:
                ax.set_yscale("log")
            ax.set_title(f"stage {stage}" if len(shown) > 1 else f"Training loss: {stage}")
            ax.set_xlabel("optimizer step")
            if index % columns == 0:
                ax.set_ylabel("mean loss since the last point")
            if len(series) > 1 or next(iter(series)) != "loss":
                ax.legend()
        for ax in axes[len(shown) :]:
            ax.set_visible(False)
        return _save(figure, path)


def read_losses(log: str | Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{stage: {loss name: [(step, value), ...]}} from a `train.jsonl`, in the order the stages first appear;
    {} when the file is absent. A line that is not a JSON object (a run killed mid-write) is skipped."""
    log = Path(log)
    if not log.is_file():
        return {}
    latest: dict[str, dict[str, dict[float, float]]] = {}
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        stage = latest.setdefault(str(record.get("stage", "train")), {})
        for name, value in record.items():
            if name not in LOG_FIELDS and isinstance(value, int | float) and not isinstance(value, bool):
                stage.setdefault(name, {})[float(record["step"])] = float(value)
    return {
        stage: {name: sorted(points.items()) for name, points in losses.items()}
        for stage, losses in latest.items()
        if losses
    }


def recovery_chart(
    curves: dict[str, list[tuple[float, float]]], path: str | Path, title: str, xlabel: str
) -> Path:
    """An attack's success against the budget it spent, one line per model (original / Retrain / unlearned):
    how fast the erased concept comes back, set against a model that never learned it.

    Args:
        curves: {model: [(budget spent, percent recognized), ...]}; the model names as in `COLOURS` (the attack
            runner's "retrain" is drawn as Retrain).
        path: the PNG to write.
        title: the chart's title (the attack).
        xlabel: what the budget counts (steps, generations).
    """
    with _style():
        figure, axes = _figure(WIDTH * 0.8, 3.0)
        ax = axes[0]
        for model, points in curves.items():
            label = "Retrain" if model == "retrain" else model
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, color=COLOURS.get(label), label=label)
        ax.set_ylim(-2, 102)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("recognized (%)")
        ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        return _save(figure, path)


def _style():
    import matplotlib

    return matplotlib.rc_context(STYLE)


def _figure(width: float, height: float, rows: int = 1, columns: int = 1):
    """A figure on an Agg canvas (no pyplot: no global figure registry, no display) and its axes, flat."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, list(axes.flat)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


__all__ = ["per_class_chart", "loss_chart", "read_losses", "recovery_chart"]
