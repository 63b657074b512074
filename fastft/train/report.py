"""A run's figures as d2l reports them, written after every epoch: metrics.json, history.csv, curves.png.

Writing every epoch means an interrupted run still leaves the figures of its last finished epoch.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "valid_loss", "test_acc", "seconds")


def summary_line(final: dict, device: str) -> str:
    tta = f" ({final['test_acc_tta']:.3f} with flip TTA)" if "test_acc_tta" in final else ""
    return (f"loss {final['loss']:.3f}, train acc {final['train_acc']:.3f}, test acc {final['test_acc']:.3f}{tta}, "
            f"{final['examples_per_sec']:.1f} examples/sec on {device}")


def write_reports(out: Path, epochs: list[dict], examples_per_sec: float, device: str) -> dict:
    last = epochs[-1]
    metrics = {
        "final": {"loss": last["train_loss"], "train_acc": last["train_acc"], "test_acc": last["test_acc"],
                  "examples_per_sec": examples_per_sec},
        "epochs": epochs,
        "device": device,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(epochs)
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
