"""`fastft compare`: one recipe trained once per setting (same data, seed and epochs), side by side."""
from __future__ import annotations

import re
from pathlib import Path

from fastft.atomic import save_figure, write_json
from fastft.data.augment import parse_aug
from fastft.errors import UsageError
from fastft.recipe import Recipe

# (key, title, width, number format): d2l's figures, the accuracy on the training images without
# augmentation (against test acc, it shows overfitting), the epoch whose weights the run kept (--keep,
# --patience), and the wall time of training
COLUMNS = (("loss", "loss", 7, ".3f"), ("train_acc", "train acc", 9, ".3f"),
           ("train_acc_unaugmented", "unaugmented train acc", 21, ".3f"), ("test_acc", "test acc", 8, ".3f"),
           ("kept_epoch", "kept epoch", 10, "d"), ("examples_per_sec", "examples/sec", 12, ".1f"),
           ("seconds", "seconds", 8, ".1f"))


def settings_to_compare(recipe: Recipe, strategies: str | None, augs: str | None) -> list[tuple[str, dict]]:
    """[(label, recipe changes)] from comma lists; each checked before anything trains."""
    if strategies and augs and "," in strategies and "," in augs:
        raise UsageError("compare one thing at a time: give a comma list to --strategy or to --aug, not both")
    if augs and "," in augs:
        settings = [(a, {"aug": a}) for a in augs.split(",")]
    else:
        settings = [(s, {"strategy": s}) for s in (strategies or recipe.strategy).split(",")]
    for label, changes in settings:
        recipe.replace(source=f"compare setting '{label}'", **changes).check()
        if "aug" in changes:
            parse_aug(changes["aug"])
    if len({label for label, _ in settings}) != len(settings):
        raise UsageError("a setting is listed twice; list each once")
    return settings


def folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def format_table(rows: list[dict]) -> str:
    first = max(len("setting"), *(len(r["setting"]) for r in rows))
    header = f"{'setting':<{first}}" + "".join(f"  {title:>{width}}" for _, title, width, _ in COLUMNS)
    lines = [f"{r['setting']:<{first}}" + "".join(f"  {r[key]:>{width}{fmt}}" for key, _, width, fmt in COLUMNS)
             for r in rows]
    return "\n".join([header, *lines])


def plot_comparison(rows: list[dict], path: Path):
    from fastft.atomic import subplots
    from fastft.train.report import epoch_axis

    fig, (loss_ax, acc_ax) = subplots(1, 2, figsize=(10, 4))
    for row in rows:
        epochs = [e["epoch"] for e in row["epochs"]]
        line, = loss_ax.plot(epochs, [e["train_loss"] for e in row["epochs"]], "o-", label=row["setting"])
        acc_ax.plot(epochs, [e["test_acc"] for e in row["epochs"]], "o-", color=line.get_color(),
                    label=f"{row['setting']} test")
        acc_ax.plot(epochs, [e["train_acc"] for e in row["epochs"]], ":", color=line.get_color(), alpha=0.7)
    loss_ax.set_title("train loss")
    acc_ax.set_title("test acc (solid), train acc (dotted)")
    for ax in (loss_ax, acc_ax):
        epoch_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def compare(recipe: Recipe, settings: list[tuple[str, dict]], out: str | None) -> list[dict]:
    """Train once per setting into OUT/<setting>/; write compare.json and compare.png at the top."""
    from fastft.run_folder import new_run_folder
    from fastft.train.distributed import world_size
    from fastft.train.pipeline import train

    if world_size() > 1:
        raise UsageError("compare trains its settings in one process; launch it without torchrun/accelerate")

    top = new_run_folder(out, f"{recipe.name}-compare")
    top.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, changes in settings:
        print(f"== {label}")
        metrics = train(recipe.replace(**changes), str(top / folder_name(label)), measure_unaugmented=True)
        rows.append({"setting": label, **metrics["final"], "kept_epoch": metrics["kept_epoch"],
                     "epochs_run": len(metrics["epochs"]), "seconds": sum(e["seconds"] for e in metrics["epochs"]), "epochs": metrics["epochs"]})
        write_json(top / "compare.json", rows)  # after each: partial results survive
        plot_comparison(rows, top / "compare.png")
    print(format_table(rows))
    return rows
