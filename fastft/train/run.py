"""Train one recipe: data -> learner -> schedule -> outputs in the run folder.

A run folder holds recipe.toml (resolved: `fastft run` on it reproduces the run), metrics.json,
history.csv, curves.png, the pickle-free bundle (model.safetensors + model.json) and model.pkl
(fastai's export, for fastai users).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from fastai.callback.progress import ProgressCallback
from fastai.vision.all import Callback, noop, set_seed

from fastft.atomic import remove_partial_files, replacing, save_figure, write_json, write_text
from fastft.data.augment import parse_aug
from fastft.data.download import fetch_dataset
from fastft.data.folders import new_run_folder
from fastft.data.inspect import leakage_warning
from fastft.data.loaders import build_dataloaders, imbalance_note, label_counts, load_split
from fastft.deploy.bundle import mirror_averaged, probabilities_of, write_bundle
from fastft.errors import UsageError
from fastft.fastai_internals import release_last_batch
from fastft.recipe import Recipe
from fastft.train.devices import resolve_device, resolve_precision, set_number_format, training_only_callbacks
from fastft.train.distributed import Distributed, world_size
from fastft.train.model import check_arch, create_learner, normalization
from fastft.train import checkpoint
from fastft.train.epochs import EpochLog, unwrapped
from fastft.train.report import summary_line, write_reports
from fastft.train.strategies import STRATEGIES, Phase, describe_plan


class Interrupted(Exception):
    """Ctrl-C during training; the outputs of the last finished epoch were kept."""


@dataclass
class Prepared:
    """Everything a run needs, built and checked before any training starts."""
    recipe: Recipe
    learn: object
    run_dir: Path
    device: torch.device
    skipped: list
    mean: tuple
    std: tuple
    dist: Distributed


def prepare(recipe: Recipe, out: str | None, resuming: bool = False) -> Prepared:
    """Check the recipe, find the data, build DataLoaders and Learner. Every user error surfaces here,
    before the run folder is created, so a failed start leaves nothing behind. `resuming`: `out` is the
    stopped run's own folder."""
    device = resolve_device(recipe.device)
    precision = resolve_precision(recipe.precision, device)
    recipe = recipe.replace(precision=precision)
    check_arch(recipe.arch)
    plan = parse_aug(recipe.aug)
    dist = Distributed(device)
    device = dist.device
    if dist.size > 1 and recipe.lr == "auto":
        raise UsageError("--lr auto runs in one process; run `fastft lr-find` first and pass its --lr")
    if STRATEGIES[recipe.strategy].random_init:  # by definition, e.g. `compare --strategy fine-tune,scratch`
        if recipe.weights:
            print(f"note: --strategy {recipe.strategy} starts from random weights; not loading {recipe.weights}",
                  file=sys.stderr)
        recipe = recipe.replace(pretrained=False, weights="")
    run_dir = Path(out) if resuming else dist.from_main(lambda: new_run_folder(out, recipe.name))  # rank 0 names it
    if recipe.data:
        root = Path(recipe.data).expanduser()
    else:  # rank 0 downloads while the others wait
        root = dist.main_first(lambda: fetch_dataset(recipe.dataset or recipe.name, recipe.data_url, recipe.data_sha1))
    recipe = recipe.replace(data=str(root.resolve()))

    set_seed(recipe.seed, reproducible=True)
    split = load_split(root, recipe, plan, quiet=not dist.is_main)
    if dist.is_main:
        for note in (imbalance_note(label_counts(split)), leakage_warning(split)):
            if note:
                print(note, file=sys.stderr)
    recipe = recipe.replace(keep=resolve_keep(recipe, has_validation=bool(split.valid), quiet=not dist.is_main))
    mean, std = normalization(recipe.arch)
    dls = build_dataloaders(split, recipe, mean, std, device, plan, processes=dist.size)
    learn = create_learner(dls, recipe)
    set_number_format(learn, precision, recipe.channels_last, device)
    learn.logger = noop  # EpochLog prints each epoch's figures, the same as history.csv's
    if not (dist.is_main and sys.stdout.isatty()):  # progress bars on rank 0's terminal; a log gets clean lines
        learn.remove_cb(ProgressCallback)
    if dist.size > 1:
        learn.add_cb(dist.callback())
        torch.manual_seed(recipe.seed + dist.rank)  # same initial weights, different augmentation per rank
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if split.skipped:
            write_text(run_dir / "skipped_images.txt", "".join(f"{p}\t{why}\n" for p, why in split.skipped))
    return Prepared(recipe, learn, run_dir, device, split.skipped, mean, std, dist)


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


