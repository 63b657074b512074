"""Train one recipe: data -> learner -> schedule -> outputs in the run folder (fastft/run_folder.py lists them).

`prepare` checks everything and builds the RunContext (what the run knows) and the Learner; `train` then resolves
the learning rate, fits the strategy's phases under Ctrl-C (`fit_under_interruption`), scores the kept model and
writes the final report (`final_report`), and saves the model (`save_model`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

import torch
from fastai.callback.progress import ProgressCallback
from fastai.vision.all import Callback, noop, set_seed

from fastft.atomic import remove_partial_files, replacing, save_figure, subplots, write_text
from fastft.data.augment import parse_aug
from fastft.data.download import downloaded, fetch_dataset
from fastft.data.images import large_images_allowed
from fastft.data.inspect import leakage_warning
from fastft.data.folders import check_data_folder
from fastft.data.loaders import build_dataloaders, imbalance_note, label_counts, load_split, validation_loader
from fastft.deploy.bundle import activation, mirror_averaged, probabilities_of, write_bundle
from fastft.errors import Interrupted, UsageError
from fastft.fastai_internals import finder_saves_under, release_last_batch
from fastft.recipe import Recipe
from fastft.run_folder import RunFolder, check_new_out, claim_run_folder
from fastft.train.context import Resolved, RunContext
from fastft.train.devices import resolve_device, resolve_precision, set_number_format, training_only_callbacks
from fastft.train.distributed import Distributed, world_size
from fastft.train.model import (NO_HUB_WEIGHTS, StartingWeights, check_arch, create_learner, head_config,
                                hub_weights_problem, normalization, starting_weights)
from fastft.train import checkpoint
from fastft.train.epochs import EpochLog, RunProgress, unwrapped
from fastft.train.report import summary_line, write_reports
from fastft.train import backbone_choice, ema, strategy_choice, wise
from fastft.train.budget import Budget, pass_seconds
from fastft.schedules import STRATEGIES, Phase, describe_plan
from fastft.train import strategies
from fastft.train.strategies import Progress


class Prepared(NamedTuple):
    """A run ready to train: what it knows, and its Learner."""
    context: RunContext
    learn: object


def prepare(recipe: Recipe, out: str | None, resuming: bool = False, trial: bool = False) -> Prepared:
    """Check the recipe, find the data, build DataLoaders and Learner. Every user error surfaces here,
    before the run folder is created, so a failed start leaves nothing behind. `resuming`: `out` is the
    stopped run's own folder; `trial`: --strategy auto's trial run (fastft/train/strategy_choice.py)."""
    device = resolve_device(recipe.device)
    precision = resolve_precision(recipe.precision, device)
    # --budget bounds the whole choice, on one clock from here: the backbone's (below), then a trial's epochs.
    # Started first, so that a malformed one fails before any work
    budget = Budget.start(recipe.budget)
    found = []  # the backbones to choose among, when the run chooses
    if backbone_choice.selecting(recipe):
        if STRATEGIES[recipe.strategy].random_init:
            raise UsageError(f"--strategy {recipe.strategy} starts from random weights, so there is no backbone to "
                             "choose; drop --select and the --arch list")
        if not recipe.pretrained:
            raise UsageError("choosing a backbone compares pretrained weights; drop --no-pretrained (or --select and "
                             "the --arch list)")
        found = backbone_choice.candidates(recipe)
        backbone_choice.check_candidates(recipe, found)
    else:
        check_arch(recipe.arch)
        if recipe.budget and not trial:
            raise UsageError("--budget bounds choosing: a backbone (--arch a,b,c or auto) and the strategy (--strategy "
                             "auto's trial run), and this run chooses neither; give one of them, or drop --budget")
    if not resuming:
        check_new_out(out)
    plan = parse_aug(recipe.aug)
    dist = Distributed(device)
    device = dist.device
    wise.check(recipe)
    if recipe.ema and recipe.strategy == "probe":
        raise UsageError("--ema averages the weights over the training steps, and --strategy probe fits its head in "
                         "one solve, with none; drop --ema or choose a strategy that fine-tunes")
    if recipe.mixup and recipe.cutmix:
        raise UsageError("--mixup and --cutmix each replace the training loss; choose one")
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
    if recipe.data and not recipe.labels:
        check_data_folder(Path(recipe.data).expanduser())  # a mistyped folder first: it needs no network to tell
    if start and start.kind == "hub" and (problem := hub_weights_problem(recipe.arch)):
        # before the data: offline, both are missing, and the first message should name both
        dataset = recipe.dataset or recipe.name
        data_too = ("" if recipe.data or downloaded(dataset)
                    else f", and --data DIR (a local copy of {dataset}: it is not downloaded yet either)")
        raise UsageError(f"{problem}; {NO_HUB_WEIGHTS.format(arch=recipe.arch)}{data_too}")
    if recipe.data:
        root = Path(recipe.data).expanduser()
    else:  # rank 0 downloads while the others wait
        root = dist.main_first(lambda: fetch_dataset(recipe.dataset or recipe.name, recipe.data_url, recipe.data_sha1))

    set_seed(recipe.seed, reproducible=True)
    split = load_split(root, recipe, plan, quiet=not dist.is_main, trial=trial)
    split, recipe, start, selection, label_check = choose_on_training_images(split, recipe, found, start, device, dist,
                                                                             budget)
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
    if trial and budget is not None and not found:  # the trial's probe epoch is the first signal: room for it?
        items = learn.dls.train_ds.items[::dist.size]  # each process passes over its shard
        what = f"the trial's probe ({recipe.arch}'s pass over its {len(learn.dls.train_ds.items)} training images)"
        # rank 0 times and decides on its clock, every rank gets its verdict: ranks reading clocks of their own could
        # disagree at the edge, one stopping while the others wait for it
        dist.from_main(lambda: budget.check_room_for_first_pass(pass_seconds(learn, items), what))
    if dist.size > 1:
        from fastft.train.sharding import DistributedTraining  # fastai.distributed and accelerate: many processes only

        learn.add_cb(DistributedTraining(dist))
        torch.manual_seed(recipe.seed + dist.rank)  # same initial weights, different augmentation per rank
    # rank 0 creates and claims a new folder, last, so that a failed start leaves nothing behind
    folder = RunFolder(Path(out) if resuming else dist.from_main(lambda: claim_run_folder(out, recipe.name)))
    if dist.is_main:
        if split.skipped:
            write_text(folder.skipped, "".join(f"{p}\t{why}\n" for p, why in split.skipped))
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
                         trial=trial, budget=budget if trial else None)
    return Prepared(context, learn)


class Chosen(NamedTuple):
    """What the training images decided before training: the backbone, and the images to leave out."""
    split: object  # the Split, without --exclude-suspects' images
    recipe: Recipe  # naming the backbone chosen, when the run chose one
    start: StartingWeights
    selection: object  # backbone_choice.Selection, or None
    label_check: object  # label_issues.LabelCheck, or None


def choose_on_training_images(split, recipe: Recipe, found: list, start, device, dist,
                              budget: Budget | None) -> Chosen:
    """The backbone among `found` (when the run chooses one, within `budget`), then the training images
    --exclude-suspects leaves out; rank 0 decides and every rank gets its decision. The test split is not read."""
    selection = label_check = None
    if found:
        selection = dist.from_main(lambda: backbone_choice.choose(split, recipe, found, device, budget))
        # recipe.toml names the backbone chosen: `fastft run` on it trains that one (selection.csv keeps the rest)
        recipe = recipe.replace(arch=selection.chosen.arch, weights=selection.chosen.weights, select=False, budget="")
        start = starting_weights(recipe)
        label_check = dist.from_main(lambda: free_label_check(split, selection))
        if dist.is_main:
            print(backbone_choice.describe(selection), flush=True)
    if recipe.exclude_suspects:
        from fastft.train.label_issues import check_labels, without_suspects

        if label_check is None:
            label_check = dist.from_main(lambda: check_labels(split, recipe, start, device))
        split = without_suspects(split, label_check.suspects[:recipe.exclude_suspects])
    if found or recipe.exclude_suspects:
        set_seed(recipe.seed, reproducible=True)  # the run draws what it would without the checks
    return Chosen(split, recipe, start, selection, label_check)


def batch_mixing(recipe: Recipe) -> list:
    """fastai's MixUp or CutMix callback, when the recipe asks for one (they act on training batches only)."""
    from fastai.callback.mixup import CutMix, MixUp

    return [MixUp(recipe.mixup)] if recipe.mixup else [CutMix(recipe.cutmix)] if recipe.cutmix else []


