"""Out-of-fold predictions on the training images: what the label check and the backbone choice both stand on.

A frozen backbone turns every training image, and its mirror image, into pooled features once (fastft/train/features.py);
they are cached by file, so a changed label, a second look or the probe that follows costs no backbone pass. The
images are dealt into k stratified, seeded folds, and a linear probe (the logistic regression of
fastft/train/probe.py) fitted on the other folds predicts each fold: every image is judged by a model that never saw
its label. Only the training images are read.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import torch

from fastft.data.loaders import training_targets
from fastft.data.split import indices_by_key, shuffled_by_group
from fastft.errors import UsageError
from fastft.schedules import LINEAR_PROBE
from fastft.train.features import frozen_features

FOLDS = 5  # fewer when the smallest class has fewer training images


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
        raise UsageError(f"out-of-fold predictions need at least 2 training images per class, and '{smallest}' has 1; add "
                         f"images to it (or leave it out of the data)")
    if counts[smallest] < FOLDS:
        return counts[smallest], [f"note: {counts[smallest]} folds instead of {FOLDS}: class '{smallest}' has only "
                                  f"{counts[smallest]} training images"]
    return FOLDS, []


def stratified_folds(keys: list[str], k: int, seed: int) -> torch.Tensor:
    """Each image's fold (N,): every class (label set) shuffled with `seed` and dealt out in turn."""
    fold, turn = torch.empty(len(keys), dtype=torch.long), 0
    for members in shuffled_by_group(indices_by_key(keys), seed).values():
        for member in members:
            fold[member] = turn % k
            turn += 1
    return fold


def fold_probes(features: torch.Tensor, mirrors: torch.Tensor, labels: torch.Tensor, n_classes: int,
                folds: torch.Tensor, seed: int, multi_label: bool):
    """For each dealing of `folds` (N,) or (R, N) and each fold k of it: (the images held out, their logits, their
    mirror images' logits) from a probe fitted on the other folds (images and mirror images). The L2 penalty is
    chosen once, as the probe chooses it, on all the images: one number, which barely leaks, where choosing it per
    fold would cost k times as long."""
    from fastft.train.probe import choose_penalty, logistic_regression, standardised

    x, _, _ = standardised(torch.cat([features, mirrors]))
    originals, flipped = x[: len(features)], x[len(features):]
    both = torch.cat([labels, labels])
    penalty = choose_penalty(x, both, n_classes, seed, multi_label, quiet=True).penalty
    for dealing in folds.reshape(-1, len(features)):
        for k in range(int(dealing.max()) + 1):
            held = dealing == k
            rows = torch.cat([~held, ~held])
            weight, bias = logistic_regression(x[rows], both[rows], n_classes, penalty, multi_label)
            yield held, originals[held] @ weight.T + bias, flipped[held] @ weight.T + bias


def out_of_fold_probabilities(features: torch.Tensor, mirrors: torch.Tensor, labels: torch.Tensor, n_classes: int,
                              folds: torch.Tensor, seed: int, multi_label: bool) -> torch.Tensor:
    """(N, C) probabilities of every image, each from a probe fitted on the folds it is not in, averaging the image's
    and its mirror's (`fold_probes`). `folds`: each image's fold (N,), or R repeats of the dealing (R, N), whose
    probabilities are averaged."""
    activation = torch.sigmoid if multi_label else (lambda logits: logits.softmax(1))
    dealings = folds.reshape(-1, len(features))
    probabilities = torch.zeros(len(features), n_classes)
    for held, logits, mirrored in fold_probes(features, mirrors, labels, n_classes, folds, seed, multi_label):
        probabilities[held] += (activation(logits) + activation(mirrored)) / (2 * len(dealings))
    return probabilities


def out_of_fold_logits(features: torch.Tensor, mirrors: torch.Tensor, labels: torch.Tensor, n_classes: int,
                       folds: torch.Tensor, seed: int, multi_label: bool) -> torch.Tensor:
    """(N, C) logits of every image itself (not its mirror image: what a model is asked at test time), each from a
    probe fitted on the folds it is not in; one dealing (`folds` (N,))."""
    out = torch.empty(len(features), n_classes)
    for held, logits, _ in fold_probes(features, mirrors, labels, n_classes, folds, seed, multi_label):
        out[held] = logits
    return out


class TrainingFolds(NamedTuple):
    """The training images dealt into folds: what every backbone's out-of-fold predictions are made on."""
    items: list  # [file, label key] in the split's item order
    labels: torch.Tensor  # class indices (N,), multi-label 0/1 (N, C)
    folds: torch.Tensor  # each image's fold (N,), or in each of R dealings (R, N)
    k: int
    notes: list[str]  # fewer folds than FOLDS, and why (printed once)

    @property
    def repeats(self) -> int:
        return 1 if self.folds.dim() == 1 else len(self.folds)


def training_folds(split, seed: int, repeats: int = 1) -> TrainingFolds:
    """`split`'s training images in k stratified, seeded folds (the notes said on stderr); `repeats` > 1: dealt that
    many times (seeds seed, seed + 1 ...), each image predicted once per dealing."""
    items = [[p, key] for p, key in split.items("train")]
    keys = [key for _, key in items]
    k, notes = fold_count(keys, split.multi_label)
    for note in notes:
        print(note, file=sys.stderr)
    folds = (stratified_folds(keys, k, seed) if repeats == 1 else
             torch.stack([stratified_folds(keys, k, seed + r) for r in range(repeats)]))
    return TrainingFolds(items, training_targets(split, keys), folds, k, notes)


def probabilities_of(learn, recipe, split, folds: TrainingFolds) -> torch.Tensor:
    """The out-of-fold probabilities (N, C) of the training images from `learn`'s frozen backbone (its features
    cached) and k linear probes."""
    features, mirrors = frozen_features(learn, folds.items, recipe)
    return out_of_fold_probabilities(features, mirrors, folds.labels, len(split.classes), folds.folds, recipe.seed,
                                     split.multi_label)


def frozen_learner(split, recipe, start, device):
    """A Learner whose backbone holds the recipe's starting weights, and a probe's head (pooled features)."""
    from fastft.data.augment import parse_aug
    from fastft.data.loaders import build_dataloaders
    from fastft.train.model import create_learner, head_config, normalization

    # the batch size only matters to training: no note about it here
    probe = recipe.replace(strategy=LINEAR_PROBE, bs=max(1, min(recipe.bs, len(split.items("train")))))
    mean, std = normalization(recipe.arch)
    dls = build_dataloaders(split, probe, mean, std, device, parse_aug(recipe.aug))
    learn, _ = create_learner(dls, probe, start, head=head_config(LINEAR_PROBE, 0.0), multi_label=split.multi_label)
    return learn
