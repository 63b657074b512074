"""The training images whose given label looks wrong: confident learning (Northcutt et al., JAIR 2021, through the
maintained `cleanlab`) on out-of-sample predictions of linear probes.

The frozen backbone turns every training image, and its mirror image, into pooled features once (cached with the
decoded pictures: fastft/data/cache.py). The images are dealt into k stratified folds; a probe (the logistic
regression of fastft/train/probe.py) fitted on the other folds predicts each fold, so every image is judged by a
model that never saw its label. cleanlab estimates, per pair of classes, how often one is given for the other, and
flags the images whose predictions disagree with their label beyond that: its own default threshold, so the list is
as long as the noise it estimates, not a fixed top N. The suspects are ranked by cleanlab's label quality score
(the out-of-fold probability of the given label: low is suspect).

Nothing here reads the test split, and nothing changes or moves the user's files: the result is a list.
"""
from __future__ import annotations

import csv
import hashlib
import os
import random
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from fastft.errors import UsageError

FOLDS = 5  # fewer when the smallest class has fewer training images
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


def fold_count(keys: list[str], multi_label: bool) -> tuple[int, list[str]]:
    """(k, notes): FOLDS, or fewer when a class has fewer training images (every fold's probe must see every class).
    An error when a class has a single image: no probe that held it out would know its class."""
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    if multi_label:  # label sets are often unique: deal them out unstratified
        return min(FOLDS, len(keys)), []
    smallest = min(counts, key=counts.get)
    if counts[smallest] < 2:
        raise UsageError(f"the label check needs at least 2 training images per class, and '{smallest}' has 1; add "
                         f"images to it (or leave it out of the data)")
    if counts[smallest] < FOLDS:
        return counts[smallest], [f"note: {counts[smallest]} folds instead of {FOLDS}: class '{smallest}' has only "
                                  f"{counts[smallest]} training images"]
    return FOLDS, []


def stratified_folds(keys: list[str], k: int, seed: int) -> torch.Tensor:
    """Each image's fold (N,): every class (label set) shuffled with `seed` and dealt out in turn."""
    rng, fold = random.Random(seed), torch.empty(len(keys), dtype=torch.long)
    turn = 0
    for key in sorted(set(keys)):
        members = [i for i, other in enumerate(keys) if other == key]
        rng.shuffle(members)
        for member in members:
            fold[member] = turn % k
            turn += 1
    return fold


def out_of_fold_probabilities(features: torch.Tensor, mirrors: torch.Tensor, labels: torch.Tensor, n_classes: int,
                              folds: torch.Tensor, seed: int, multi_label: bool) -> torch.Tensor:
    """(N, C) probabilities of every image, each from a probe fitted on the folds it is not in (images and their
    mirror images), averaging the image's and its mirror's. The L2 penalty is chosen once, as the probe chooses
    it, on all the images: one number, which barely leaks, where choosing it per fold would cost k times as long."""
    from fastft.train.probe import choose_penalty, logistic_regression, standardised

    x, _, _ = standardised(torch.cat([features, mirrors]))
    originals, flipped = x[: len(features)], x[len(features):]
    both = torch.cat([labels, labels])
    penalty = choose_penalty(x, both, n_classes, seed, multi_label, quiet=True)
    activation = torch.sigmoid if multi_label else (lambda logits: logits.softmax(1))
    probabilities = torch.empty(len(features), n_classes)
    for k in range(int(folds.max()) + 1):
        held = folds == k
        rows = torch.cat([~held, ~held])
        weight, bias = logistic_regression(x[rows], both[rows], n_classes, penalty, multi_label)
        probabilities[held] = (activation(originals[held] @ weight.T + bias)
                               + activation(flipped[held] @ weight.T + bias)) / 2
    return probabilities


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