def free_label_check(split, selection):
    """The label check from the chosen backbone's out-of-fold predictions, which the choice computed anyway; None
    without cleanlab (an optional extra)."""
    from fastft.train import label_issues

    try:
        label_issues.require_cleanlab()
    except UsageError:
        return None
    items = [[p, key] for p, key in split.items("train")]
    return label_issues.label_check_of(split, items, selection.probabilities, selection.labels, selection.folds, [])


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


def schedule(learn, context: RunContext) -> list[Phase]:
    """The recipe's strategy's phases for this Learner, with the head's peak rate the run resolved."""
    return STRATEGIES[context.recipe.strategy].plan(learn, context.resolved.lr, context.recipe)


class LrFindLog(Callback):
    """A line every tenth of the LR finder's steps: a log shows it working (a terminal also gets the bar)."""

    def __init__(self, steps: int):
        self.steps, self.done = steps, 0

    def after_batch(self):
        if self.training:
            self.done += 1
            if self.done % max(1, self.steps // 10) == 0 or self.done == self.steps:
                print(f"lr-find: step {self.done}/{self.steps}, lr {self.opt.hypers[-1]['lr']:.1e}, "
                      f"loss {self.smooth_loss.item():.3f}", flush=True)


LR_FIND_STEPS = 100  # fastai's: on a small set the finder loops over the data as often as it takes (20 steps, the
# old bound for small sets, drew a curve of noise with the suggestion on a hump)


def find_lr(learn, context: RunContext) -> float:
    """fastai's LR finder on the groups the strategy's first phase trains, over LR_FIND_STEPS batches (looping over a
    small set); saves lr_find.png."""
    recipe, folder = context.recipe, context.folder
    strategy = STRATEGIES[recipe.strategy]
    # which groups the first phase trains, in a run of at least 2 epochs: a head-only phase, where the strategy has one
    first = strategy.plan(learn, 1.0, recipe, epochs=max(recipe.epochs, 2))[0]
    learn.freeze_to(-first.trains) if first.trains else learn.unfreeze()
    steps = LR_FIND_STEPS
    print(f"lr-find: up to {steps} steps from lr 1e-7 to 10, training {first.describe_groups()}", flush=True)
    progress = LrFindLog(steps)
    learn.add_cb(progress)
    try:  # every step (stop_div off): bounded by the data they cost little, and on small noisy batches fastai's
        # divergence check (loss > 4x its best) stops the finder after a handful of steps, with no curve to read
        with finder_saves_under(learn, folder.path.resolve()):
            suggestion = learn.lr_find(num_it=steps, stop_div=False, show_plot=False)
    except (IndexError, ValueError):  # fastai's suggestion needs a loss curve with a valley
        raise UsageError(f"the LR finder found no rate where the loss falls in {steps} steps; pass --lr yourself") from None
    finally:
        learn.remove_cb(progress)
    plot_lr_find(learn.recorder.lrs, learn.recorder.losses, float(suggestion.valley), folder.lr_find,
                 f"{recipe.name}, {recipe.strategy}")
    return float(suggestion.valley)


def plot_lr_find(lrs, losses, suggestion: float, path: Path, title: str) -> None:
    """The finder's loss against the rate (log scale, fastai's smoothed loss), the suggestion marked."""
    lrs, losses = np.array([float(lr) for lr in lrs]), np.array([float(loss) for loss in losses])
    fig, ax = subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="tab:red", ls="--", label=f"suggested lr {suggestion:.2e}")
    at = int(np.abs(np.log(lrs) - np.log(suggestion)).argmin())  # the suggestion's point on the curve
    ax.plot(lrs[at], losses[at], "o", color="tab:red", ms=8)
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)", title=title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def resolve_lr(learn, context: RunContext) -> RunContext:
    """--lr auto: the LR finder's suggestion (the strategy's default and a given rate are resolved by prepare)."""
    if context.resolved.lr != "auto":
        return context
    lr = find_lr(learn, context)
    print(f"lr finder suggests {lr:.2e} (plot: {context.folder.lr_find})")
    return context.with_lr(lr)


