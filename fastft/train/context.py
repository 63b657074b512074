"""What a run knows, in one typed object: `RunContext`, built once by `prepare` (fastft/train/run.py) before any
training starts, and passed to whatever needs it. Nothing about a run is hung on fastai's objects: a reader sees in
a signature what a function needs.

The recipe stays what the user asked for; the values the run settled on where the recipe left a choice ("auto",
0 for the strategy's default, a download, a strategy that starts from random weights) are in `Resolved`, and
`saved_recipe()` puts the two together for recipe.toml, which reproduces the run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fastft.recipe import Recipe
from fastft.run_folder import RunFolder
from fastft.train.budget import Budget
from fastft.train.distributed import Distributed


@dataclass(frozen=True)
class Resolved:
    """The values a run settled on where its recipe left a choice."""
    data: str  # the data folder, absolute (downloaded when the recipe named none)
    precision: str  # fp32, bf16 or fp16 (recipe: auto)
    keep: str  # best or last (recipe: auto)
    lr: float | str  # the head's peak rate (recipe: 0, the strategy's default); "auto" until the LR finder has run
    pretrained: bool  # False for a strategy that starts from random weights
    weights: str  # absolute, so that recipe.toml reproduces from any folder; "" for such a strategy
    labels: str  # the labels CSV, absolute; "" for class folders


@dataclass(frozen=True)
class RunContext:
    """Everything a run knows about itself once its data and model are set up."""
    recipe: Recipe  # as the user asked for it (recipe file + command line)
    resolved: Resolved
    folder: RunFolder
    device: torch.device
    dist: Distributed
    classes: tuple[str, ...]
    class_counts: dict[str, int]  # training images per class (multi-label: per label)
    multi_label: bool  # a sigmoid per label (several labels per image) instead of a softmax over classes
    has_validation: bool  # a validation split apart from the test split (valid/ or --holdout)
    # the share of each class's training images held out as it: --holdout, or what `auto` came to. recipe.toml keeps
    # `auto`, which comes to the same share on the same files, and holds out only from classes large enough to spare
    # images (a number given instead would make a small class an error)
    holdout: float
    head: dict  # the classifier head's configuration (fastft/deploy/network.py), saved in the bundle
    starting_weights: str  # what the weights were loaded from, in words
    mean: tuple[float, float, float]  # the input normalisation the backbone expects
    std: tuple[float, float, float]
    skipped: tuple[tuple, ...] = ()  # (file, reason) for each image that did not decode
    excluded: tuple = ()  # the training images --exclude-suspects left out (label_issues.Suspect)
    # its validation split is its test split, the same images (--strategy auto's trial, fastft/train/pipeline.py: both
    # a fold held out from the training images): measured once an epoch, and no temperature is fitted on them
    validation_is_test: bool = False
    # a deadline its epochs end by (--budget, in that trial); None: none
    budget: Budget | None = None
    # what the command asked where this run chose its backbone (--arch a,b,c): recipe.toml's [asked] table
    asked: dict = dataclasses.field(default_factory=dict)
    # the training images' targets in the training loader's item order (class indices; multi-label 0/1 per label):
    # the probe reads the features of those images from the cache (fastft/train/probe.py) and needs their labels
    train_targets: torch.Tensor | None = None

    def saved_recipe(self) -> Recipe:
        """The recipe with every resolved value in place: recipe.toml, which `fastft run` reproduces."""
        return dataclasses.replace(self.recipe, **dataclasses.asdict(self.resolved))

    def with_lr(self, lr: float) -> "RunContext":
        """This context once the learning rate is known (the LR finder runs on the prepared Learner)."""
        return dataclasses.replace(self, resolved=dataclasses.replace(self.resolved, lr=lr))
