"""A run's figures as d2l reports them, written after every epoch: metrics.json, history.csv, curves.png.

Writing every epoch means an interrupted run still leaves the figures of its last finished epoch. Columns:
train_loss and train_acc over the epoch's augmented training batches; test_loss and test_acc on the test split;
valid_loss and valid_acc on the validation split, when the run has one apart from the test split.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from fastft.atomic import save_figure, write_json, write_text
from fastft.run_folder import RunFolder

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "valid_loss", "valid_acc", "seconds")


def summary_line(final: dict, device: str) -> str:
    tta = f" ({final['test_acc_tta']:.3f} with flip TTA)" if "test_acc_tta" in final else ""
    return (f"loss {final['loss']:.3f}, train acc {final['train_acc']:.3f}, test acc {final['test_acc']:.3f}{tta}, "
            f"{final['examples_per_sec']:.1f} examples/sec on {device}")


def epoch_line(epoch: dict, total: int) -> str:
    """One epoch as a log line: the figures history.csv holds, epochs counted 1..total across phases."""
    figures = ", ".join(f"{k} {epoch[k]:.4f}" for k in HISTORY_COLUMNS[1:-1] if k in epoch)
    return f"epoch {epoch['epoch']}/{total}: {figures}, {epoch['seconds']:.1f} s"


def write_reports(out: RunFolder, epochs: list[dict], examples_per_sec: float, device: str, kept_epoch: int,
                  additions: dict | None = None) -> dict:
    """The files, and metrics.json's content: `final` holds the figures of the epoch whose weights the run keeps.
    The one writer of metrics.json: after every epoch (so a stopped run keeps its figures) and once more at the
    end, with `additions` (the final scores: more keys for `final`, and keys of their own)."""
    kept = epochs[kept_epoch - 1]
    additions = dict(additions or {})
    metrics = {
        "final": {"loss": kept["train_loss"], "train_acc": kept["train_acc"], "test_acc": kept["test_acc"],
                  "examples_per_sec": examples_per_sec, **additions.pop("final", {})},
        "kept_epoch": kept_epoch,
        "epochs": epochs,
        "device": device,
        **additions,
    }
    write_json(out.metrics, metrics)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, HISTORY_COLUMNS, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(epochs)
    write_text(out.history, table.getvalue())
    if len(epochs) > 1:  # one epoch (a probe's one pass) is a single dot on an axis: no picture (ONE_EPOCH_NOTE)
        plot_curves(epochs, out.curves, kept_epoch)
    return metrics


ONE_EPOCH_NOTE = ("note: no curves.png for a run of one epoch (a single point per figure); metrics.json and history.csv "
                  "hold its figures")


def drop_note(epochs: list[dict], strategy: str, images: int, kept_epoch: int) -> str:
    """A note when the last epoch ended more than TIE_IMAGES images below an earlier one (fine-tuning lost what an
    earlier epoch had), naming what would have kept it; "" otherwise. Measured on the validation split where the run
    has one; on the test split (`images` of it) only for information: the test split chooses nothing."""
    from fastft.schedules import LINEAR_PROBE, LP_FT
    from fastft.train.tie import TIE_IMAGES

    key = "valid_acc" if "valid_acc" in epochs[-1] else "test_acc"
    if len(epochs) < 2:
        return ""
    best = max(epochs[:-1], key=lambda e: e[key])
    last = epochs[-1]
    if last[key] >= best[key] - TIE_IMAGES / max(images, 1) - 1e-9:
        return ""
    fewer = round((best[key] - last[key]) * images)
    keeper = (f"--strategy {LINEAR_PROBE}" if strategy == LP_FT and best["epoch"] == 1 else f"--epochs {best['epoch']}")
    split = "validation" if key == "valid_acc" else "test"
    said = (f"note: the last epoch ({last['epoch']}) scored {last[key]:.3f} on the {split} split, {fewer} images below "
            f"epoch {best['epoch']}'s {best[key]:.3f}: fine-tuning lost ground; {keeper} would have kept it")
    if key == "test_acc":
        return said + " (for information only: the test split chooses nothing, and this run is as it was trained)"
    return said + (f"; this run kept epoch {kept_epoch}" if kept_epoch != last["epoch"] else "")


def standard_error(accuracy: float, images: int) -> float:
    """The binomial standard error of an accuracy measured on `images` images: how far noise moves it."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(images, 1))


def candidate_chart(names: list[str], accuracies: list[float], chosen: int, xlabel: str, title: str, path: Path,
                    row_height: float, images: int, rule: str):
    """A bar per candidate of a choice (backbones, strategies), the chosen one orange: each accuracy written on it,
    with its standard error on `images` images as an error bar, on an axis that spans the scores (bars from 0 made
    0.949, 0.964 and 0.974 look the same); `rule`, the rule that chose, under the title, which is wrapped to fit."""
    import textwrap

    from fastft.atomic import subplots

    errors = [standard_error(a, images) for a in accuracies]
    fig, ax = subplots(figsize=(6.4, row_height * len(names) + 1.8))
    low = max(0.0, min(a - e for a, e in zip(accuracies, errors)) - 0.02)
    high = min(1.0, max(a + e for a, e in zip(accuracies, errors)) + 0.02)
    ax.barh(names, [a - low for a in accuracies], left=low, xerr=errors, capsize=3, ecolor="grey",
            color=["tab:orange" if i == chosen else "tab:blue" for i in range(len(names))])
    for y, (accuracy, error) in enumerate(zip(accuracies, errors)):
        ax.text(accuracy + error, y, f" {accuracy:.3f}", va="center", fontsize=8)
    ax.set_xlim(low, high + (high - low) * 0.15)  # room for the figures written past the bars
    ax.invert_yaxis()
    ax.set_xlabel(f"{xlabel}; error bars: one standard error", fontsize=8)
    # over the whole picture (an axes title starts where the long names end, and ran off the right edge), wrapped
    fig.suptitle("\n".join(textwrap.fill(line, 100) for line in (title, rule)), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def epoch_axis(ax) -> None:
    """An x-axis of epochs: whole numbers only (matplotlib would otherwise tick 1.25, 1.5 ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(epochs: list[dict], path: Path, kept_epoch: int | None = None):
    """d2l's training picture: losses left, accuracies right, per epoch; the kept epoch marked."""
    from fastft.atomic import subplots

    x = [e["epoch"] for e in epochs]
    fig, (loss_ax, acc_ax) = subplots(1, 2, figsize=(9, 3.5))
    for ax, kind in ((loss_ax, "loss"), (acc_ax, "acc")):
        for split, style in (("train", "o-"), ("test", "s--"), ("valid", "^:")):
            if f"{split}_{kind}" in epochs[0]:
                ax.plot(x, [e[f"{split}_{kind}"] for e in epochs], style, label=f"{split} {kind}")
        if kept_epoch and kept_epoch != len(epochs):
            ax.axvline(kept_epoch, color="grey", lw=1, label="kept epoch")
    acc_ax.set_ylim(0, 1)
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        epoch_axis(ax)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return fig
