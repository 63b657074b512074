"""One DataBlock builder for folder datasets.

Layouts (class names are folder names):
    DIR/train/<class>/*  +  DIR/test/<class>/*  (or valid/)  -- the test split is the validation set, as in d2l
    DIR/<class>/*                                            -- split by a seeded valid_pct
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fastft.errors import UsageError
from fastft.images import image_extensions, split_readable, warn_skipped
from fastft.recipe import Recipe

TEST_SPLIT_NAMES = ("test", "valid", "val")


@dataclass
class Split:
    """Image files per class for training and for testing (validation)."""
    classes: list[str]
    train: dict[str, list[Path]]
    test: dict[str, list[Path]]
    skipped: list[tuple[Path, str]]
    pixels: dict = field(default_factory=dict)  # "train"/"test" -> (N, 3, H, W) uint8, in item order, when cached


def _class_images(folder: Path, extensions: set[str]) -> dict[str, list[Path]]:
    """class name -> sorted image files under folder/<class>/ (recursively)."""
    return {
        d.name: sorted(p for p in d.rglob("*") if p.suffix.lower() in extensions and p.is_file())
        for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")
    }


def find_images(root: Path, valid_pct: float, seed: int) -> Split:
    """Find the train/test class folders under `root` (or split one set of class folders)."""
    if not root.is_dir():
        raise UsageError(f"data folder {root} does not exist; pass --data with a folder of train/ and test/ class folders")
    extensions = image_extensions()
    test_dir = next((root / n for n in TEST_SPLIT_NAMES if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is None:
        raise UsageError(f"{root} has train/ but no test/ (or valid/) beside it; add one, "
                         "or put the class folders directly in the data folder to split them by --valid-pct")
    if (root / "train").is_dir():
        train, test = _class_images(root / "train", extensions), _class_images(test_dir, extensions)
        if unknown := sorted(set(test) - set(train)):
            raise UsageError(f"{test_dir} has classes that {root / 'train'} lacks: {', '.join(unknown)}; "
                             "give both splits the same class folders")
    else:
        by_class = _class_images(root, extensions)
        if not by_class or not any(by_class.values()):
            raise UsageError(f"{root} has no train/ and test/ folders of class folders, nor class folders of images; "
                             f"expected {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg")
        rng = random.Random(seed)
        train, test = {}, {}
        for name, files in by_class.items():
            files = files[:]
            rng.shuffle(files)
            n_test = round(len(files) * valid_pct)
            test[name], train[name] = sorted(files[:n_test]), sorted(files[n_test:])
    if not train:
        raise UsageError(f"{root / 'train'} has no class folders; expected {root}/train/<class>/*.jpg")
    return Split(sorted(train), train, test, [])


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


def drop_unreadable(split: Split, recipe: Recipe, quiet: bool = False) -> Split:
    """Skip files that do not decode, with one warning listing them; a class left empty is an error.
    Where the decode-once cache applies (fastft/cache.py), this pass decodes the pictures too."""
    from fastft import cache

    n_files = sum(len(f) for part in (split.train, split.test) for f in part.values())
    cached = recipe.cache and cache.applies(recipe.aug, recipe.size, n_files)
    for part in ("train", "test"):
        by_class = getattr(split, part)
        files = [p for c in split.classes for p in by_class.get(c, [])]  # item order
        if cached:
            good, split.pixels[part], bad = cache.decode(files, recipe.size, recipe.crop_pct)
        else:
            good, bad = split_readable(files)
        readable = set(good)
        for name, files in by_class.items():
            by_class[name] = [p for p in files if p in readable]
        split.skipped += bad
    if not quiet:
        warn_skipped(split.skipped)
    for part in ("train", "test"):
        for name, files in getattr(split, part).items():
            if not files:
                raise UsageError(f"class folder '{name}' in the {part} split has no readable images; "
                                 "add images to it or remove the folder")
    return split


def load_split(root: Path, recipe: Recipe, quiet: bool = False) -> Split:
    split = find_images(root, recipe.valid_pct, recipe.seed)
    split.train = stratified_sample(split.train, recipe.limit, recipe.seed)
    split.test = stratified_sample(split.test, recipe.limit, recipe.seed + 1)
    return drop_unreadable(split, recipe, quiet)


def build_dataloaders(split: Split, recipe: Recipe, mean, std, device):
    """fastai DataLoaders: item transforms per image on the CPU, batch transforms on `device`."""
    import torch
    from fastai.vision.all import CategoryBlock, DataBlock, ImageBlock, IndexSplitter, Normalize

    from fastft.augment import build_transforms
    from fastft.transforms import CachedDL, RGBImage, image_of, label_of

    train = [[p, c] for c in split.classes for p in split.train[c]]
    test = [[p, c] for c in split.classes for p in split.test.get(c, [])]
    item_tfms, batch_tfms = build_transforms(recipe.aug, recipe.size, recipe.crop_pct)
    bs = min(recipe.bs, len(train))  # fastai drops the last partial batch: a bigger bs would train on nothing
    if bs < recipe.bs:
        print(f"note: batch size {recipe.bs} is more than the {len(train)} training images; using {bs}", file=sys.stderr)
    block = DataBlock(
        blocks=(ImageBlock(cls=RGBImage), CategoryBlock(vocab=split.classes)),
        get_x=image_of, get_y=label_of,
        splitter=IndexSplitter(range(len(train), len(train) + len(test))),
        item_tfms=item_tfms,
        batch_tfms=[*batch_tfms, Normalize.from_stats(mean, std)],
    )
    cached = bool(split.pixels)  # batches come from memory: worker processes would only add copying
    dls = block.dataloaders(train + test, bs=bs, num_workers=0 if cached else recipe.workers, device=device,
                            dl_type=CachedDL)
    if cached:
        for dl, part, items in ((dls.train, "train", train), (dls.valid, "test", test)):
            labels = [split.classes.index(c) for _, c in items]
            dl.pixels = split.pixels[part], torch.tensor(labels)
    return dls
