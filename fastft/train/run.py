"""Train one recipe: data -> learner -> schedule -> outputs in the run folder.

A run folder holds recipe.toml (resolved: `fastft run` on it reproduces the run), metrics.json,
history.csv, curves.png, the pickle-free bundle (model.safetensors + model.json) and model.pkl
(fastai's export, for fastai users).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fastai.callback.progress import ProgressCallback
from fastai.vision.all import Callback, find_bs, noop, set_seed

from fastft.atomic import replacing, save_figure, write_json, write_text
from fastft.data.augment import parse_aug
from fastft.data.download import fetch_dataset
from fastft.data.folders import new_run_folder
from fastft.data.loaders import build_dataloaders, load_split
from fastft.deploy.bundle import mirror_averaged, softmax_of, write_bundle
from fastft.errors import UsageError
from fastft.fastai_internals import release_last_batch
from fastft.recipe import Recipe
from fastft.train.devices import resolve_device, resolve_precision, set_number_format, training_only_callbacks
from fastft.train.distributed import Distributed, DistributedTraining, world_size
from fastft.train.model import check_arch, create_learner, normalization
from fastft.train.report import epoch_line, summary_line, write_reports
from fastft.train.strategies import STRATEGIES, Phase, describe_plan


class Interrupted(Exception):
    """Ctrl-C during training; the outputs of the last finished epoch were kept."""


def _unwrapped(model):
    return getattr(model, "module", model)  # DistributedDataParallel wraps the model during fit


class EpochLog(Callback):
    """d2l's figures per epoch: mean train loss and running train accuracy over the (augmented) training
    batches, test loss and accuracy, seconds. Prints them as one line (the only per-epoch output: fastai's
    table, with its smoothed loss and per-phase epoch numbers, is switched off), writes the reports after each
    epoch and keeps a copy of the weights, so Ctrl-C can fall back to the last finished epoch."""

    order = 55  # after fastai's Recorder (50)

    def __init__(self, out: Path, device: str, dist: Distributed, total_epochs: int):
        self.out, self.device, self.dist, self.total_epochs = out, device, dist, total_epochs
        self.epochs, self.train_examples, self.train_seconds, self.snapshot = [], 0, 0.0, None

    def before_epoch(self):
        self.started = time.perf_counter()
        self.sums = {True: [0, 0.0, 0], False: [0, 0.0, 0]}  # training? -> [examples, loss sum, correct]

    def before_validate(self):
        self.epoch_train_seconds = time.perf_counter() - self.started

    def after_batch(self):
        n = find_bs(self.yb)
        sums = self.sums[self.training]
        sums[0] += n
        sums[1] += self.loss.item() * n
        sums[2] += (self.pred.argmax(dim=-1) == self.yb[0]).sum().item()

    def after_epoch(self):
        # every rank saw its own shard: the epoch's figures are sums over ranks
        n_train, train_loss, train_correct, n_test, test_loss, test_correct = self.dist.sum(self.sums[True] + self.sums[False])
        if probe := getattr(self.learn, "probe_fit", None):  # a probe epoch: no batches trained, a head was fitted
            n_train = probe["images"]
            train_loss, train_correct = probe["train_loss"] * n_train, probe["train_acc"] * n_train
        self.train_examples += n_train
        self.train_seconds += self.epoch_train_seconds
        self.epochs.append({
            "epoch": len(self.epochs) + 1,
            "train_loss": train_loss / max(n_train, 1), "train_acc": train_correct / max(n_train, 1),
            "valid_loss": test_loss / max(n_test, 1), "test_acc": test_correct / max(n_test, 1),
            "seconds": time.perf_counter() - self.started,
        })
        self.snapshot = {k: v.detach().clone() for k, v in _unwrapped(self.learn.model).state_dict().items()}
        if self.dist.is_main:
            self.results = write_reports(self.out, self.epochs, self.examples_per_sec, self.device)
            print(epoch_line(self.epochs[-1], self.total_epochs), flush=True)

    @property
    def examples_per_sec(self) -> float:
        return self.train_examples / max(self.train_seconds, 1e-9)


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


def prepare(recipe: Recipe, out: str | None) -> Prepared:
    """Check the recipe, find the data, build DataLoaders and Learner. Every user error surfaces here,
    before the run folder is created, so a failed start leaves nothing behind."""
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
    run_dir = dist.from_main(lambda: new_run_folder(out, recipe.name))  # rank 0 names it for all
    if recipe.data:
        root = Path(recipe.data).expanduser()
    else:  # rank 0 downloads while the others wait
        root = dist.main_first(lambda: fetch_dataset(recipe.dataset or recipe.name, recipe.data_url, recipe.data_sha1))
    recipe = recipe.replace(data=str(root.resolve()))

    set_seed(recipe.seed, reproducible=True)
    split = load_split(root, recipe, plan, quiet=not dist.is_main)
    mean, std = normalization(recipe.arch)
    dls = build_dataloaders(split, recipe, mean, std, device, plan)
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


def flip_tta_accuracy(learn) -> float:
    """Test accuracy when each image's probabilities are averaged with its mirror image's: what the
    bundle predicts for a run with `tta` (`fastft predict --tta`)."""
    probabilities, correct, total = softmax_of(learn.model.eval()), 0, 0
    with torch.inference_mode():
        for xb, yb in learn.dls.valid:
            correct += (mirror_averaged(probabilities, xb).argmax(dim=1) == yb).sum().item()
            total += len(yb)
    return correct / max(total, 1)


def train(recipe: Recipe, out: str | None = None, measure_unaugmented: bool = False, callbacks=()) -> dict:
    """Run `recipe`; returns metrics.json's content (empty on ranks other than 0). Raises Interrupted
    after saving on Ctrl-C. `measure_unaugmented` adds final.train_acc_unaugmented (one more pass over
    the training images); `callbacks` are extra fastai callbacks for the Learner."""
    run = prepare(recipe, out)
    recipe, learn, run_dir = run.recipe, run.learn, run.run_dir
    learn.add_cbs(callbacks)
    if recipe.lr == "auto":
        recipe = recipe.replace(lr=find_lr(learn, recipe, run_dir))
        print(f"lr finder suggests {recipe.lr:.2e} (plot: {run_dir / 'lr_find.png'})")
    elif not recipe.lr:
        recipe = recipe.replace(lr=STRATEGIES[recipe.strategy].default_lr)
    dist = run.dist
    if dist.is_main:
        write_text(run_dir / "recipe.toml", recipe.to_toml())

    phases = schedule(learn, recipe, recipe.lr)
    log = EpochLog(run_dir, str(run.device), dist, recipe.epochs)
    learn.add_cb(log)
    processes = (f"{dist.size} processes x batch {learn.dls.bs} (global batch {dist.size * learn.dls.bs}, --bs is per "
                 f"process)" if dist.size > 1 else f"batch {learn.dls.bs}")
    if dist.is_main:
        print(f"{recipe.name}: {recipe.epochs} epoch(s) of {recipe.strategy}: {describe_plan(phases)}")
        print(f"{recipe.arch} from {learn.starting_weights}, {len(learn.dls.train_ds)} train / {len(learn.dls.valid_ds)} "
              f"test images, {learn.dls.c} classes, {processes}, {recipe.precision} on {run.device} -> {run_dir}", flush=True)
    interrupted = False
    try:
        STRATEGIES[recipe.strategy].fit(learn, phases, recipe.seed)
    except KeyboardInterrupt:
        interrupted = True
        if log.snapshot is None:
            raise Interrupted(f"interrupted before the first epoch finished; {run_dir} holds only recipe.toml") from None
        learn.model = _unwrapped(learn.model)
        learn.model.load_state_dict(log.snapshot)
        if dist.is_main:  # Ctrl-C may have cut the last epoch's reports short: write them again
            log.results = write_reports(run_dir, log.epochs, log.examples_per_sec, str(run.device))
    learn.remove_cbs([log, *callbacks])
    if not dist.is_main:
        dist.wait()
        return {}
    final = log.results["final"]
    try:  # extra passes over the data: a Ctrl-C here skips them, and the trained model is still saved
        if recipe.tta:  # after fit the Learner holds the whole test set again (fastai's DistributedTrainer restores it)
            final["test_acc_tta"] = flip_tta_accuracy(learn)
        if measure_unaugmented and not interrupted and dist.size == 1:
            final["train_acc_unaugmented"] = unaugmented_train_accuracy(learn)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: skipping the final test-time measurements, saving the trained model", file=sys.stderr)
    try:
        write_json(run_dir / "metrics.json", log.results)
        for callback in (DistributedTraining, *training_only_callbacks()):  # not needed to load or use the model
            learn.remove_cbs(learn.cbs.filter(lambda cb: isinstance(cb, callback)))
        release_last_batch(learn)
        with replacing(run_dir.resolve() / "model.pkl") as temporary:
            learn.export(temporary)
        write_bundle(learn.model, run_dir, arch=recipe.arch, classes=list(learn.dls.vocab), size=recipe.size,
                     crop_pct=recipe.crop_pct, mean=run.mean, std=run.std, head=learn.head_config, tta=recipe.tta)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while saving the model: model.pkl or model.safetensors in {run_dir} may be "
                          "incomplete; metrics.json and the curves are kept") from None
    dist.wait()
    if interrupted:
        raise Interrupted(f"interrupted: kept the outputs of epoch {len(log.epochs)} of {recipe.epochs} in {run_dir}")
    print(summary_line(final, str(run.device)))
    return log.results


def lr_find_only(recipe: Recipe, out: str | None = None) -> float:
    """`fastft lr-find`: the suggestion and lr_find.png, no training."""
    if world_size() > 1:
        raise UsageError("lr-find runs in one process; launch it without torchrun/accelerate")
    run = prepare(recipe, out)
    return find_lr(run.learn, run.recipe, run.run_dir)
