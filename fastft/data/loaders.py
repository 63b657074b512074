"""A dataset folder to fastai DataLoaders: find the files, sample, drop the unreadable, decode once where
it applies, and build one DataBlock with the plan's item and batch transforms."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from fastft.data.augment import AugPlan, parse_aug
from fastft.data.folders import keep_readable, split_files
from fastft.data.split import Split
from fastft.data.images import warn_skipped
from fastft.errors import UsageError
from fastft.recipe import Recipe


def drop_unreadable(split: Split, recipe: Recipe, plan: AugPlan, quiet: bool = False) -> Split:
    """Skip files that do not decode, with one warning listing them; a class left empty is an error.
    Where the decode-once cache applies (fastft/data/cache.py), this pass decodes the pictures too."""
    from fastft.data import cache

    n_files = sum(len(f) for part in split.parts for f in getattr(split, part).values())
    cached = recipe.cache and cache.applies(plan, recipe.size, n_files)
    for part in split.parts:
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
    for part in split.parts:
        by_key = getattr(split, part)
        for name, files in list(by_key.items()):
            if files:
                continue
            if split.multi_label:  # a label set with no readable image: its labels still come in other sets
                del by_key[name]
                continue
            if part != "train":  # few-shot sets often lack test images of some class: measured without it
                del by_key[name]
                if not quiet:
                    print(f"warning: class '{name}' has no images in the {part} split; it is trained on, and the "
                          f"{part} figures leave it out", file=sys.stderr)
                continue
            raise UsageError(f"class '{name}' in the {part} split has no readable images; add images to it or "
                             "remove it")
    for part in ("test", "valid"):
        if part in split.parts and not getattr(split, part):
            raise UsageError(f"the {part} split has no readable images; add some, or put the class folders directly "
                             "in the data folder to split them by --valid-pct")
    return split


def label_counts(split: Split) -> dict[str, int]:
    """Training images per label (multi-label: per label, whatever else the image is labelled)."""
    counts = dict.fromkeys(split.classes, 0)
    for key, files in split.train.items():
        for label in split.labels_of(key):
            counts[label] += len(files)
    return counts


BALANCED_BY = {"weights": "--balance weights weighs them equally in the loss",
               "sampler": "--balance sampler draws each class equally often"}


def imbalance_note(counts: dict[str, int], balance: str = "none") -> str:
    """One line with the counts when the largest class has more than 3x the smallest's images, else '': what the
    run does about it (`balance`), or what it could do."""
    if min(counts.values()) * 3 >= max(counts.values()):
        return ""
    shown = ", ".join(f"{label} {n}" for label, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    remedy = BALANCED_BY.get(balance, "--balance weights or --balance sampler weighs them equally")
    return f"note: the classes are imbalanced (training images: {shown}); {remedy}"


def load_split(root: Path, recipe: Recipe, plan: AugPlan | None = None, quiet: bool = False,
               carve: Callable[[Split], Split] | None = None) -> Split:
    """The recipe's images under `root`: found, sampled (--limit), changed by `carve` when given (before any image is
    read) and checked (decoded, when cached)."""
    split = split_files(root, recipe)
    if carve is not None:
        split = carve(split)
    return drop_unreadable(split, recipe, plan or parse_aug(recipe.aug), quiet)


BATCHES_PER_WORKER = 4  # auto on a GPU: a worker is started for every 4 batches of a pass


def worker_count(workers: int | str, device, batches: int, processes: int = 1) -> int:
    """Worker processes for a DataLoader with `batches` batches per pass. fastai starts every worker anew at every
    pass (its DataLoader keeps the pass's order and random state in the object each worker copies when it starts,
    so workers cannot persist), and a forked worker makes the training process copy every page it writes while
    the worker lives. So never more workers than batches; and auto: none on a CPU, where training keeps the cores
    busy (on 2 cores, 1.6x as fast without workers for 60 photos, 1.1x for 995: bench/README.md); on a GPU, one
    per BATCHES_PER_WORKER batches (a 245-photo fine-tune on an H100 was faster with 2 workers than with 14: issue
    19), up to this process's share of the cores, 8 at most."""
    from fastcore.parallel import num_cpus

    if workers != "auto":
        return min(int(workers), batches)
    if device.type != "cuda":
        return 0
    return min(batches // BATCHES_PER_WORKER, max(1, num_cpus() // processes), 8)


def build_dataloaders(split: Split, recipe: Recipe, mean, std, device, plan: AugPlan | None = None,
                      processes: int = 1):
    """fastai DataLoaders: item transforms per image on the CPU, batch transforms on `device`. dls.train and
    dls.valid are the training and test splits (fastai's valid is d2l's test split); a validation split apart
    from the test split, when the run has one, is dls[2]. `processes`: how many train side by side (distributed),
    sharing the cores for workers."""
    from fastai.vision.all import (CategoryBlock, DataBlock, ImageBlock, IndexSplitter, MultiCategoryBlock, Normalize,
                                   TensorCategory, TensorMultiCategory)

    from fastft.data.transforms import CachedDL, LabelsOf, RGBImage, WeightedCachedDL, image_of, label_of
    from fastft.fastai_internals import set_workers

    items = {part: [list(pair) for pair in split.items(part)] for part in split.parts}
    train, test, valid = items["train"], items["test"], items.get("valid", [])
    item_tfms, batch_tfms = (plan or parse_aug(recipe.aug)).transforms(recipe.size, recipe.crop_pct)
    bs = min(recipe.bs, len(train))  # fastai drops the last partial batch: a bigger bs would train on nothing
    if bs < recipe.bs:
        print(f"note: batch size {recipe.bs} is more than the {len(train)} training images; using {bs}", file=sys.stderr)
    labels = MultiCategoryBlock(vocab=split.classes) if split.multi_label else CategoryBlock(vocab=split.classes)
    block = DataBlock(
        blocks=(ImageBlock(cls=RGBImage), labels),
        get_x=image_of, get_y=LabelsOf(split.delimiter) if split.multi_label else label_of,
        splitter=IndexSplitter(range(len(train), len(train) + len(test))),
        item_tfms=item_tfms,
        batch_tfms=[*batch_tfms, Normalize.from_stats(mean, std)],
    )
    cached = bool(split.pixels)  # batches come from memory: worker processes would only add copying
    counts = label_counts(split)
    sampling = {}
    if recipe.balance == "sampler":  # each label drawn about equally often (an image: its labels' mean weight)
        weights = [sum(1 / counts[label] for label in split.labels_of(key)) / len(split.labels_of(key)) for _, key in train]
        sampling = {"dl_type": WeightedCachedDL, "dl_kwargs": [{"wgts": weights}, {}]}
    dls = block.dataloaders(train + test, bs=bs, num_workers=0, device=device,
                            **{"dl_type": CachedDL, **sampling})
    if valid:  # fastai's way to more labelled items through the test split's (validation) pipeline
        dls.loaders.append(dls.test_dl(valid, with_labels=True))  # at VALIDATION
    if not cached:  # cached: batches come from memory, workers would only add copying
        for dl in dls.loaders:
            set_workers(dl, worker_count(recipe.workers, device, len(dl), processes))
    if cached:
        for dl, part in zip(dls.loaders, split.parts):
            targets = training_targets(split, [key for _, key in items[part]])
            labels = TensorMultiCategory(targets) if split.multi_label else TensorCategory(targets)
            dl.serve_decoded(*on_device(split.pixels[part], labels, device))
    return dls


def training_targets(split: Split, keys: list[str]):
    """Class indices (N,), or for multi-label data 0/1 per label (N, C), of images with these label keys."""
    import torch

    if not split.multi_label:
        return torch.tensor([split.classes.index(key) for key in keys])
    targets = torch.zeros(len(keys), len(split.classes))
    for row, key in enumerate(keys):
        targets[row, [split.classes.index(label) for label in split.labels_of(key)]] = 1.0
    return targets


VALIDATION = 2  # dls.loaders: the training split, the test split (fastai's "valid"), then the validation split


def validation_loader(dls):
    """The validation split's DataLoader (apart from the test split: valid/ or --holdout), or None."""
    return dls.loaders[VALIDATION] if len(dls.loaders) > VALIDATION else None


GPU_SHARE = 0.5  # of the GPU's free memory the decoded pictures may take; the model needs the rest


def on_device(pixels, labels, device) -> tuple:
    """(pictures, labels) on the training GPU when they fit in GPU_SHARE of its free memory (all of CIFAR-10 at
    40 px is 288 MB): each batch is then indexed and augmented there, with no host-to-device copy; elsewhere,
    and on the CPU, as they are."""
    import torch

    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if pixels.numel() * pixels.element_size() <= GPU_SHARE * free:
            return pixels.to(device), labels.to(device)
    return pixels, labels
