"""`fastft evaluate MODEL DATA_DIR`: accuracy, per-class precision and recall, confusion matrix and top losses."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastft.atomic import save_figure, write_json
from fastft.data.folders import class_images, keep_readable, new_run_folder, numbered, split_files, test_folder
from fastft.errors import UsageError


def run_recipe(model_path: Path):
    """The recipe of the run a model came from (its folder's recipe.toml), if it is there."""
    from fastft.recipe import read_recipe_file

    saved = (model_path if model_path.is_dir() else model_path.parent) / "recipe.toml"
    try:
        return read_recipe_file(saved) if saved.is_file() else None
    except UsageError:
        return None  # an older or edited recipe: evaluate the folder as given


def labelled_images(data: Path, recipe=None) -> tuple[list[tuple[Path, str]], str]:
    """((image, class) pairs, which images those are, in words). DATA/test (or valid) if it has one. The run's
    own folder without a split: the images the run held out (its seed, --valid-pct and --limit), never the
    ones it trained on. Any other folder: all of its class folders."""
    if not data.is_dir():
        raise UsageError(f"data folder {data} does not exist; pass a folder of class folders (or one with test/)")
    if folder := test_folder(data):
        by_class, scored = class_images(folder), f"the test split {folder}"
    elif recipe and recipe.data and Path(recipe.data).resolve() == data.resolve():
        by_class = split_files(data, recipe.valid_pct, recipe.seed, recipe.limit).test
        scored = (f"the images of {data} the run held out from training ({recipe.valid_pct:.0%} of each class, "
                  f"seed {recipe.seed})")
    else:
        by_class = class_images(data)
        scored = f"every image in the class folders of {data} (it has no test/ split: any it was trained on count too)"
    by_class = {c: files for c, files in by_class.items() if files}
    if not by_class:
        raise UsageError(f"{folder or data} has no class folders of images; expected {folder or data}/<class>/*.jpg")
    pairs = [(p, c) for c, files in by_class.items() for p in files]
    keep = set(keep_readable([p for p, _ in pairs])[0])
    return [(p, c) for p, c in pairs if p in keep], scored


def evaluation_folder(model_path: Path, data: Path, out: str | None) -> Path:
    """--out, or a new eval-<data name>[-N] folder beside the model; never an existing non-empty one."""
    if out:
        return new_run_folder(out, "")
    home = model_path if model_path.is_dir() else model_path.parent
    return numbered(home / f"eval-{data.resolve().name}")


def evaluate(model_path: Path, data: Path, out: str | None = None, bs: int = 64, tta: bool | None = None,
             trust_pickle: bool = False) -> dict:
    from fastft.deploy.bundle import load

    model = load(model_path, trust_pickle=trust_pickle)
    pairs, scored = labelled_images(data, run_recipe(model_path))
    if unknown := sorted({c for _, c in pairs} - set(model.classes)):
        raise UsageError(f"{data} has classes the model does not know: {', '.join(unknown)} "
                         f"(it knows {', '.join(model.classes)})")
    folder = evaluation_folder(model_path, data, out)
    results = list(model.predict_batch([p for p, _ in pairs], bs=bs, tta=tta))
    index = {c: i for i, c in enumerate(model.classes)}
    truth = np.array([index[c] for _, c in pairs])
    probs = np.array([[r["probabilities"][c] for c in model.classes] for r in results])
    guess = probs.argmax(axis=1)
    n = len(model.classes)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (truth, guess), 1)
    per_class = {}
    for c, i in index.items():
        predicted, actual = confusion[:, i].sum(), confusion[i, :].sum()
        per_class[c] = {"precision": float(confusion[i, i] / predicted) if predicted else 0.0,
                        "recall": float(confusion[i, i] / actual) if actual else 0.0, "support": int(actual)}
    losses = -np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, 1.0))
    report = {"model": str(model_path), "data": str(data), "images": len(pairs), "scored": scored,
              "accuracy": float((guess == truth).mean()),
              "tta": bool(model.flip_tta(tta)), "per_class": per_class,
              "confusion": {"classes": model.classes, "matrix": confusion.tolist()}}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "evaluation.json", report)
    plot_confusion(confusion, model.classes, folder / "confusion.png")
    worst = np.argsort(-losses)[:9]
    plot_top_losses([(pairs[i][0], pairs[i][1], model.classes[guess[i]], losses[i], probs[i, guess[i]]) for i in worst],
                    folder / "top_losses.png")
    report["folder"] = str(folder)
    return report


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = max(4, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    save_figure(fig, path)


def plot_top_losses(rows: list[tuple], path: Path) -> None:
    """fastai's plot_top_losses picture: predicted/actual/loss/probability above each image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastft.data.images import open_rgb

    cols = 3
    nrows = max(1, -(-len(rows) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * 3, nrows * 3.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, actual, predicted, loss, prob) in zip(axes.flat, rows):
        ax.imshow(open_rgb(image))
        ax.set_title(f"{predicted}/{actual}\nloss {loss:.2f}, p {prob:.2f}", fontsize=9)
    fig.suptitle("top losses: predicted/actual", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
