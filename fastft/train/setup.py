"""Setting a run up: `prepare` checks everything and builds the RunContext (what the run knows) and the Learner.

Every user error surfaces here, before the run folder is created, so a failed start leaves nothing behind. The
backbone (when the run chooses one) and the training images --exclude-suspects leaves out are decided here, on the
training images alone.
"""
from __future__ import annotations

import contextlib
import os

import sys
from pathlib import Path
from typing import NamedTuple

import torch
from fastai.callback.progress import ProgressCallback
from fastai.vision.all import noop, set_seed

from fastft.atomic import write_text
from fastft.data.augment import parse_aug
from fastft.data.download import downloaded, fetch_dataset
from fastft.data.folders import check_data_folder
from fastft.data.inspect import leakage_warning
from fastft.data.loaders import build_dataloaders, imbalance_note, label_counts, load_split, training_targets
from fastft.errors import InterruptedBeforeTraining, UsageError
from fastft.recipe import Recipe, asked_differences, selecting
from fastft.run_folder import RunFolder, check_new_out, claim_run_folder
from fastft.schedules import AUTO, LINEAR_PROBE, STRATEGIES
from fastft.train import backbone_choice
from fastft.train.budget import Budget, seconds_of
from fastft.train.context import Resolved, RunContext
from fastft.train.devices import resolve_device, resolve_precision, set_number_format
from fastft.train.distributed import Distributed
from fastft.train.model import (NO_HUB_WEIGHTS, StartingWeights, check_arch, create_learner, head_config,
                                normalization, require_hub_weights, starting_weights)


class Prepared(NamedTuple):
    """A run ready to train: what it knows, and its Learner."""
    context: RunContext
    learn: object
    selection: object = None  # backbone_choice.Selection, when the run chose its backbone