def unaugmented_train_accuracy(learn) -> float:
    """Accuracy on the training images with the test transforms: next to test accuracy, this is what
    shows overfitting (d2l's train acc is measured on augmented batches, mid-epoch)."""
    dl = learn.dls.test_dl(learn.dls.train_ds.items, with_labels=True)
    with learn.no_bar(), learn.no_logging():
        return float(learn.validate(dl=dl)[1])


class Predictions(NamedTuple):
    """A model's predictions over one split, as its bundle makes them (float32, whatever precision trained it)."""
    logits: np.ndarray  # (N, C), before any temperature
    probabilities: np.ndarray  # (N, C), with the temperature given
    with_tta: np.ndarray | None  # the same averaged with the mirror images' (flip TTA), when the recipe asks for it
    targets: np.ndarray


def split_predictions(learn, dl, context: RunContext, temperature=None) -> Predictions:
    """The model's predictions over one split: logits, and probabilities with `temperature` (None: uncalibrated),
    plain and, when the recipe's tta asks for it, averaged with each image's mirror image (`fastft predict --tta`)."""

    network = unwrapped(learn.model).eval()
    probabilities = probabilities_of(network, context.multi_label, temperature)
    logits, plain, averaged, targets = [], [], [], []
    with torch.inference_mode():
        for xb, yb in dl:
            z = network(xb)
            p = activation(z, context.multi_label, temperature)
            logits.append(z.float().cpu())
            plain.append(p.float().cpu())
            if context.recipe.tta:
                averaged.append(mirror_averaged(probabilities, xb, plain=p).float().cpu())
            targets.append(yb.cpu())
    if not targets:
        empty = np.zeros((0, len(context.classes)), np.float32)
        return Predictions(empty, empty, empty if context.recipe.tta else None, np.zeros(0))
    return Predictions(torch.cat(logits).numpy(), torch.cat(plain).numpy(),
                       torch.cat(averaged).numpy() if averaged else None, torch.cat(targets).numpy())


