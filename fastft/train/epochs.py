"""The end of every epoch, in one callback: the figures (d2l's, plus the validation split's when the run has one),
one log line and the reports; then it hands the epoch to the parts that decide on it: the kept epoch and early
stopping (fastft/train/keeping.py), lp-ft's probe weights (fastft/train/wise.py), and the checkpoint a stopped run
resumes from (fastft/train/checkpoint.py), which holds each part's state.

Figures are d2l's: mean train loss and running train accuracy over the epoch's (augmented) training batches,
test loss and accuracy over the test split, seconds. A validation split apart from the test split (valid/, or
--holdout) adds valid_loss and valid_acc.
"""
from __future__ import annotations

import math
import time

import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.torch_core import find_bs

from fastft.data.loaders import validation_loader
from fastft.errors import UsageError
from fastft.fastai_internals import AFTER_PROGRESS, AFTER_RECORDER
from fastft.train import checkpoint
from fastft.train.distributed import unwrapped
from fastft.train.keeping import KeptEpoch
from fastft.train.report import epoch_line, write_reports
from fastft.train.tie import probe_out_of_reach

def correct(logits, targets, multi_label: bool) -> float:
    """How many images a batch got right: the top class; multi-label (0/1 targets, one per label), each image's
    share of labels right at probability 0.5 (fastai's accuracy_multi)."""
    if multi_label:
        return ((logits > 0) == targets.bool()).float().mean(dim=-1).sum().item()
    return (logits.argmax(dim=-1) == targets).sum().item()


def loss_and_correct(learn, dl, multi_label: bool) -> tuple[float, float, int]:
    """(summed loss, correct predictions, examples) of the Learner's network over a labelled loader, in eval mode
    (the network's training mode is restored after)."""
    model, losses, right, total = unwrapped(learn.model), 0.0, 0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for xb, yb in dl:
            out = model(xb)
            losses += learn.loss_func(out, yb).item() * len(yb)
            right += correct(out, yb, multi_label)
            total += len(yb)
    model.train(was_training)
    return losses, right, total


def _copy(model) -> dict:
    return {k: v.detach().clone() for k, v in unwrapped(model).state_dict().items()}