def schedule(learn, recipe: Recipe, lr: float) -> list[Phase]:
    """The recipe's strategy's phases for this Learner, with the head's peak rate `lr`."""
    return STRATEGIES[recipe.strategy].plan(learn, lr, recipe.epochs, recipe.freeze_epochs, recipe.unfreeze)


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


def lr_find_steps(batches_per_epoch: int) -> int:
    """fastai's 100 steps, but at most 3 epochs of the data (at least 20 steps, for a curve to read): 100 steps
    over a few hundred images is a dozen epochs, most of it spent past the divergence point anyway."""
    return min(100, max(20, 3 * batches_per_epoch))


def find_lr(learn, recipe: Recipe, run_dir: Path) -> float:
    """fastai's LR finder on the groups the strategy's first phase trains, for a number of steps bounded by the
    data; saves lr_find.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = STRATEGIES[recipe.strategy].plan(learn, 1.0, recipe.freeze_epochs + 1, recipe.freeze_epochs,
                                             recipe.unfreeze)[0]  # which groups the first phase trains
    learn.freeze_to(-first.trains) if first.trains else learn.unfreeze()
    steps = lr_find_steps(len(learn.dls.train))
    print(f"lr-find: up to {steps} steps from lr 1e-7 to 10, training {first.describe_groups()}", flush=True)
    saved_path, learn.path = learn.path, run_dir.resolve()  # fastai's finder keeps a copy of the model under path
    progress = LrFindLog(steps)
    learn.add_cb(progress)
    try:  # every step (stop_div off): bounded by the data they cost little, and on small noisy batches fastai's
        # divergence check (loss > 4x its best) stops the finder after a handful of steps, with no curve to read
        suggestion = learn.lr_find(num_it=steps, stop_div=False, show_plot=False)
    except (IndexError, ValueError):  # fastai's suggestion needs a loss curve with a valley
        raise UsageError(f"the LR finder found no rate where the loss falls in {steps} steps; pass --lr yourself") from None
    finally:
        learn.remove_cb(progress)
        learn.path = saved_path
        with contextlib.suppress(OSError):
            (run_dir / learn.model_dir).rmdir()  # the finder's temporary folder, empty again
    learn.recorder.plot_lr_find()
    plt.title(f"{recipe.name}, {recipe.strategy}: suggested lr {suggestion.valley:.2e}")
    save_figure(plt.gcf(), run_dir / "lr_find.png")
    return float(suggestion.valley)


def unaugmented_train_accuracy(learn) -> float:
    """Accuracy on the training images with the test transforms: next to test accuracy, this is what
    shows overfitting (d2l's train acc is measured on augmented batches, mid-epoch)."""
    dl = learn.dls.test_dl(learn.dls.train_ds.items, with_labels=True)
    with learn.no_bar(), learn.no_logging():
        return float(learn.validate(dl=dl)[1])


def split_predictions(learn, dl, tta: bool) -> tuple:
    """(probabilities (N, C), targets) of the model over one split, as the bundle would predict them: with flip
    TTA (each image averaged with its mirror image, `fastft predict --tta`) when `tta`."""
    import numpy as np

    probabilities = probabilities_of(unwrapped(learn.model).eval(), getattr(learn.dls, "multi_label", False))
    probs, targets = [], []
    with torch.inference_mode():
        for xb, yb in dl:
            probs.append((mirror_averaged(probabilities, xb) if tta else probabilities(xb)).float().cpu())
            targets.append(yb.cpu())
    return (torch.cat(probs).numpy(), torch.cat(targets).numpy()) if probs else (np.zeros((0, 0)), np.zeros(0))


def final_scores(learn, tta: bool) -> dict:
    """The kept model's scores on the test split (deploy/scores.py): balanced accuracy and macro F1 beside the
    accuracy; a multi-label run's at the threshold with the best micro F1 on the validation split (0.5 without
    one), with mAP."""
    from fastft.deploy import scores

    classes = list(learn.dls.vocab)
    probs, truth = split_predictions(learn, learn.dls.valid, tta)
    if not getattr(learn.dls, "multi_label", False):
        return scores.single_label(probs, truth.astype(int), classes)
    threshold = 0.5
    if len(learn.dls.loaders) > 2:
        threshold = scores.choose_threshold(*split_predictions(learn, learn.dls.loaders[2], tta))
    return scores.multi_label(probs, truth, classes, threshold)


def train(recipe: Recipe, out: str | None = None, measure_unaugmented: bool = False, callbacks=(),
          resume: Path | None = None) -> dict:
    """Run `recipe`, or (`resume`) continue a stopped run from its checkpoint; returns metrics.json's content
    (empty on ranks other than 0). Raises Interrupted after saving on Ctrl-C. `measure_unaugmented` adds
    final.train_acc_unaugmented (one more pass over the training images); `callbacks` are extra fastai
    callbacks for the Learner."""
    saved = None
    if resume is not None:
        saved = checkpoint.load(resume)
        recipe = recipe_from_checkpoint(saved, resume)
        out = str(resume)
    run = prepare(recipe, out, resuming=saved is not None)
    recipe, learn, run_dir, dist = run.recipe, run.learn, run.run_dir, run.dist
    if saved is not None and dist.is_main:
        remove_partial_files(run_dir)
    learn.add_cbs(callbacks)
    if recipe.lr == "auto":
        recipe = recipe.replace(lr=find_lr(learn, recipe, run_dir))
        print(f"lr finder suggests {recipe.lr:.2e} (plot: {run_dir / 'lr_find.png'})")
    elif not recipe.lr:
        recipe = recipe.replace(lr=STRATEGIES[recipe.strategy].default_lr)
    if dist.is_main and saved is None:
        write_text(run_dir / "recipe.toml", recipe.to_toml())

    phases = schedule(learn, recipe, recipe.lr)
    log = EpochLog(run_dir, str(run.device), dist, recipe.epochs, recipe.keep, recipe.monitor, recipe.patience,
                   recipe.to_toml())
    learn.add_cb(log)
    extra_logs = [tensorboard_log(run_dir, log, run.mean, run.std)] if recipe.log == "tensorboard" and dist.is_main else []
    learn.add_cbs(extra_logs)
    start_epoch, restore = 0, None
    if saved is not None:
        start_epoch, restore = saved["epoch"], resumer(saved, log, dist)
    processes = (f"{dist.size} processes x batch {learn.dls.bs} (global batch {dist.size * learn.dls.bs}, --bs is per "
                 f"process)" if dist.size > 1 else f"batch {learn.dls.bs}")
    if dist.is_main:
        print(f"{recipe.name}: {recipe.epochs} epoch(s) of {recipe.strategy}: {describe_plan(phases)}")
        validation = f", {len(learn.dls.loaders[2].dataset)} validation" if len(learn.dls.loaders) > 2 else ""
        print(f"{recipe.arch} from {learn.starting_weights}, {len(learn.dls.train_ds)} train / {len(learn.dls.valid_ds)} "
              f"test{validation} images, {learn.dls.c} classes, {processes}, {recipe.precision} on {run.device}, "
              f"keeping the {recipe.keep} epoch{NO_VALIDATION if len(learn.dls.loaders) < 3 else ''} -> {run_dir}",
              flush=True)
        if saved is not None:
            print(f"resuming after epoch {start_epoch} of {recipe.epochs} from {run_dir / checkpoint.CHECKPOINT}", flush=True)
    interrupted = False
    try:
        if start_epoch < recipe.epochs:
            STRATEGIES[recipe.strategy].fit(learn, phases, recipe.seed, start_epoch=start_epoch, restore=restore)
    except KeyboardInterrupt:
        interrupted = True
        if log.snapshot is None:
            raise Interrupted(f"interrupted before the first epoch finished; {run_dir} holds only recipe.toml") from None
    finally:
        for extra in extra_logs:
            extra.close()
    learn.model = unwrapped(learn.model)
    learn.model.load_state_dict(log.kept_weights())  # the epoch --keep chose (after Ctrl-C: of those finished)
    # every finished epoch wrote the reports; again only if Ctrl-C cut them short or no epoch ran here (a resumed
    # run whose epochs had all finished)
    if dist.is_main and (interrupted or log.results is None):
        log.results = write_reports(run_dir, log.epochs, log.examples_per_sec, str(run.device), log.kept_epoch)
    learn.remove_cbs([log, *extra_logs, *callbacks])
    if not dist.is_main:
        dist.wait()
        return {}
    final, threshold = log.results["final"], 0.5 if getattr(learn.dls, "multi_label", False) else None
    try:  # extra passes over the data: a Ctrl-C here skips them, and the trained model is still saved
        # after fit the Learner holds the whole test set again (fastai's DistributedTrainer restores it)
        test = final_scores(learn, recipe.tta)
        log.results["test_scores"] = test
        final.update({k: test[k] for k in ("balanced_accuracy", "macro_f1", "micro_f1", "mAP", "threshold") if k in test})
        threshold = test.get("threshold")
        if recipe.tta:
            final["test_acc_tta"] = test["accuracy"]
        if measure_unaugmented and not interrupted and dist.size == 1:
            final["train_acc_unaugmented"] = unaugmented_train_accuracy(learn)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: skipping the final test-time measurements, saving the trained model", file=sys.stderr)
    if log.stopped:
        log.results["stopped_early"] = log.stopped
    # the last epoch's checkpoint, written while the final scores were computed, on disk before any model file (a
    # full disk raises here), so a run that fails from here on can be resumed
    log.saver.wait()
    try:
        write_json(run_dir / "metrics.json", log.results)
        dist.remove_callback(learn)  # training-only callbacks: not needed to load or use the model
        for callback in training_only_callbacks():
            learn.remove_cbs(learn.cbs.filter(lambda cb: isinstance(cb, callback)))
        release_last_batch(learn)
        with replacing(run_dir.resolve() / "model.pkl") as temporary:
            learn.export(temporary)
        write_bundle(learn.model, run_dir, arch=recipe.arch, classes=list(learn.dls.vocab), size=recipe.size,
                     crop_pct=recipe.crop_pct, mean=run.mean, std=run.std, head=learn.head_config, tta=recipe.tta,
                     threshold=threshold)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while saving the model: the earlier model files in {run_dir} are whole; "
                          "metrics.json and the curves are kept; `fastft resume` finishes it") from None
    dist.wait()
    if interrupted:
        raise Interrupted(f"interrupted: kept the outputs of epoch {log.kept_epoch} of {recipe.epochs} in {run_dir}; "
                          f"`fastft resume {run_dir}` continues it")
    checkpoint.remove(run_dir)  # finished: the bundle is the result, and nothing is left to resume
    kept = f" (kept epoch {log.kept_epoch} of {len(log.epochs)})" if log.kept_epoch != len(log.epochs) else ""
    print(summary_line(final, str(run.device)) + kept)
    return log.results


