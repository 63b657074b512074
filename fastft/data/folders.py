"""Folders on disk, in one place: the dataset layouts fastft reads (split names, class folders), collecting
image files, keeping the readable ones, and naming the folders fastft writes (runs, evaluations).

Layouts (class names are folder names):
    DIR/train/<class>/*  +  DIR/test/<class>/*  (or valid/, val/)  -- the test split is the validation set, as in d2l
    DIR/<class>/*                                                 -- split by a seeded valid_pct

Light on purpose (PIL, no fastai): inference uses it too.
"""
from __future__ import annotations

import os
from pathlib import Path

from fastft.data.images import image_extensions, split_readable, warn_skipped
from fastft.data.labels import read_labels
from fastft.data.split import Split, holdout_share, seeded_split, stratified_sample
from fastft.errors import UsageError, did_you_mean

TRAIN_SPLIT = "train"
TEST_SPLIT_NAMES = ("test", "valid", "val")  # the first that exists beside train/ is the test split
VALID_SPLIT_NAMES = ("valid", "val")  # beside train/ and test/: a validation split, to pick epochs on


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, in Path order (symlinked folders are not followed, as
    with Path.rglob). os.scandir tells files from folders without a stat per file, and sorting each folder's
    names is cheaper than sorting whole paths: all of CIFAR-10's 60,000 files are listed in a fraction of the
    time of rglob, is_file and sorted."""
    extensions, found = image_extensions(), []

    def visit(path: str) -> None:
        with os.scandir(path) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)  # Path order compares names folder by folder
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                visit(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in extensions and entry.is_file():
                found.append(Path(entry.path))

    visit(str(folder))
    return found


def class_images(folder: Path) -> dict[str, list[Path]]:
    """class name -> sorted image files under folder/<class>/ (recursively); hidden folders are ignored."""
    return {d.name: image_files(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def test_folder(root: Path) -> Path | None:
    """root's test split folder (test/, valid/ or val/), if it has one."""
    return next((root / name for name in TEST_SPLIT_NAMES if (root / name).is_dir()), None)


def check_data_folder(root: Path) -> None:
    """A one-line error, with the nearest folder's name, when the data folder does not exist."""
    if not root.is_dir():
        folders = [p for p in root.parent.iterdir() if p.is_dir()] if root.parent.is_dir() else []
        raise UsageError(f"data folder {root} does not exist{did_you_mean(str(root), folders)}; give a folder of class "
                         "folders, or of train/ and test/ class folders")


def validation_folder(root: Path) -> Path | None:
    """root's validation split folder: valid/ or val/ beside train/ and a test split folder of another name."""
    test_dir = test_folder(root)
    return next((root / n for n in VALID_SPLIT_NAMES if (root / n).is_dir() and root / n != test_dir), None)


def find_images(root: Path, valid_pct: float, seed: int, empty_ok: bool = False) -> Split:
    """Find the train/test class folders under `root` (or split one set of class folders by seed). `empty_ok`: an
    empty class folder is kept with no images (`fastft inspect` reports it) instead of being an error."""
    check_data_folder(root)
    if all((root / n).is_dir() for n in VALID_SPLIT_NAMES) and (root / TRAIN_SPLIT).is_dir():
        # which would be which is a guess either way: valid/ became the test split beside val/, silently
        raise UsageError(f"{root} has both val/ and valid/ beside train/: fastft reads test/ as the test split (or "
                         "valid/, or val/, where there is no test/) and valid/ or val/ beside test/ as the validation "
                         "split; rename the one that scores the model to test/, or merge the two")
    test_dir = test_folder(root)
    if (root / TRAIN_SPLIT).is_dir() and test_dir is None:
        raise UsageError(f"{root} has train/ but no test/ (or valid/) beside it; add one, "
                         "or put the class folders directly in the data folder to split them by --valid-pct")
    if (root / TRAIN_SPLIT).is_dir():
        train, test = class_images(root / TRAIN_SPLIT), class_images(test_dir)
        valid_dir = validation_folder(root)
        valid = class_images(valid_dir) if valid_dir else {}
        for folder, classes in ((test_dir, test), (valid_dir, valid)):
            if unknown := sorted(set(classes) - set(train)):
                raise UsageError(f"{folder} has classes that {root / TRAIN_SPLIT} lacks: {', '.join(unknown)}; "
                                 "give every split the same class folders")
        at_least_two_classes(root, root / TRAIN_SPLIT, train)
        return Split(sorted(train), train, test, valid)
    else:
        by_class = class_images(root)
        if not by_class or not any(by_class.values()):
            raise UsageError(f"{root} has no train/ and test/ folders of class folders, nor class folders of images; "
                             f"expected {root}/<class>/*.jpg{csv_hint(root)}")
        at_least_two_classes(root, root, by_class)
        train, test = seeded_split(by_class, valid_pct, seed, empty_ok=empty_ok)
    return Split(sorted(train), train, test)


