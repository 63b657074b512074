"""The one place a run's images are split: the `Split` a run trains, tests and validates on, and the seeded,
class-stratified ways of dividing images (a held-out share, a --limit sample, the trial's fold, the probe's
validation share, k folds). Every one shuffles each class's members with one seeded generator, class by class
(`shuffled_by_group`), so the same files and seed always give the same split: a run's `evaluate` re-creates it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from fastft.errors import UsageError

# images: on fewer, one temperature is mostly noise (on 14 it made the test NLL worse); uncalibrated
# (fastft/deploy/calibration.py; here because --holdout auto holds out enough of them, or none)
MIN_HELD_OUT = 50


def labels_in(key: str, delimiter: str) -> list[str]:
    """The labels a split key stands for: the class itself, or (multi-label) the label set joined by `delimiter`."""
    return key.split(delimiter) if delimiter else [key]


@dataclass
class Split:
    """Image files per class for training, for testing (d2l's validation set, measured every epoch) and, when
    the run has one, for validation apart from the test split (picking the best epoch, stopping early)."""
    classes: list[str]
    train: dict[str, list[Path]]
    test: dict[str, list[Path]]
    valid: dict[str, list[Path]] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    pixels: dict = field(default_factory=dict)  # part -> (N, 3, H, W) uint8, in item order, when cached
    delimiter: str = ""  # multi-label (a labels CSV): keys are label sets joined by it; "" for single-label
    holdout: float = 0.0  # the share of each class's training images held out as `valid` (--holdout, auto resolved)

    @property
    def multi_label(self) -> bool:
        return bool(self.delimiter)

    def labels_of(self, key: str) -> list[str]:
        return labels_in(key, self.delimiter)

    @property
    def parts(self) -> tuple[str, ...]:
        return ("train", "test", "valid") if self.valid else ("train", "test")

    def items(self, part: str) -> list[tuple[Path, str]]:
        """(file, key) pairs of one split, key by key (a class; multi-label: a label set): the order items, labels
        and cached pixels share."""
        by_key = getattr(self, part)
        return [(p, key) for key in sorted(by_key) for p in by_key[key]]


def shuffled_by_group(groups: dict[str, list], seed: int) -> dict[str, list]:
    """Each group's members (files of a class, indices of a label set) shuffled, copies: one `random.Random(seed)`
    shuffles group after group, in the order given."""
    rng, shuffled = random.Random(seed), {}
    for name, members in groups.items():
        shuffled[name] = members[:]
        rng.shuffle(shuffled[name])
    return shuffled


def indices_by_key(keys: list[str]) -> dict[str, list[int]]:
    """The positions of each key (a class, or a multi-label row's label set), keys sorted: the groups an index split
    deals out."""
    return {key: [i for i, other in enumerate(keys) if other == key] for key in sorted(set(keys))}


def seeded_split(by_class: dict[str, list[Path]], valid_pct: float, seed: int, what: str = "testing",
                 strict: bool = True, empty_ok: bool = False) -> tuple[dict, dict]:
    """(train, test) per class: each class shuffled by `seed`, round(n * valid_pct) of it held out. The same
    files, seed and share always give the same split (a run's evaluation re-creates it). `strict`: a class
    too small to hold any out is an error; otherwise (multi-label label sets, many of them rare) it trains."""
    train, test = {}, {}
    for name, files in shuffled_by_group(by_class, seed).items():
        n_test = round(len(files) * valid_pct)
        if not files and (empty_ok or not strict):
            test[name], train[name] = [], []
            continue
        if not files:
            raise UsageError(f"class folder '{name}' has no images; add images to it, or remove the empty folder")
        if not strict and not 0 < n_test < len(files):
            n_test = 0
        elif not 0 < n_test < len(files):
            needed = next(n for n in range(2, 10_000) if 0 < round(n * valid_pct) < n)
            option = "--valid-pct" if what == "testing" else "--holdout"
            raise UsageError(f"class '{name}' has {len(files)} image(s): too few to hold out {valid_pct:.0%} of each "
                             f"class for {what} and train on the rest (at least {needed} needed); add images to it, "
                             f"change {option}, or remove the class folder")
        test[name], train[name] = sorted(files[:n_test]), sorted(files[n_test:])
    return train, test


def stratified_sample(by_class: dict[str, list[Path]], limit: int, seed: int) -> dict[str, list[Path]]:
    """At most `limit` files in all, each class keeping its share (largest remainders get the spare)."""
    total = sum(map(len, by_class.values()))
    if not limit or total <= limit:
        return by_class
    shares = {c: len(f) * limit / total for c, f in by_class.items()}
    quota = {c: int(s) for c, s in shares.items()}
    for c in sorted(shares, key=lambda c: quota[c] - shares[c])[: limit - sum(quota.values())]:
        quota[c] += 1
    rng = random.Random(seed)
    return {c: sorted(rng.sample(files, quota[c])) for c, files in by_class.items()}


AUTO_HOLDOUT = 0.1  # --holdout auto: a tenth of the training images (MIN_HELD_OUT of them from 500 up)


def holdout_share(holdout: float | str, split: Split, limit: int = 0) -> float:
    """The share of the training images to hold out: --holdout as given, or for auto AUTO_HOLDOUT where that is
    MIN_HELD_OUT images or more and the data has no validation split of its own, else none (on a smaller
    folder every image is worth more in training than in a noisy temperature)."""
    if holdout != "auto":
        return holdout
    training = sum(map(len, split.train.values()))
    return AUTO_HOLDOUT if not split.valid and min(training, limit or training) * AUTO_HOLDOUT >= MIN_HELD_OUT else 0.0