def recipe_from_checkpoint(saved: dict, run_dir: Path) -> Recipe:
    import tomllib

    from fastft.recipe import recipe_from_values

    try:
        return recipe_from_values(tomllib.loads(saved["recipe"]), f"{run_dir / checkpoint.CHECKPOINT}'s recipe")
    except UsageError as e:
        raise UsageError(f"{run_dir} cannot resume: its recipe no longer validates ({e})") from None


def resumer(saved: dict, log, dist):
    """restore(learn, optimizer): put the stopped run's state back, just before its next epoch: the weights and
    the log always; the optimizer's state when the next epoch is in the middle of a phase (a new phase starts
    with a fresh optimizer state, as it did in the first run); every random generator last, so the next draw
    is the one the first run made."""
    log.restore(saved["log"])
    log.snapshot = saved["model"]

    def restore(learn, optimizer: bool) -> None:
        unwrapped(learn.model).load_state_dict(saved["model"])
        if optimizer and saved["optimizer"] is not None:
            learn.opt.load_state_dict(saved["optimizer"])
        randomness = saved["random"]
        checkpoint.set_random_state(randomness[dist.rank if dist.rank < len(randomness) else 0], learn.dls)
    return restore


def tensorboard_log(run_dir: Path, log, mean, std):
    from fastft.train.tensorboard import TensorBoardLog

    return TensorBoardLog(run_dir / "tensorboard", log, mean, std)


def lr_find_only(recipe: Recipe, out: str | None = None) -> float:
    """`fastft lr-find`: the suggestion and lr_find.png, no training."""
    if world_size() > 1:
        raise UsageError("lr-find runs in one process; launch it without torchrun/accelerate")
    run = prepare(recipe, out)
    return find_lr(run.learn, run.recipe, run.run_dir)
