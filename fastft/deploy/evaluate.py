"""`fastft evaluate MODEL [DATA]`: accuracy, per-class precision and recall, confusion matrix and top losses."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastft.atomic import save_figure, write_json
from fastft.data.folders import class_images, keep_readable, split_files, test_folder
from fastft.run_folder import new_run_folder, numbered, run_folder_of
from fastft.errors import UsageError


def run_recipe(model_path: Path):
    """The recipe of the run a model came from (its folder's recipe.toml), if it is there."""
    from fastft.recipe import read_recipe_file

    saved = run_folder_of(model_path).recipe
    try:
        return read_recipe_file(saved) if saved.is_file() else None
    except UsageError:
        return None  # an older or edited recipe: evaluate the folder as given


def own_data(model_path: Path, recipe) -> Path:
    """The data the run named in its recipe.toml (its labels CSV, or its folder), for an evaluation given no DATA."""
    if recipe is None or not recipe.data:
        raise UsageError(f"{model_path} has no recipe.toml naming the data it was trained on (a model file moved on "
                         "its own?); give DATA: a folder of class folders, one with test/, or a labels CSV")
    return Path(recipe.labels or recipe.data)


def run_test_files(model_path: Path, data: Path, recipe) -> tuple[list[tuple[Path, str]], str, str] | None:
    """The run's own test images (test_files.txt), when `data` is the run's own data: the images its printed test
    figures were measured on, after --limit. ((image, key) pairs, in words, the delimiter: a tab between a
    multi-label image's labels), or None."""
    listed = run_folder_of(model_path).test_files
    own = recipe is not None and recipe.data and Path(recipe.labels or recipe.data).resolve() == data.resolve()
    if not (own and listed.is_file()):
        return None
    rows = [line.split("\t") for line in listed.read_text().splitlines() if line]
    multi = any(len(row) != 2 for row in rows)  # an image with several labels (or none)
    pairs = [(Path(row[0]), "\t".join(row[1:])) for row in rows]
    keep = set(keep_readable([p for p, _ in pairs])[0])
    scored = (f"the run's {len(pairs)} test images, held out from training ({listed.name}: the ones its test figures "
              "were measured on)")
    return [(p, k) for p, k in pairs if p in keep], scored, "\t" if multi else ""


def labelled_images(data: Path, recipe=None) -> tuple[list[tuple[Path, str]], str, str]:
    """((image, key) pairs, which images those are in words, the multi-label delimiter or ''). The key is a class,
    or a multi-label image's labels joined by the delimiter. DATA/test (or valid) if it has one. The run's own
    data without a split (a folder, or its labels CSV): the images the run held out (its seed, --valid-pct and
    --limit), never the ones it trained on. Any other folder: all of its class folders; any other CSV: every row."""
    own = recipe is not None and recipe.data and (
        Path(recipe.data).resolve() == data.resolve() or (recipe.labels and Path(recipe.labels).resolve() == data.resolve()))
    delimiter = ""
    if data.suffix.lower() == ".csv" and data.is_file():
        if own:
            split = split_files(Path(recipe.data), recipe)
            by_key, scored = split.test, f"the test rows of {data} (held out by the run, or its split column)"
        else:
            from fastft.data.labels import read_labels

            split = read_labels(data, None, recipe.image_col if recipe else "", recipe.label_col if recipe else "",
                                recipe.label_delim if recipe else "", 0.2, 0)
            by_key = {k: split.train.get(k, []) + split.test.get(k, []) + split.valid.get(k, [])
                      for k in {*split.train, *split.test, *split.valid}}
            scored = f"every row of {data} (whatever its split column says: any the model trained on count too)"
        delimiter = split.delimiter
    elif not data.is_dir():
        raise UsageError(f"data folder {data} does not exist; pass a folder of class folders (or one with test/), "
                         "or a labels CSV")
    elif folder := test_folder(data):
        by_key, scored = class_images(folder), f"the test split {folder}"
    elif own:
        split = split_files(data, recipe)
        by_key, delimiter = split.test, split.delimiter
        scored = (f"the images of {data} the run held out from training ({recipe.valid_pct:.0%} of each class, "
                  f"seed {recipe.seed})")
    else:
        by_key = class_images(data)
        scored = f"every image in the class folders of {data} (it has no test/ split: any it was trained on count too)"
    by_key = {k: files for k, files in by_key.items() if files}
    if not by_key:
        raise UsageError(f"{data} has no labelled images to score; expected {data}/<class>/*.jpg or a labels CSV")
    pairs = [(p, k) for k, files in sorted(by_key.items()) for p in files]
    keep = set(keep_readable([p for p, _ in pairs])[0])
    return [(p, k) for p, k in pairs if p in keep], scored, delimiter


def evaluation_folder(model_path: Path, data: Path, out: str | None) -> Path:
    """--out, or a new eval-<data name>[-N] folder beside the model; never an existing non-empty one."""
    if out:
        return new_run_folder(out, "")
    return numbered(run_folder_of(model_path).path / f"eval-{data.resolve().stem}")


def evaluate(model_path: Path, data: Path | None, out: str | None = None, bs: int = 64, tta: bool | None = None,
             trust_pickle: bool = False) -> dict:
    """Score a model on labelled images: deploy/scores.py's figures, confusion.png (single-label),
    top_losses.png and evaluation.json in a new folder. `data` None: the run's own test split."""
    from fastft.deploy import scores
    from fastft.deploy.bundle import load

    model = load(model_path, trust_pickle=trust_pickle)
    recipe = run_recipe(model_path)
    if data is None:
        data = own_data(model_path, recipe)
    pairs, scored, delimiter = run_test_files(model_path, data, recipe) or labelled_images(data, recipe)
    labels_of = (lambda key: key.split(delimiter)) if delimiter else (lambda key: [key])
    if unknown := sorted({label for _, key in pairs for label in labels_of(key)} - set(model.classes)):
        raise UsageError(f"{data} has labels the model does not know: {', '.join(unknown)} "
                         f"(it knows {', '.join(model.classes)})")
    if bool(delimiter) != model.multi_label and delimiter:
        raise UsageError(f"{data} gives several labels per image, but {model_path} is a single-label model")
    folder = evaluation_folder(model_path, data, out)
    results = list(model.predict_batch([p for p, _ in pairs], bs=bs, tta=tta))
    index = {c: i for i, c in enumerate(model.classes)}
    probs = np.array([[r["probabilities"][c] for c in model.classes] for r in results])
    if model.multi_label:
        truth = np.zeros_like(probs)
        for row, (_, key) in enumerate(pairs):
            truth[row, [index[label] for label in labels_of(key)]] = 1.0
        figures = scores.multi_label(probs, truth, model.classes, model.threshold)
        clipped = np.clip(probs, 1e-12, 1 - 1e-12)
        losses = -(truth * np.log(clipped) + (1 - truth) * np.log(1 - clipped)).mean(axis=1)
        shown = [";".join(r["labels"]) or "(none)" for r in results]
    else:
        truth = np.array([index[key] for _, key in pairs])
        figures = scores.single_label(probs, truth, model.classes)
        losses = -np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, 1.0))
        shown = [r["label"] for r in results]
    report = {"model": str(model_path), "data": str(data), "images": len(pairs), "scored": scored,
              "tta": bool(model.flip_tta(tta)), **figures,
              "calibration": calibration_report(model, probs, truth)}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "evaluation.json", report)
    if not model.multi_label:
        plot_confusion(np.array(figures["confusion"]["matrix"]), model.classes, folder / "confusion.png")
    worst = np.argsort(-losses)[:9]
    rows = [(pairs[i][0], pairs[i][1], shown[i], losses[i], float(probs[i].max())) for i in worst]
    plot_top_losses(rows, folder / "top_losses.png")
    from fastft.deploy.explain import plot_top_losses as plot_explained

    report["pictures"] = ["confusion.png"] * (not model.multi_label) + ["top_losses.png"] + (
        ["gradcam_top_losses.png"] if plot_explained(model, rows, folder / "gradcam_top_losses.png") else [])
    write_json(folder / "evaluation.json", report)
    report["folder"] = str(folder)
    return report