def prepare(recipe: Recipe, out: str | None, resuming: bool = False, carve=None,
            budget: Budget | None = None, claimed: bool = False, check_labels_too: bool = False,
            forecast=None) -> Prepared:
    """Check the recipe, find the data, build DataLoaders and Learner. Every user error surfaces here,
    before the run folder is created, so a failed start leaves nothing behind. `resuming`: `out` is the
    stopped run's own folder; `claimed`: `out` is claimed for this run already (fastft/train/pipeline.py); `carve(split)`: a change to the split before any image is read (--strategy auto's
    trial, fastft/train/pipeline.py); `budget`: a deadline already running, which the backbone choice and then the
    run's epochs end by (the same trial). Without one, --budget bounds the backbone choice alone, from here.
    `check_labels_too`: the backbone was chosen for this run elsewhere (its trial): check the labels with it here, as a
    run that chose it itself would have (label_issues.csv; its features cached for the probe). `forecast`: the
    command's estimate (fastft/train/estimate.py), which this run times (the trial's, on rank 0)."""
    device = resolve_device(recipe.device)
    precision = resolve_precision(recipe.precision, device)
    epochs_budget = budget
    # started first, so that a malformed one fails before any work
    budget = budget if budget is not None else Budget.start(recipe.budget)
    found = checked_before_work(recipe, None if resuming else out)  # the backbones to choose among, when it chooses
    if recipe.strategy == LINEAR_PROBE:  # one pass, whatever --epochs says: recipe.toml and the epoch lines say 1
        recipe = recipe.replace(epochs=1)
    plan = parse_aug(recipe.aug)
    dist = Distributed(device)
    device = dist.device
    if dist.size > 1 and recipe.lr == "auto":
        raise UsageError("--lr auto runs in one process; run `fastft lr-find` first and pass its --lr")
    if STRATEGIES[recipe.strategy].random_init:  # by definition, e.g. `compare --strategy fine-tune,scratch`
        if recipe.weights:
            print(f"note: --strategy {recipe.strategy} starts from random weights; not loading {recipe.weights}",
                  file=sys.stderr)
        start = StartingWeights("none")
    elif not found:
        start = starting_weights(recipe)
    else:  # chosen below, once the training images are known
        start = None
    if start and not recipe.data:  # with --data, checked_before_work has checked the weights
        # before the data: offline, both are missing, and the first message should name both
        dataset = recipe.dataset or recipe.name
        data_too = ("" if downloaded(dataset)
                    else f", and --data DIR (a local copy of {dataset}: it is not downloaded yet either)")
        require_hub_weights(recipe.arch, start, NO_HUB_WEIGHTS.format(arch=recipe.arch) + data_too)
    if recipe.data:
        root = Path(recipe.data).expanduser()
    else:  # rank 0 downloads while the others wait
        root = dist.main_first(lambda: fetch_dataset(recipe.dataset or recipe.name, recipe.data_url, recipe.data_sha1))

    set_seed(recipe.seed, reproducible=True)
    split = load_split(root, recipe, plan, quiet=not dist.is_main, carve=carve)
    asked = recipe
    split, recipe, start, selection, label_check = choose_on_training_images(split, recipe, found, start, device, dist,
                                                                             budget, forecast)
    if check_labels_too and label_check is None and not resuming:
        from fastft.train.label_issues import check_labels

        with interrupted_before_training("checking the labels with the chosen backbone", recipe.cache):
            label_check = dist.from_main(lambda: unless_cleanlab_is_missing(
                lambda: check_labels(split, recipe, start, device)))
    counts = label_counts(split)
    if dist.is_main:
        for note in (imbalance_note(counts, recipe.balance), leakage_warning(split)):
            if note:
                print(note, file=sys.stderr)
    has_validation = bool(split.valid)
    keep = resolve_keep(recipe, has_validation, quiet=not dist.is_main)
    mean, std = normalization(recipe.arch)
    dls = build_dataloaders(split, recipe, mean, std, device, plan, processes=dist.size)
    head = head_config(recipe.strategy, recipe.head_dropout)
    learn, loaded = create_learner(dls, recipe, start, head=head, class_counts=counts, multi_label=split.multi_label)
    set_number_format(learn, precision, recipe.channels_last, device)
    learn.add_cbs(batch_mixing(recipe))
    learn.logger = noop  # EpochLog prints each epoch's figures, the same as history.csv's
    learn.remove_cb(ProgressCallback)  # fastft's RunProgress draws the bars, counting the run's epochs
    if (epochs_budget is not None or forecast is not None) and not found:  # the trial, timed: its probe is first
        items = learn.dls.train_ds.items[::dist.size]  # each process passes over its shard
        # rank 0 times and decides on its clock, every rank gets its verdict: ranks reading clocks of their own could
        # disagree at the edge, one stopping while the others wait for it
        dist.from_main(lambda: time_the_trial(learn, items, recipe, precision, epochs_budget, forecast))
    if dist.size > 1:
        from fastft.train.sharding import DistributedTraining  # fastai.distributed and accelerate: many processes only

        learn.add_cb(DistributedTraining(dist))
        torch.manual_seed(recipe.seed + dist.rank)  # same initial weights, different augmentation per rank
    # rank 0 creates and claims a new folder, last, so that a failed start leaves nothing behind
    folder = RunFolder(Path(out) if resuming or claimed else dist.from_main(lambda: claim_run_folder(out, recipe.name)))
    if dist.is_main:
        if split.skipped:
            write_text(folder.skipped, "".join(f"{p}\t{why}\n" for p, why in split.skipped))
        # the images its test figures are measured on, which `fastft evaluate RUN` scores again
        write_text(folder.test_files, "".join(f"{os.path.abspath(p)}\t{chr(9).join(split.labels_of(key))}\n"
                                              for p, key in split.items("test")))
        if label_check is not None:
            from fastft.train.label_issues import write_report

            write_report(label_check, folder.label_issues, folder.suspects)
        if selection is not None:
            backbone_choice.write_report(selection, folder.selection, folder.selection_chart)
    resolved = Resolved(data=str(root.resolve()), precision=precision, keep=keep, lr=recipe.lr or
                        STRATEGIES[recipe.strategy].default_lr, pretrained=start.kind != "none" and recipe.pretrained,
                        weights=absolute(recipe.weights) if start.kind != "none" else "", labels=absolute(recipe.labels))
    context = RunContext(recipe=recipe, resolved=resolved, folder=folder, device=device, dist=dist,
                         classes=tuple(split.classes), class_counts=counts, multi_label=split.multi_label,
                         has_validation=has_validation, holdout=split.holdout, head=head, starting_weights=loaded,
                         mean=mean, std=std, skipped=tuple(split.skipped),
                         excluded=tuple(label_check.suspects[:recipe.exclude_suspects]) if label_check else (),
                         validation_is_test=bool(split.valid) and split.valid == split.test, budget=epochs_budget,
                         asked=asked_differences(asked, recipe),
                         train_targets=training_targets(split, [key for _, key in split.items("train")]))
    return Prepared(context, learn, selection)