class EpochLog(Callback):
    """Per epoch: figures, a log line (the only per-epoch output: fastai's table, with its smoothed loss and
    per-phase epoch numbers, is off), metrics.json/history.csv/curves.png; then the kept epoch and early stopping
    (`kept`), lp-ft's probe weights (`probe`, with --wise) and checkpoint.pt (`checkpoints`). Ctrl-C falls back to the
    last finished epoch's weights (`snapshot`). `progress` is what it and the strategy tell each other: a probe epoch's
    figures in, early stopping out. `averaging`: --ema's average, which each epoch measures and keeps."""

    order = AFTER_RECORDER

    def __init__(self, context, progress, averaging=None, probe=None):
        recipe = context.recipe
        self.averaging, self.probe = averaging, probe
        self.out, self.device, self.dist, self.total_epochs = context.folder, str(context.device), context.dist, recipe.epochs
        self.kept = KeptEpoch(context.resolved.keep, recipe.monitor, recipe.patience, context.budget, recipe.epochs,
                              context.dist)
        self.checkpoints = checkpoint.CheckpointWriter(context.folder, context.dist, context.saved_recipe().to_toml())
        self.lr, self.multi_label, self.progress = context.resolved.lr, context.multi_label, progress
        self.epochs, self.train_examples, self.train_seconds, self.train_batches = [], 0, 0.0, 0
        self.snapshot, self.running, self.stopped = None, False, ""
        self.probe_penalty = None  # the probe epoch's L2 penalty and how it was chosen (metrics.json's `probe`)
        self.validation_is_test = context.validation_is_test
        self.wise, self.valid_images, self.test_images = recipe.wise, 0, 0

    # ---- figures -------------------------------------------------------------------------------------------
    def before_epoch(self):
        self.checkpoints.check()  # the last epoch's checkpoint failed (a full disk): stop before training another
        self.started = time.perf_counter()
        self.sums = {True: [0, 0.0, 0], False: [0, 0.0, 0]}  # training? -> [examples, loss sum, correct]

    def before_validate(self):
        # an epoch fastai skips (SkipToEpoch, order 70, after this callback's before_epoch) never validates
        self.epoch_train_seconds, self.running = time.perf_counter() - self.started, True

    def after_batch(self):
        self.checkpoints.check()
        self.train_batches += self.training
        n = find_bs(self.yb)
        sums = self.sums[self.training]
        loss = self.loss.item()
        if self.training and not math.isfinite(loss):
            raise UsageError(f"training stopped: the training loss became {loss} in epoch {len(self.epochs) + 1}; the "
                             f"learning rate ({self.lr} at its peak) is too high for this data, or the data holds bad "
                             "values; start again with a lower --lr (the finished epochs' figures are in "
                             f"{self.out.path})")
        sums[0] += n
        sums[1] += loss * n
        sums[2] += correct(self.pred, self.yb[0], self.multi_label)

    def validation_figures(self, test: dict) -> dict:
        """valid_loss and valid_acc on the validation split, when there is one (`test`: the test split's)."""
        if self.validation_is_test:  # the same images, the same transform: measured once (in the run's number format)
            return {"valid_loss": test["test_loss"], "valid_acc": test["test_acc"]}
        if (validation := validation_loader(self.dls)) is None:
            return {}
        sums = loss_and_correct(self.learn, validation, self.multi_label)
        losses, right, total = self.dist.sum(list(sums))  # many processes: each scored all of it (sums keep the means)
        self.valid_images = int(total) // self.dist.size
        return {"valid_loss": losses / max(total, 1), "valid_acc": right / max(total, 1)}

    def probe_out_of_reach(self, entry: dict) -> str:
        """Why a run choosing WiSE-FT's weight on its validation split stops after its probe epoch, or "": fine-tuning
        cannot, or is not expected to, be chosen over that probe (fastft/train/tie.py)."""
        if (self.probe is None or self.wise != "auto" or self.multi_label or "valid_acc" not in entry
                or len(self.epochs) >= self.total_epochs):
            return ""
        images = self.valid_images if not self.validation_is_test else self.test_images
        why = probe_out_of_reach(entry["valid_acc"], images)
        return f"{why}; the run stops after its probe epoch" if why else ""

    def after_epoch(self):
        if not self.running:  # an epoch fastai skipped (a resumed run's finished epochs): nothing happened
            return
        self.running = False
        # every rank saw its own shard: the epoch's figures are sums over ranks
        n_train, train_loss, train_correct, n_test, test_loss, test_correct = self.dist.sum(self.sums[True] + self.sums[False])
        self.test_images = int(n_test)  # summed over ranks as floats
        if probe := self.progress.probe:  # a probe epoch: no batches trained, a head was fitted
            n_train = probe["images"]
            train_loss, train_correct = probe["train_loss"] * n_train, probe["train_acc"] * n_train
            self.probe_penalty = probe["penalty_choice"].report()
        self.train_examples += n_train
        self.train_seconds += self.epoch_train_seconds
        entry = {"epoch": len(self.epochs) + 1,
                 "train_loss": train_loss / max(n_train, 1), "train_acc": train_correct / max(n_train, 1),
                 "test_loss": test_loss / max(n_test, 1), "test_acc": test_correct / max(n_test, 1)}
        entry |= self.validation_figures(entry)
        entry["seconds"] = time.perf_counter() - self.started
        self.epochs.append(entry)
        self.snapshot = _copy(self.learn.model)
        if probe and self.probe is not None:
            self.probe.weights = self.snapshot
        improved = self.kept.track(entry, self.snapshot)
        if self.dist.is_main:
            write_reports(self.out, self.epochs, self.examples_per_sec, self.device, self.kept_epoch)
            # the trial's held-out images are its test and its validation split both: shown once, as what they are
            shown = ({k: v for k, v in entry.items() if not k.startswith("test_")} if self.validation_is_test
                     else entry)
            print(epoch_line(shown, self.total_epochs) + (" (best so far)" if improved and self.kept.keep == "best" else ""),
                  flush=True)
        # --ema: the snapshot is the average; training goes on from the network's own weights
        training = self.averaging.training_weights(self.snapshot) if self.averaging else self.snapshot
        self.checkpoints.write(self.learn, len(self.epochs), training, self.state())
        self.stopped = self.probe_out_of_reach(entry) if probe else ""
        self.stopped = self.stopped or self.kept.stop_reason(self.epochs, probe_epoch=bool(probe))
        if self.stopped:
            self.progress.stop = True
            if self.dist.is_main:
                print(self.stopped, flush=True)
            raise CancelFitException

    @property
    def examples_per_sec(self) -> float:
        return self.train_examples / max(self.train_seconds, 1e-9)

    # ---- the kept epoch ------------------------------------------------------------------------------------
    @property
    def kept_epoch(self) -> int:
        return self.kept.kept_epoch(len(self.epochs))

    def kept_weights(self) -> dict:
        return self.kept.kept_weights(self.snapshot)

    # ---- checkpoint ---------------------------------------------------------------------------------------
    def state(self) -> dict:
        """What the log and its parts need to continue a resumed run exactly where it stopped (copies: the next epoch
        appends to the list while a checkpoint of this one is written)."""
        return {"epochs": list(self.epochs), "train_examples": self.train_examples, "train_seconds": self.train_seconds,
                "train_batches": self.train_batches, "best": self.kept.state(),
                "probe_weights": self.probe.state() if self.probe else None, "probe_penalty": self.probe_penalty,
                "ema": self.averaging.state() if self.averaging else None}

    def restore(self, state: dict, network_weights: dict) -> None:
        """Back to where a stopped run's log was (`state`: what `state()` gave), its last measured weights included:
        --ema's average once it has taken a step, else `network_weights`, the network's."""
        self.epochs = state["epochs"]
        self.train_examples, self.train_seconds = state["train_examples"], state["train_seconds"]
        self.train_batches = state["train_batches"]
        self.kept.restore(state["best"])
        self.probe_penalty = state.get("probe_penalty")  # a checkpoint of an earlier fastft has none
        if self.probe:
            self.probe.restore(state.get("probe_weights"))  # a checkpoint of an earlier fastft has none
        if self.averaging and state.get("ema"):
            self.averaging.restore(state["ema"])
        self.snapshot = self.averaging.measured(network_weights) if self.averaging else network_weights


class RunProgress(Callback):
    """On a terminal: a bar over each pass through the data, named with the run's epoch count ("epoch 3/5 train",
    counted 1..N across phases as the epoch lines are). fastai's own bar, which counts each phase's epochs apart
    ("Epoch 2/3"), is not used. A probe epoch opens no training bar (no batch trains; the probe shows its own)."""

    order = AFTER_PROGRESS + 1  # after a probe epoch's ProbeInsteadOfTraining, which skips the training pass

    def __init__(self, log: EpochLog):
        self.log, self.bar = log, None

    def _open(self, what: str) -> None:
        from fastprogress.fastprogress import progress_bar

        self.label = f"epoch {len(self.log.epochs) + 1}/{self.log.total_epochs} {what}"
        self.bar = progress_bar(self.dl, leave=False)
        self.bar.comment = self.label
        self.bar.update(0)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.on_iter_end()
            self.bar = None

    def before_train(self):
        self._open("train")

    def before_validate(self):
        self._open("test")

    def after_batch(self):
        if self.bar is not None:
            self.bar.update(self.iter + 1)
            if self.training:
                self.bar.comment = f"{self.label} loss {self.loss.item():.4f}"

    def after_train(self):
        self._close()

    def after_validate(self):
        self._close()