def csv_hint(root: Path) -> str:
    """What to say when a folder of images comes with its labels in a CSV file instead of class folders."""
    tables = sorted(p.name for p in root.glob("*.csv"))
    return f"; it holds {tables[0]}: pass --labels {root / tables[0]} to read the labels from it" if tables else ""


def at_least_two_classes(root: Path, folder: Path, by_class: dict[str, list[Path]]) -> None:
    """A classifier needs two classes: a folder of images with one class folder (often images/ beside a CSV of
    labels) would train a model that always answers the same and reports accuracy 1.0."""
    if len(by_class) < 2:
        found = f"one class folder ({next(iter(by_class))}/)" if by_class else "no class folders"
        raise UsageError(f"{folder} has {found}; a classifier needs at least two, one folder of images per class: "
                         f"{folder}/<class>/*.jpg{csv_hint(root)}")


def split_files(root: Path, recipe, empty_ok: bool = False) -> Split:
    """The files a run trains, tests and validates on: found in class folders or a labels CSV (split by seed when
    the data has no split), the training files sampled to --limit and a validation split carved from them when
    --holdout asks, the test (and a valid/ folder's) files sampled to --limit. Training and `fastft evaluate` of the
    run's own data both call this, so they see the same split."""
    valid_pct, seed, limit, holdout = recipe.valid_pct, recipe.seed, recipe.limit, recipe.holdout
    if recipe.labels:
        split = read_labels(Path(recipe.labels).expanduser(), root, recipe.image_col, recipe.label_col,
                            recipe.label_delim, valid_pct, seed)
    else:
        split = find_images(root, valid_pct, seed, empty_ok)
    split.holdout = holdout_share(holdout, split, limit)
    split.train = stratified_sample(split.train, limit, seed)  # --limit first: the validation split comes out of these
    if split.holdout:
        if split.valid:
            raise UsageError(f"{root} has a validation split (valid/ beside train/ and test/) already; drop --holdout")
        split.train, split.valid = seeded_split(split.train, split.holdout, seed + 2, "validation",
                                                strict=not split.multi_label and holdout != "auto")
    split.test = stratified_sample(split.test, limit, seed + 1)
    split.valid = stratified_sample(split.valid, limit, seed + 2)
    return split


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders recursed for image files, in a stable order."""
    found = []
    for path in paths:
        if path.is_dir():
            found += image_files(path)
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise UsageError(f"{path} is not a regular file (a device, a FIFO or a socket); pass image files or folders "
                             "of images")
        else:
            raise UsageError(f"{path} does not exist; pass image files or folders of images")
    return found


def keep_readable(files: list[Path], quiet: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(the files that decode, in order; [(file, reason)] for the rest), with one warning listing the rest."""
    good, bad = split_readable(files)
    if not quiet:
        warn_skipped(bad)
    return good, bad
