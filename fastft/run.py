"""Train one recipe: data -> learner -> schedule -> outputs in the run folder.

A run folder holds recipe.toml (resolved: `fastft run` on it reproduces the run), metrics.json,
history.csv, curves.png and model.pkl (fastai's export).
"""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import torch
from fastai.vision.all import Callback, find_bs, set_seed

from fastft.augment import parse_aug
from fastft.data import build_dataloaders, load_split
from fastft.download import fetch_dataset
from fastft.errors import UsageError
from fastft.model import check_arch, create_learner, normalization
from fastft.recipe import Recipe
from fastft.report import summary_line, write_reports


class Interrupted(Exception):
    """Ctrl-C during training; the outputs of the last finished epoch were kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible here; use --device cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    return device


def new_run_folder(out: str | None, recipe_name: str) -> Path:
    """The run folder: `out` if it is new or empty (never overwrite a run), else runs/<recipe>-<time>."""
    if out:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UsageError(f"--out {path} already exists and is not empty; choose a new folder (nothing was overwritten)")
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / f"{recipe_name}-{stamp}", 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{recipe_name}-{stamp}-{n}"
    return path


class EpochLog(Callback):
    """d2l's figures per epoch: mean train loss and running train accuracy over the (augmented) training
    batches, test loss and accuracy, seconds. Writes the reports after each epoch and keeps a copy of the
    weights, so Ctrl-C can fall back to the last finished epoch."""

    order = 55  # after fastai's Recorder (50)

    def __init__(self, out: Path, device: str):
        self.out, self.device = out, device
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
        (n_train, train_loss, train_correct), (n_test, test_loss, test_correct) = self.sums[True], self.sums[False]
        self.train_examples += n_train
        self.train_seconds += self.epoch_train_seconds
        self.epochs.append({
            "epoch": len(self.epochs) + 1,
            "train_loss": train_loss / max(n_train, 1), "train_acc": train_correct / max(n_train, 1),
            "valid_loss": test_loss / max(n_test, 1), "test_acc": test_correct / max(n_test, 1),
            "seconds": time.perf_counter() - self.started,
        })
        self.snapshot = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}
        self.results = write_reports(self.out, self.epochs, self.examples_per_sec, self.device)

    @property
    def examples_per_sec(self) -> float:
        return self.train_examples / max(self.train_seconds, 1e-9)


def fit(learn, recipe: Recipe) -> None:
    """The training schedule. `epochs` is the total, frozen epochs included."""
    if recipe.strategy == "scratch" or not recipe.pretrained:
        learn.unfreeze()
        learn.fit_one_cycle(recipe.epochs, recipe.lr)
        return
    # fastai's fine_tune: the head alone, then everything with the body at lower rates (lr/200 .. lr/2).
    frozen = min(recipe.freeze_epochs, recipe.epochs - 1)
    if frozen:
        learn.freeze()
        learn.fit_one_cycle(frozen, slice(recipe.lr), pct_start=0.99)
    learn.unfreeze()
    learn.fit_one_cycle(recipe.epochs - frozen, slice(recipe.lr / 200, recipe.lr / 2), pct_start=0.3, div=5.0)


def train(recipe: Recipe, out: str | None = None) -> dict:
    """Run `recipe`; returns metrics.json's content. Raises Interrupted after saving on Ctrl-C."""
    device = resolve_device(recipe.device)
    check_arch(recipe.arch)
    parse_aug(recipe.aug)
    run_dir = new_run_folder(out, recipe.name)  # checked before the long work, created after it succeeds
    root = Path(recipe.data).expanduser() if recipe.data else fetch_dataset(recipe.dataset or recipe.name,
                                                                             recipe.data_url, recipe.data_sha1)
    recipe = recipe.replace(data=str(root.resolve()))

    set_seed(recipe.seed, reproducible=True)
    split = load_split(root, recipe)
    mean, std = normalization(recipe.arch)
    dls = build_dataloaders(split, recipe, mean, std, device)
    log = EpochLog(run_dir, str(device))
    learn = create_learner(dls, recipe, cbs=[log])

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.toml").write_text(recipe.to_toml())
    if split.skipped:
        (run_dir / "skipped_images.txt").write_text("".join(f"{p}\t{why}\n" for p, why in split.skipped))
    n_train, n_test = len(dls.train_ds), len(dls.valid_ds)
    weights = recipe.weights or (f"{recipe.arch} ImageNet weights" if recipe.pretrained else "random init")
    print(f"{recipe.name}: {recipe.arch} from {weights}, {n_train} train / {n_test} test images, "
          f"{len(split.classes)} classes, {recipe.epochs} epochs ({recipe.strategy}) on {device} -> {run_dir}")

    interrupted = False
    try:
        fit(learn, recipe)
    except KeyboardInterrupt:
        interrupted = True
        if log.snapshot is None:
            raise Interrupted(f"interrupted before the first epoch finished; {run_dir} holds only recipe.toml") from None
        learn.model.load_state_dict(log.snapshot)
    learn.remove_cb(log)
    learn._end_cleanup()  # drop the last batch's tensors so they are not pickled into model.pkl
    learn.export(run_dir.resolve() / "model.pkl")
    if interrupted:
        raise Interrupted(f"interrupted: kept the outputs of epoch {len(log.epochs)} of {recipe.epochs} in {run_dir}")
    print(summary_line(log.results["final"], str(device)))
    return log.results