def backbone_digest(learn) -> str:
    """A digest of the backbone's weights and buffers: the features cache's key for this network."""
    digest = hashlib.sha1()
    for name, tensor in learn.model[0].state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_order(items: list) -> list[int]:
    """The items' indices in file order. Features are stored that way, not in item order (items are grouped by
    label): a changed label, the point of checking them, leaves the cache's key and rows as they were."""
    return sorted(range(len(items)), key=lambda i: str(items[i][0]))


def features_cached(learn, items: list, recipe) -> bool:
    """Whether `frozen_features` will read these items' features back rather than run the backbone."""
    from fastft.data import cache

    files = [Path(items[i][0]) for i in file_order(items)]
    return recipe.cache and cache.features_file(files, recipe.size, recipe.crop_pct, backbone_digest(learn)).is_file()


def frozen_features(learn, items: list, recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), mirror images' features (N, D)) of the training `items` through the frozen backbone, from
    the cache when this network saw these files at this size before (--no-cache: computed, not stored)."""
    from fastft.data import cache
    from fastft.train.probe import pooled_features

    order = file_order(items)

    def compute() -> dict:
        originals, mirrors, _ = pooled_features(learn, [items[i] for i in order], show_progress=sys.stdout.isatty())
        return {"features": originals, "mirrors": mirrors}
    files = [Path(items[i][0]) for i in order]
    stored = (cache.features(files, recipe.size, recipe.crop_pct, backbone_digest(learn), compute) if recipe.cache
              else compute())
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # row of item i in file order
    return stored["features"][back], stored["mirrors"][back]


def frozen_learner(split, recipe, start, device):
    """A Learner whose backbone holds the recipe's starting weights, and a probe's head (pooled features)."""
    from fastft.data.augment import parse_aug
    from fastft.data.loaders import build_dataloaders
    from fastft.train.model import create_learner, head_config, normalization

    # the batch size only matters to training: no note about it here
    probe = recipe.replace(strategy="probe", bs=max(1, min(recipe.bs, len(split.items("train")))))
    mean, std = normalization(recipe.arch)
    dls = build_dataloaders(split, probe, mean, std, device, parse_aug(recipe.aug))
    learn, _ = create_learner(dls, probe, start, head=head_config("probe", 0.0), multi_label=split.multi_label)
    return learn


def check_labels(split, recipe, start, device) -> LabelCheck:
    """The label check of `split`'s training images with `recipe`'s backbone from `start` (StartingWeights)."""
    require_cleanlab()
    items = [[p, key] for p, key in split.items("train")]
    keys = [key for _, key in items]
    k, notes = fold_count(keys, split.multi_label)
    for note in notes:
        print(note, file=sys.stderr)
    learn = frozen_learner(split, recipe, start, device)
    features, mirrors = frozen_features(learn, items, recipe)
    labels = training_labels(split, keys)
    folds = stratified_folds(keys, k, recipe.seed)
    probabilities = out_of_fold_probabilities(features, mirrors, labels, len(split.classes), folds, recipe.seed,
                                              split.multi_label)
    return label_check_of(split, items, probabilities, labels, k, notes)


def training_labels(split, keys: list[str]) -> torch.Tensor:
    """Class indices (N,), or for multi-label data 0/1 per label (N, C), of images with these label keys."""
    if not split.multi_label:
        return torch.tensor([split.classes.index(key) for key in keys])
    labels = torch.zeros(len(keys), len(split.classes))
    for row, key in enumerate(keys):
        labels[row, [split.classes.index(label) for label in split.labels_of(key)]] = 1.0
    return labels


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
    import dataclasses

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
    from fastft.train.model import NO_HUB_WEIGHTS, check_arch, hub_weights_problem, starting_weights

    check_arch(recipe.arch)
    start = starting_weights(recipe)
    if start.kind == "hub" and (problem := hub_weights_problem(recipe.arch)):
        raise UsageError(f"{problem}; {NO_HUB_WEIGHTS.format(arch=recipe.arch)}")
    set_seed(recipe.seed, reproducible=True)
    split = load_split(Path(recipe.data).expanduser(), recipe, parse_aug(recipe.aug))
    return check_labels(split, recipe, start, resolve_device(recipe.device))