def time_the_trial(learn, items: list, recipe: Recipe, precision: str, budget: Budget | None, forecast) -> None:
    """This machine's speeds on one batch of the trial's training `items`, in the run's `precision`: the whole
    command's estimate said (`forecast`), and a `budget` too small for the trial's probe, its first signal, an error."""
    from fastft.train.estimate import measure
    from fastft.train.features import features_cached

    speeds = measure(learn, items, precision)
    cached = features_cached(learn, learn.dls.train_ds.items, recipe)
    if budget is not None and not cached:
        budget.check_room_for_first_pass(speeds.features * len(items), f"the trial's probe ({recipe.arch}'s pass over "
                                                                       f"its {len(learn.dls.train_ds.items)} training images)")
    if forecast is not None:
        forecast.timed(speeds, features_cached=cached, trial_set_up=False)  # timed on the trial's Learner


def checked_before_work(recipe: Recipe, out: str | None) -> list:
    """What can be checked before any work, and before any plan is printed (--strategy auto's too): the rules
    between the recipe's keys, the architecture (every candidate's, with its weights, when the run chooses one), a
    new `out` (None: a resumed run's own folder), the data folder, and the ImageNet weights where the hub must have
    them. Returns the candidates ([] when the run does not choose its backbone)."""
    recipe.check()  # the rules between its keys (a recipe built in code may not have met them yet)
    seconds_of(recipe.budget)  # a malformed --budget, before what needs the disk or the hub
    found = []
    if selecting(recipe):
        found = backbone_choice.candidates(recipe)
        backbone_choice.check_candidates(recipe, found)
    else:
        check_arch(recipe.arch)
    if out is not None:
        check_new_out(out)
    if recipe.data and not recipe.labels:
        check_data_folder(Path(recipe.data).expanduser())  # a mistyped folder first: it needs no network to tell
    random_init = recipe.strategy != AUTO and STRATEGIES[recipe.strategy].random_init  # auto: the probe or lp-ft
    if not found and recipe.data and recipe.pretrained and not random_init:  # (no --data: prepare names the download too)
        require_hub_weights(recipe.arch, starting_weights(recipe), NO_HUB_WEIGHTS.format(arch=recipe.arch))
    return found


class Chosen(NamedTuple):
    """What the training images decided before training: the backbone, and the images to leave out."""
    split: object  # the Split, without --exclude-suspects' images
    recipe: Recipe  # naming the backbone chosen, when the run chose one
    start: StartingWeights
    selection: object  # backbone_choice.Selection, or None
    label_check: object  # label_issues.LabelCheck, or None