def calibration_report(model, probs: np.ndarray, truth: np.ndarray) -> dict:
    """ECE, NLL and Brier score of the model's probabilities as it gives them, and, for a calibrated model, of the
    probabilities it would give uncalibrated: its temperature undone (T x log p is the logits up to a constant per
    image: exact for one prediction, close for a flip-TTA average)."""
    from fastft.deploy import calibration

    given = calibration.figures(probs, truth, model.multi_label)
    if not model.calibrated:
        return {"calibrated": False, "figures": given}
    temperature = np.asarray(model.meta["temperature"], dtype=np.float64)
    clipped = np.clip(probs, 1e-12, 1 - 1e-12)
    logits = np.log(clipped / (1 - clipped)) if model.multi_label else np.log(clipped)
    before = calibration.scaled(logits * temperature, 1.0, model.multi_label)
    return {"calibrated": True, "temperature": model.meta["temperature"],
            "before": calibration.figures(before, truth, model.multi_label), "after": given}


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    from fastft.atomic import subplots

    side = max(4, 0.6 * len(classes) + 2)
    fig, ax = subplots(figsize=(side, side))
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
    from fastft.atomic import subplots

    from fastft.data.images import open_rgb

    cols = 3
    nrows = max(1, -(-len(rows) // cols))
    fig, axes = subplots(nrows, cols, figsize=(cols * 3, nrows * 3.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, actual, predicted, loss, prob) in zip(axes.flat, rows):
        ax.imshow(open_rgb(image))
        ax.set_title(f"{predicted}/{actual}\nloss {loss:.2f}, p {prob:.2f}", fontsize=9)
    fig.suptitle("top losses: predicted/actual", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