def calibrate(learn, context: RunContext) -> dict:
    """Fit a temperature (deploy/calibration.py) on the validation split's predictions, kept where it beats its
    noise; the test split's ECE, NLL and Brier score before and after (and with the fitted temperature, where it was
    not kept), and reliability.png. A run without a validation split of at least calibration.MIN_HELD_OUT images
    stays uncalibrated, and says so: the test split is never used to fit anything."""
    from fastft.deploy import calibration

    validation = validation_loader(learn.dls)
    held_out = len(validation.dataset) if validation is not None else 0
    if held_out < calibration.MIN_HELD_OUT:
        why = (f"its validation split has only {held_out} images (at least {calibration.MIN_HELD_OUT} are needed)"
               if held_out else "it has no validation split apart from the test split "
                                f"({no_holdout_why(context, len(learn.dls.train_ds))})")
        print(f"note: the model's probabilities are not calibrated: {why}", file=sys.stderr)
        return {"calibrated": False, "why": why}
    fitted_on = split_predictions(learn, validation, context)
    temperature = calibration.choose_temperature(fitted_on.logits, fitted_on.targets, context.multi_label)
    test = split_predictions(learn, learn.dls.valid, context)
    before = calibration.scaled(test.logits, 1.0, context.multi_label)
    after = calibration.scaled(test.logits, temperature.value, context.multi_label)
    calibration.reliability_diagram(before, after, test.targets, context.multi_label, context.folder.reliability,
                                    f"{context.recipe.name}: the test split ({len(test.targets)} images)")
    figures = {"before": calibration.figures(before, test.targets, context.multi_label),
               "after": calibration.figures(after, test.targets, context.multi_label)}
    if temperature.kept_at_one:  # what the fitted temperature would have done, for the record: it was not used
        figures["if_fitted"] = calibration.figures(calibration.scaled(test.logits, temperature.fitted,
                                                                      context.multi_label), test.targets, context.multi_label)
    return {"calibrated": True, "temperature": temperature.value, "fitted_temperature": temperature.fitted,
            "validation_nll_saved": temperature.gain, "validation_nll_noise": temperature.noise,
            "fitted_on": validation_words(context, held_out), "test": figures}