def choose_on_training_images(split, recipe: Recipe, found: list, start, device, dist,
                              budget: Budget | None, forecast=None) -> Chosen:
    """The backbone among `found` (when the run chooses one, within `budget`), then the training images
    --exclude-suspects leaves out; rank 0 decides and every rank gets its decision. The test split is not read."""
    selection = label_check = None
    if found:
        with interrupted_before_training("choosing the backbone", recipe.cache):
            selection = dist.from_main(lambda: backbone_choice.choose(split, recipe, found, device, budget,
                                                                      forecast=forecast))
            label_check = dist.from_main(lambda: free_label_check(split, selection))
        # recipe.toml names the backbone chosen: `fastft run` on it trains that one (selection.csv keeps the rest)
        recipe = recipe.replace(arch=selection.chosen.arch, weights=selection.chosen.weights, select=False, budget="")
        start = starting_weights(recipe)
        if dist.is_main:
            print(backbone_choice.describe(selection), flush=True)
            if forecast is not None:
                forecast.ended("backbone")
    if recipe.exclude_suspects:
        from fastft.train.label_issues import check_labels, without_suspects

        if label_check is None:
            with interrupted_before_training("checking the labels (--exclude-suspects)", recipe.cache):
                label_check = dist.from_main(lambda: check_labels(split, recipe, start, device))
        split = without_suspects(split, label_check.suspects[:recipe.exclude_suspects])
    if found or recipe.exclude_suspects:
        set_seed(recipe.seed, reproducible=True)  # the run draws what it would without the checks
    return Chosen(split, recipe, start, selection, label_check)


def batch_mixing(recipe: Recipe) -> list:
    """fastai's MixUp or CutMix callback, when the recipe asks for one (they act on training batches only)."""
    from fastai.callback.mixup import CutMix, MixUp

    return [MixUp(recipe.mixup)] if recipe.mixup else [CutMix(recipe.cutmix)] if recipe.cutmix else []


@contextlib.contextmanager
def interrupted_before_training(doing: str, cached: bool):
    """Ctrl-C while `doing` (a pass of frozen backbones over the training images) is one line saying what was kept."""
    try:
        yield
    except KeyboardInterrupt:
        kept = (" the frozen features of each backbone that finished its pass are cached, so starting again skips that "
                "pass" if cached else " nothing (--no-cache)")
        raise InterruptedBeforeTraining(f"interrupted while {doing}, before anything trained; kept:{kept}; start the "
                                        "command again") from None


def unless_cleanlab_is_missing(check):
    """`check()`, a label check, or None without cleanlab (an optional extra): a check nobody asked for."""
    from fastft.train import label_issues

    try:
        label_issues.require_cleanlab()
    except UsageError:
        return None
    return check()


def free_label_check(split, selection):
    """The label check from the chosen backbone's out-of-fold predictions, which the choice computed anyway; None
    without cleanlab."""
    from fastft.train import label_issues

    items = [[p, key] for p, key in split.items("train")]
    return unless_cleanlab_is_missing(lambda: label_issues.label_check_of(split, items, selection.probabilities,
                                                                          selection.labels, selection.folds, []))


def absolute(path: str) -> str:
    """A path from the recipe or the command line, absolute (the saved recipe runs from any folder); "" stays "".
    """
    return str(Path(path).expanduser().resolve()) if path else ""


NO_VALIDATION = (" (no validation split apart from the test split, and picking an epoch on the test split would "
                 "overstate its accuracy; --holdout 0.1 carves one from the training images)")


def resolve_keep(recipe: Recipe, has_validation: bool, quiet: bool) -> str:
    """--keep auto: best when the run has a validation split apart from the test split, else last. Picking an
    epoch (or stopping early) on the test split itself is allowed when asked for, and said to be optimistic."""
    keep = recipe.keep if recipe.keep != "auto" else ("best" if has_validation else "last")
    if not has_validation and (keep == "best" or recipe.patience) and not quiet:
        print("warning: this run has no validation split apart from its test split, so --keep best / --patience "
              "watch the test split: the test accuracy it reports is optimistic (--holdout 0.1 carves a validation "
              "split from the training images)", file=sys.stderr)
    return keep
