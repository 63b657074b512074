"""The training images whose given label looks wrong: confident learning (Northcutt et al., JAIR 2021, through the
maintained `cleanlab`) on out-of-sample predictions of linear probes.

Out-of-fold predictions (fastft/train/out_of_fold.py: k-fold linear probes on cached frozen features) judge every
training image by a model that never saw its label. cleanlab estimates, per pair of classes, how often one is given for the other, and
flags the images whose predictions disagree with their label beyond that: its own default threshold, so the list is
as long as the noise it estimates, not a fixed top N. The suspects are ranked by cleanlab's label quality score
(the out-of-fold probability of the given label: low is suspect).

Nothing here reads the test split, and nothing changes or moves the user's files: the result is a list.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import NamedTuple

import torch

from fastft.errors import UsageError
from fastft.train.out_of_fold import frozen_learner, probabilities_of, training_folds

SHEET_SIZE = 24  # suspects shown on the contact sheet
INSTALL = "pip install 'fastft[labels]' (cleanlab, AGPL-3.0, an optional extra of fastft)"


class Suspect(NamedTuple):
    """A training image whose given label the out-of-fold predictions disagree with."""
    file: Path
    given: str
    suggested: str
    score: float  # cleanlab's label quality: the out-of-fold probability of the given label (low: suspect)


class LabelCheck(NamedTuple):
    suspects: list[Suspect]  # most suspect first
    images: int  # training images checked
    folds: int
    notes: list[str]  # fewer folds than FOLDS, and why

    def describe(self) -> str:
        return (f"{len(self.suspects)} of {self.images} training images look mislabelled (confident learning on "
                f"out-of-fold predictions of linear probes on frozen features, {self.folds} folds)")


def require_cleanlab() -> None:
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        raise UsageError(f"the label check needs cleanlab, which is not installed; {INSTALL}") from None


def ranked_issues(probabilities, labels, multi_label: bool) -> tuple[list[int], list[float]]:
    """(indices of the images cleanlab flags, most suspect first; every image's label quality score)."""
    import numpy as np

    pred_probs = probabilities.double().numpy()
    if multi_label:
        from cleanlab.multilabel_classification.filter import find_label_issues
        from cleanlab.multilabel_classification.rank import get_label_quality_scores

        given = [np.flatnonzero(row).tolist() for row in labels.numpy()]
        flagged = find_label_issues(given, pred_probs, return_indices_ranked_by="self_confidence", n_jobs=1)
        return [int(i) for i in flagged], get_label_quality_scores(given, pred_probs).tolist()
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    given = labels.numpy()
    flagged = find_label_issues(given, pred_probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    return [int(i) for i in flagged], get_label_quality_scores(given, pred_probs, method="self_confidence").tolist()


def check_labels(split, recipe, start, device) -> LabelCheck:
    """The label check of `split`'s training images with `recipe`'s backbone from `start` (StartingWeights)."""
    require_cleanlab()
    folds = training_folds(split, recipe.seed)
    probabilities = probabilities_of(frozen_learner(split, recipe, start, device), recipe, split, folds)
    return label_check_of(split, folds.items, probabilities, folds.labels, folds.k, folds.notes)


def label_check_of(split, items: list, probabilities: torch.Tensor, labels: torch.Tensor, folds: int,
                   notes: list[str]) -> LabelCheck:
    """The suspects among the training `items`, from their out-of-fold `probabilities`."""
    keys = [key for _, key in items]
    flagged, scores = ranked_issues(probabilities, labels, split.multi_label)
    delimiter = split.delimiter or " "

    def suggested(row: int) -> str:
        if split.multi_label:
            return delimiter.join(c for c, p in zip(split.classes, probabilities[row].tolist()) if p >= 0.5)
        return split.classes[int(probabilities[row].argmax())]
    suspects = [Suspect(Path(items[i][0]), keys[i], suggested(i), scores[i]) for i in flagged]
    return LabelCheck(suspects, len(items), folds, notes)


def without_suspects(split, suspects: list[Suspect]):
    """`split` with these training images left out (the files stay where they are)."""
    dropped = {s.file for s in suspects}
    train = {key: [p for p in files if Path(p) not in dropped] for key, files in split.train.items()}
    pixels = dict(split.pixels)
    if "train" in pixels:  # decoded pictures are in item order: keep the rows of the images kept
        kept = [row for row, (p, _) in enumerate(split.items("train")) if Path(p) not in dropped]
        pixels["train"] = pixels["train"][kept]
    return dataclasses.replace(split, train={key: files for key, files in train.items() if files}, pixels=pixels)


def write_report(check: LabelCheck, csv_path: Path, sheet_path: Path) -> None:
    """label_issues.csv (file, given label, suggested label, score; most suspect first) and a contact sheet PNG
    of the first SHEET_SIZE suspects, each titled with both labels."""
    from fastft.atomic import replacing, save_figure, subplots
    from fastft.data.images import open_rgb

    with replacing(csv_path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "given_label", "suggested_label", "score"])
        writer.writerows([os.path.abspath(s.file), s.given, s.suggested, f"{s.score:.4f}"] for s in check.suspects)
    shown = check.suspects[:SHEET_SIZE]
    columns = min(6, max(1, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    fig, axes = subplots(rows, columns, figsize=(max(columns * 2.0, 4.0), rows * 2.4 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, suspect in zip(axes.flat, shown):
        try:
            ax.imshow(open_rgb(suspect.file))
        except Exception:  # an image that went unreadable since: the sheet leaves a gap, the CSV still lists it
            pass
        ax.set_title(f"given: {suspect.given}\nlooks like: {suspect.suggested}\n{suspect.file.name}", fontsize=7)
    if not shown:
        axes.flat[0].text(0.5, 0.5, "no suspect labels", ha="center", va="center")
    fig.suptitle(f"{len(check.suspects)} of {check.images} training labels look wrong"
                 + (f" (the first {len(shown)})" if len(shown) < len(check.suspects) else ""), fontsize=9)
    fig.tight_layout()
    save_figure(fig, sheet_path)


def as_text(check: LabelCheck, shown: int = 10) -> str:
    lines = [check.describe() + (":" if check.suspects else ".")]
    lines += [f"  {s.file}  given {s.given}, looks like {s.suggested} (score {s.score:.3f})"
              for s in check.suspects[:shown]]
    if len(check.suspects) > shown:
        lines.append(f"  ... and {len(check.suspects) - shown} more in the CSV")
    return "\n".join(lines)


def check_folder(recipe) -> LabelCheck:
    """The label check of the recipe's data (its training images; the test split is not read), with the recipe's
    backbone and starting weights: what `fastft inspect DATA --labels-check` runs."""
    require_cleanlab()  # before minutes of work, not after
    from fastai.torch_core import set_seed

    from fastft.data.augment import parse_aug
    from fastft.data.loaders import load_split
    from fastft.train.devices import resolve_device
    from fastft.train.model import check_arch, require_hub_weights, starting_weights

    check_arch(recipe.arch)
    start = starting_weights(recipe)
    require_hub_weights(recipe.arch, start)
    set_seed(recipe.seed, reproducible=True)
    split = load_split(Path(recipe.data).expanduser(), recipe, parse_aug(recipe.aug))
    return check_labels(split, recipe, start, resolve_device(recipe.device))