def validation_words(context: RunContext, images: int) -> str:
    """What the validation split is, in words: the data's own, or held out from the training images."""
    if not context.holdout:
        return f"the validation split ({images} images)"
    how = "auto: " if context.recipe.holdout == "auto" else ""
    return f"{images} training images held out as a validation split (--holdout {how}{context.holdout:.0%} of each class)"


def no_holdout_why(context: RunContext, training_images: int) -> str:
    """Why a run has no validation split, and how to give it one."""
    if context.recipe.holdout == "auto":
        from fastft.data.split import AUTO_HOLDOUT, MIN_HELD_OUT

        return (f"--holdout auto holds out {AUTO_HOLDOUT:.0%} of the training images from "
                f"{round(MIN_HELD_OUT / AUTO_HOLDOUT)} up, and this run trains on {training_images}; --holdout 0.2 "
                "holds out a larger share")
    return "--holdout auto sets a tenth of the training images aside for it, from 500 up"


def final_scores(learn, context: RunContext, temperature=None) -> tuple[dict, dict | None]:
    """The kept model's scores on the test split as its bundle gives them (deploy/scores.py): accuracy, balanced
    accuracy and macro F1; a multi-label run's at the threshold with the best micro F1 on the validation split (0.5
    without one), chosen on calibrated probabilities, with mAP. Returns (scores, the same with flip TTA when the
    recipe asks for it, else None)."""
    from fastft.deploy import scores

    classes = list(context.classes)
    test = split_predictions(learn, learn.dls.valid, context, temperature)
    if not context.multi_label:
        score = lambda probs: scores.single_label(probs, test.targets.astype(int), classes)
    else:
        threshold = 0.5
        if (validation := validation_loader(learn.dls)) is not None:
            held_out = split_predictions(learn, validation, context, temperature)
            threshold = scores.choose_threshold(held_out.probabilities if held_out.with_tta is None
                                                else held_out.with_tta, held_out.targets)
        score = lambda probs: scores.multi_label(probs, test.targets, classes, threshold)
    return score(test.probabilities), (score(test.with_tta) if test.with_tta is not None else None)


@large_images_allowed()
def train(recipe: Recipe, out: str | None = None, measure_unaugmented: bool = False, callbacks=(),
          resume: Path | None = None, trial: bool = False) -> dict:
    """Run `recipe`, or (`resume`) continue a stopped run from its checkpoint; returns metrics.json's content
    (empty on ranks other than 0). Raises Interrupted after saving on Ctrl-C. `measure_unaugmented` adds
    final.train_acc_unaugmented (one more pass over the training images); `callbacks` are extra fastai
    callbacks for the Learner; `trial`: --strategy auto's trial run, on the training images alone."""
    saved = choice = None
    if resume is not None:
        saved = checkpoint.load(resume)
        recipe = recipe_from_checkpoint(saved, resume) if saved else restart_recipe(resume)
        out = str(resume)
    elif strategy_choice.choosing(recipe):  # a trial run first, when the run has no validation split to choose on
        check_new_out(out)
        choice = strategy_choice.choose(recipe, lambda r, o: train(r, o, trial=True), resolve_device(recipe.device))
        recipe = choice.recipe
    context, learn = prepare(recipe, out, resuming=resume is not None, trial=trial)
    dist, folder = context.dist, context.folder
    if resume is not None and dist.is_main:
        remove_partial_files(folder.path)
    learn.add_cbs(callbacks)
    context = resolve_lr(learn, context)
    if dist.is_main and saved is None:
        write_text(folder.recipe, context.saved_recipe().to_toml())

    log = EpochLog(context, Progress(), averaging=ema.AveragedWeights(recipe.ema) if recipe.ema else None)
    if dist.is_main and sys.stdout.isatty():  # progress bars on rank 0's terminal; a log gets clean lines
        learn.add_cb(RunProgress(log))
    interrupted = fit_under_interruption(learn, context, log, saved)
    learn.remove_cbs([log, *([log.averaging] if log.averaging else []), *callbacks,
                      *learn.cbs.filter(lambda cb: isinstance(cb, RunProgress))])
    if not dist.is_main:
        dist.wait()
        return {}
    averaged = wise.apply(learn, context, log.probe_weights)  # before calibration: it calibrates these weights
    extra = {"wise": averaged} if averaged else {}
    if choice is not None:
        extra["strategy_choice"] = strategy_choice.report(choice, averaged, folder)
    results, threshold, interrupted = final_report(learn, context, log, interrupted, measure_unaugmented, extra)
    save_model(learn, context, threshold, results["calibration"].get("temperature"))
    dist.wait()
    if interrupted:
        raise Interrupted(f"interrupted: kept the outputs of epoch {log.kept_epoch} of {recipe.epochs} in {folder}; "
                          f"`fastft resume {folder}` continues it")
    checkpoint.remove(folder)  # finished: the bundle is the result, and nothing is left to resume
    kept = f" (kept epoch {log.kept_epoch} of {len(log.epochs)})" if log.kept_epoch != len(log.epochs) else ""
    print(summary_line(results["final"], str(context.device)) + kept)
    if (calibration := results["calibration"]).get("calibrated"):
        print(calibration_line(calibration, folder))
    return results


