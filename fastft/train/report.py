"""A run's figures as d2l reports them, written after every epoch: metrics.json, history.csv, curves.png.

Writing every epoch means an interrupted run still leaves the figures of its last finished epoch.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from fastft.atomic import save_figure, write_json, write_text

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "valid_loss", "test_acc", "seconds")


def summary_line(final: dict, device: str) -> str:
    tta = f" ({final['test_acc_tta']:.3f} with flip TTA)" if "test_acc_tta" in final else ""
    return (f"loss {final['loss']:.3f}, train acc {final['train_acc']:.3f}, test acc {final['test_acc']:.3f}{tta}, "
            f"{final['examples_per_sec']:.1f} examples/sec on {device}")


def epoch_line(epoch: dict, total: int) -> str:
    """One epoch as a log line: the figures history.csv holds, epochs counted 1..total across phases."""
    return (f"epoch {epoch['epoch']}/{total}: train_loss {epoch['train_loss']:.4f}, train_acc {epoch['train_acc']:.4f}, "
            f"valid_loss {epoch['valid_loss']:.4f}, test_acc {epoch['test_acc']:.4f}, {epoch['seconds']:.1f} s")


def write_reports(out: Path, epochs: list[dict], examples_per_sec: float, device: str) -> dict:
    last = epochs[-1]
    metrics = {
        "final": {"loss": last["train_loss"], "train_acc": last["train_acc"], "test_acc": last["test_acc"],
                  "examples_per_sec": examples_per_sec},
        "epochs": epochs,
        "device": device,
    }
    write_json(out / "metrics.json", metrics)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(epochs)
    write_text(out / "history.csv", table.getvalue())
    plot_curves(epochs, out / "curves.png")
    return metrics


def plot_curves(epochs: list[dict], path: Path) -> None:
    """d2l's training picture: train loss, train acc and test acc per epoch (losses left, accuracy right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [e["epoch"] for e in epochs]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_ax.plot(x, [e["train_loss"] for e in epochs], "o-", label="train loss")
    loss_ax.plot(x, [e["valid_loss"] for e in epochs], "s--", label="test loss")
    acc_ax.plot(x, [e["train_acc"] for e in epochs], "o-", label="train acc")
    acc_ax.plot(x, [e["test_acc"] for e in epochs], "s--", label="test acc")
    acc_ax.set_ylim(0, 1)
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
