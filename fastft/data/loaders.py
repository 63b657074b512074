"""A dataset folder to fastai DataLoaders: find the files, sample, drop the unreadable, decode once where
it applies, and build one DataBlock with the plan's item and batch transforms."""
from __future__ import annotations

import sys
from pathlib import Path

from fastft.data.augment import AugPlan, parse_aug
from fastft.data.folders import Split, keep_readable, split_files
from fastft.data.images import warn_skipped
from fastft.errors import UsageError
from fastft.recipe import Recipe

PARTS = ("train", "test")


def drop_unreadable(split: Split, recipe: Recipe, plan: AugPlan, quiet: bool = False) -> Split:
    """Skip files that do not decode, with one warning listing them; a class left empty is an error.
    Where the decode-once cache applies (fastft/data/cache.py), this pass decodes the pictures too."""
    from fastft.data import cache

    n_files = sum(len(f) for part in PARTS for f in getattr(split, part).values())
    cached = recipe.cache and cache.applies(plan, recipe.size, n_files)
    for part in PARTS:
        files = [p for p, _ in split.items(part)]
        if cached:
            good, split.pixels[part], bad = cache.decode(files, recipe.size, recipe.crop_pct)
        else:
            good, bad = keep_readable(files, quiet=True)
        readable = set(good)
        by_class = getattr(split, part)
        for name, files in by_class.items():
            by_class[name] = [p for p in files if p in readable]
        split.skipped += bad
    if not quiet:
        warn_skipped(split.skipped)
    for part in PARTS:
        for name, files in getattr(split, part).items():
            if not files:
                raise UsageError(f"class folder '{name}' in the {part} split has no readable images; "
                                 "add images to it or remove the folder")
    return split


def load_split(root: Path, recipe: Recipe, plan: AugPlan | None = None, quiet: bool = False) -> Split:
    """The recipe's images under `root`: found, sampled (--limit) and checked (decoded, when cached)."""
    split = split_files(root, recipe.valid_pct, recipe.seed, recipe.limit)
    return drop_unreadable(split, recipe, plan or parse_aug(recipe.aug), quiet)


def build_dataloaders(split: Split, recipe: Recipe, mean, std, device, plan: AugPlan | None = None):
    """fastai DataLoaders: item transforms per image on the CPU, batch transforms on `device`."""
    import torch
    from fastai.vision.all import CategoryBlock, DataBlock, ImageBlock, IndexSplitter, Normalize

    from fastft.data.transforms import CachedDL, RGBImage, image_of, label_of

    train, test = ([list(pair) for pair in split.items(part)] for part in PARTS)
    item_tfms, batch_tfms = (plan or parse_aug(recipe.aug)).transforms(recipe.size, recipe.crop_pct)
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