def calibration_line(calibration: dict, folder: RunFolder) -> str:
    """The run's last line about its probabilities: the temperature, what it was fitted on, and the test ECE."""
    def shown(t):
        return f"{t:.2f}" if isinstance(t, float) else f"{min(t):.2f}-{max(t):.2f}"
    before, after = calibration["test"]["before"]["ece"], calibration["test"]["after"]["ece"]
    applied, fitted, where = calibration["temperature"], calibration["fitted_temperature"], calibration["fitted_on"]
    kept = (f"temperature {shown(applied)} fitted on {where}" if applied == fitted else
            f"temperature {shown(applied)}, as the {shown(fitted)} fitted on {where} lowered their NLL by less than "
            f"its noise{' for some labels, which keep 1' if isinstance(applied, list) else ''}")
    return f"calibrated: {kept}; test ECE {before:.3f} -> {after:.3f} ({folder.reliability.name})"


def fit_under_interruption(learn, context: RunContext, log: EpochLog, saved: dict | None) -> bool:
    """Print the plan, fit the strategy's phases (from the checkpoint's next epoch when resuming) and leave the
    kept epoch's weights in the model. Returns whether Ctrl-C stopped it after an epoch had finished (before
    one had, it raises Interrupted)."""
    recipe, dist, folder = context.recipe, context.dist, context.folder
    phases = schedule(learn, context)
    learn.add_cbs([log, *([log.averaging] if log.averaging else [])])
    extra_logs = ([tensorboard_log(folder, log, context.mean, context.std)]
                  if recipe.log == "tensorboard" and dist.is_main else [])
    learn.add_cbs(extra_logs)
    start_epoch, restore = 0, None
    if saved is not None:
        start_epoch, restore = saved["epoch"], resumer(saved, log, dist)
    if dist.is_main:
        print_plan(learn, context, phases)
        if saved is not None:
            print(f"resuming after epoch {start_epoch} of {recipe.epochs} from {folder.checkpoint}", flush=True)
    interrupted = False
    try:
        if start_epoch < recipe.epochs:
            strategies.fit(STRATEGIES[recipe.strategy], learn, phases, context, log.progress, start_epoch=start_epoch,
                           restore=restore)
    except KeyboardInterrupt:
        interrupted = True
        if log.snapshot is None:
            raise Interrupted(f"interrupted before the first epoch finished; {folder} holds only recipe.toml") from None
    finally:
        for extra in extra_logs:
            extra.close()
        learn.remove_cbs(extra_logs)
    learn.model = unwrapped(learn.model)
    learn.model.load_state_dict(log.kept_weights())  # the epoch --keep chose (after Ctrl-C: of those finished)
    return interrupted


def print_plan(learn, context: RunContext, phases: list[Phase]) -> None:
    """The plan line and the set-up line: what will train, on what, where the run goes."""
    recipe, dist = context.recipe, context.dist
    processes = (f"{dist.size} processes x batch {learn.dls.bs} (global batch {dist.size * learn.dls.bs}, --bs is per "
                 f"process)" if dist.size > 1 else f"batch {learn.dls.bs}")
    validation = validation_loader(learn.dls)
    counts = f", {len(validation.dataset)} validation" if validation is not None else ""
    if context.trial:
        counts += " (both held out from the training images: this trial never reads the test split)"
    left_out = ""
    if recipe.exclude_suspects:
        left_out = (f" (left out: the {len(context.excluded)} whose labels look most wrong, --exclude-suspects "
                    f"{recipe.exclude_suspects}{'' if len(context.excluded) == recipe.exclude_suspects else ', no more look wrong'}"
                    f"; {context.folder.label_issues.name})")
    mixing = (f"; training batches mixed by MixUp (Beta({recipe.mixup:g}, {recipe.mixup:g}))" if recipe.mixup else
              f"; training batches mixed by CutMix (Beta({recipe.cutmix:g}, {recipe.cutmix:g}))" if recipe.cutmix else "")
    if recipe.ema:
        mixing += f"; each epoch measures and keeps an EMA of the weights (decay up to {recipe.ema:g}, --ema)"
    print(f"{recipe.name}: {recipe.epochs} epoch(s) of {recipe.strategy}: {describe_plan(phases)}{mixing}")
    print(f"{recipe.arch} from {context.starting_weights}, {len(learn.dls.train_ds)} train{left_out} / "
          f"{len(learn.dls.valid_ds)} test{counts} images, {len(context.classes)} classes, {processes}, {context.resolved.precision} on "
          f"{context.device}, keeping the {context.resolved.keep} epoch"
          f"{NO_VALIDATION if not context.has_validation else ''} -> {context.folder}", flush=True)


def final_report(learn, context: RunContext, log: EpochLog, interrupted: bool, measure_unaugmented: bool,
                 extra: dict | None = None) -> tuple[dict, float | None, bool]:
    """Score the kept model on the test split, then write the reports (metrics.json, history.csv, curves.png) for
    the last time; `extra`: more keys for metrics.json. Returns (metrics.json's content, a multi-label model's
    threshold, whether Ctrl-C came)."""
    final, threshold = {}, 0.5 if context.multi_label else None
    test, calibration = None, {"calibrated": False, "why": "the final measurements were skipped"}
    try:  # extra passes over the data: a Ctrl-C here skips them, and the trained model is still saved
        # after fit the Learner holds the whole test set again (fastai's DistributedTrainer restores it)
        calibration = calibrate(learn, context) if not context.trial else {"calibrated": False, "why": "a trial run"}
        plain, with_tta = final_scores(learn, context, calibration.get("temperature"))
        test = with_tta or plain  # what `fastft evaluate` reports for the saved model (it uses the recipe's tta)
        # the saved model's test accuracy in float32: the kept epoch's line was measured in the training precision
        final["test_acc"] = plain["accuracy"]
        final.update({k: test[k] for k in ("balanced_accuracy", "macro_f1", "micro_f1", "mAP", "threshold") if k in test})
        threshold = test.get("threshold")
        if with_tta:
            final["test_acc_tta"] = with_tta["accuracy"]
        if measure_unaugmented and not interrupted and context.dist.size == 1:
            final["train_acc_unaugmented"] = unaugmented_train_accuracy(learn)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: skipping the final test-time measurements, saving the trained model", file=sys.stderr)
    additions = {"final": final, "calibration": calibration, **(extra or {}), **({"test_scores": test} if test else {}),
                 **({"stopped_early": log.stopped} if log.stopped else {})}
    # the last epoch's checkpoint, written while the final scores were computed, on disk before any model file (a
    # full disk raises here), so a run that fails from here on can be resumed
    log.saver.wait()
    results = write_reports(context.folder, log.epochs, log.examples_per_sec, str(context.device), log.kept_epoch,
                            additions)
    return results, threshold, interrupted


def save_model(learn, context: RunContext, threshold: float | None, temperature=None) -> None:
    """The pickle-free bundle (model.safetensors + model.json) and fastai's model.pkl, without the callbacks that
    only training needs."""
    recipe, folder = context.recipe, context.folder
    try:
        training_only = training_only_callbacks()  # not needed to load or use the model
        if context.dist.accelerator:
            from fastft.train.sharding import DistributedTraining  # loaded only by a run of many processes

            training_only = (DistributedTraining, *training_only)
        for callback in training_only:
            learn.remove_cbs(learn.cbs.filter(lambda cb: isinstance(cb, callback)))
        release_last_batch(learn)
        with replacing(folder.pickle.resolve()) as temporary:
            learn.export(temporary)
        write_bundle(learn.model, folder, arch=recipe.arch, classes=list(context.classes), size=recipe.size,
                     crop_pct=recipe.crop_pct, mean=context.mean, std=context.std, head=context.head, tta=recipe.tta,
                     threshold=threshold, temperature=temperature)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while saving the model: the earlier model files in {folder} are whole; "
                          "metrics.json and the curves are kept; `fastft resume` finishes it") from None


def recipe_from_checkpoint(saved: dict, run_dir: Path) -> Recipe:
    import tomllib

    from fastft.recipe import recipe_from_values

    try:
        return recipe_from_values(tomllib.loads(saved["recipe"]), f"{RunFolder(run_dir).checkpoint}'s recipe")
    except UsageError as e:
        raise UsageError(f"{run_dir} cannot resume: its recipe no longer validates ({e})") from None


def restart_recipe(run_dir: Path) -> Recipe:
    """The recipe of a run that stopped before its first checkpoint was written: it trains again from the start,
    in its own folder (its seed gives the same run)."""
    from fastft.recipe import read_recipe_file

    folder = RunFolder(run_dir)
    try:
        recipe = read_recipe_file(folder.recipe)
    except UsageError as e:
        raise UsageError(f"{run_dir} cannot resume: its recipe does not validate ({e})") from None
    print(f"note: {run_dir} stopped before its first checkpoint was written (during its first epoch, or while that "
          f"epoch's {folder.checkpoint.name} was being written); training it again from the start with its "
          f"{folder.recipe.name}", file=sys.stderr)
    return recipe


def resumer(saved: dict, log, dist):
    """restore(learn, optimizer): put the stopped run's state back, just before its next epoch: the weights and
    the log always; the optimizer's state when the next epoch is in the middle of a phase (a new phase starts
    with a fresh optimizer state, as it did in the first run); every random generator last, so the next draw
    is the one the first run made."""
    log.restore(saved["log"])
    # the stopped run's last measured weights: --ema's average once it has taken a step, else the network's
    averaged = log.averaging is not None and log.averaging.steps > 0
    log.snapshot = saved["log"]["ema"]["weights"] if averaged else saved["model"]

    def restore(learn, optimizer: bool) -> None:
        unwrapped(learn.model).load_state_dict(saved["model"])
        if optimizer and saved["optimizer"] is not None:
            learn.opt.load_state_dict(saved["optimizer"])
        randomness = saved["random"]
        checkpoint.set_random_state(randomness[dist.rank if dist.rank < len(randomness) else 0], learn.dls)
    return restore


def tensorboard_log(folder: RunFolder, log, mean, std):
    from fastft.train.tensorboard import TensorBoardLog

    return TensorBoardLog(folder.tensorboard, log, mean, std)


@large_images_allowed()
def lr_find_only(recipe: Recipe, out: str | None = None) -> float:
    """`fastft lr-find`: the suggestion and lr_find.png, no training."""
    if world_size() > 1:
        raise UsageError("lr-find runs in one process; launch it without torchrun/accelerate")
    if strategy_choice.choosing(recipe):  # the rate lp-ft would fine-tune at, if auto chose it
        recipe = recipe.replace(strategy="lp-ft")
    prepared = prepare(recipe, out)
    return find_lr(prepared.learn, prepared.context)
