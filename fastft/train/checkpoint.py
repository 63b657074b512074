"""The checkpoint a crashed or stopped run resumes from: checkpoint.pt in the run folder, rewritten (atomically)
after every finished epoch and removed when the run finishes.

It holds what the next epoch depends on: the model's and the optimizer's state, how many epochs are done, the
random number generators' states (Python's, NumPy's, torch's, each DataLoader's, per process), the figures
logged so far with the best epoch's weights, and the resolved recipe. A run resumed from it trains the same
remaining epochs with the same phases, learning-rate schedule and random draws as if it had never stopped.
"""
from __future__ import annotations

import copy
import io
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastft.atomic import write_bytes
from fastft.errors import UsageError
from fastft.fastai_internals import loader_rng
from fastft.run_folder import CHECKPOINT, RunFolder, claimant
from fastft.train.distributed import unwrapped

FORMAT = "fastft-checkpoint/1"


def random_state(dls) -> dict:
    """Every random number generator a training epoch draws from, in plain types (loadable with weights_only)."""
    numpy_state = np.random.get_state()
    kind, keys, position, has_gauss, cached_gaussian = numpy_state
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loaders": [loader_rng(dl).getstate() for dl in dls.loaders]}


def set_random_state(state: dict, dls) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for dl, saved in zip(dls.loaders, state["loaders"]):
        loader_rng(dl).setstate(_as_tuples(saved))


def _as_tuples(value):
    """random.setstate wants the tuples getstate gave; a round trip through a checkpoint may leave lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def plain(value):
    """`value` with NumPy scalars made Python numbers, recursively: fastai's schedules hand NumPy floats to the
    optimizer's hyperparameters, and a checkpoint loads with weights_only (no arbitrary classes)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


@dataclass(frozen=True)
class Checkpoint:
    """What a stopped run resumes from, written after every finished epoch. Its keys in the file are spelled here
    alone (`to_state`, `from_state`); whatever else remembers something between epochs (the epoch log, --ema's
    average, lp-ft's probe weights) puts it in `log` through its own state() and takes it back through restore()."""
    epoch: int  # epochs finished
    recipe: str  # the resolved recipe: recipe.toml's text
    model: dict  # the weights training goes on from
    optimizer: dict | None  # the optimizer's state, None before it has one
    random: list  # every process's random generators (random_state), in rank order
    log: dict  # the epoch log's state (fastft/train/epochs.py): figures so far, the best epoch, its callbacks' states

    def to_state(self) -> dict:
        """Plain types only: a checkpoint loads with weights_only (no arbitrary classes)."""
        return plain({"format": FORMAT, "epoch": self.epoch, "recipe": self.recipe, "model": self.model,
                      "optimizer": self.optimizer, "random": self.random, "log": self.log})

    @classmethod
    def from_state(cls, state: dict) -> "Checkpoint":
        return cls(epoch=state["epoch"], recipe=state["recipe"], model=state["model"], optimizer=state["optimizer"],
                   random=state["random"], log=state["log"])

    def apply(self, learn, rank: int, optimizer: bool) -> None:
        """Put the stopped run's state back into `learn`, just before its next epoch: the weights; the optimizer's
        state when the next epoch is in the middle of a phase (a new phase starts with a fresh one, as it did in the
        first run); this process's random generators last, so the next draw is the one the first run made."""
        unwrapped(learn.model).load_state_dict(self.model)
        if optimizer and self.optimizer is not None:
            learn.opt.load_state_dict(self.optimizer)
        set_random_state(self.random[rank if rank < len(self.random) else 0], learn.dls)


def save(run: RunFolder, saved: Checkpoint) -> None:
    buffer = io.BytesIO()
    torch.save(saved.to_state(), buffer)
    write_bytes(run.checkpoint, buffer.getvalue())


class BackgroundSaver:
    """checkpoint.pt written by a thread while the next epoch trains, so the accelerator does not wait for a
    disk write every epoch. One save at a time: a new one first waits for the last. An error of the thread (a
    full disk) is raised in the training thread at the next save or at `wait()`. The thread is not a daemon:
    the process finishes the file before it exits, and Ctrl-C (delivered to the main thread) never cuts it."""

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, run: RunFolder, saved: Checkpoint) -> None:
        self.wait()

        def write():
            try:
                save(run, saved)
            except BaseException as e:  # handed to the training thread
                self.error = e
        self.thread = threading.Thread(target=write, name="fastft-checkpoint")
        self.thread.start()

    def check(self) -> None:
        """Raise the last save's error if it has failed, without waiting for a save in progress: called before
        each epoch and batch, a failed checkpoint stops the run within a batch, not after another epoch."""
        if self.thread is not None and not self.thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Until the last save is on disk; raise its error, if it had one."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


class CheckpointWriter:
    """checkpoint.pt after every finished epoch: every process's random generators gathered, rank 0 writing in the
    background while the next epoch trains (BackgroundSaver)."""

    def __init__(self, run: RunFolder, dist, recipe_toml: str):
        self.run, self.dist, self.recipe_toml, self.saver = run, dist, recipe_toml, BackgroundSaver()

    def write(self, learn, epoch: int, weights: dict, log: dict) -> None:
        """The checkpoint after `epoch` finished epochs: `weights`, the ones training goes on from; `log`, the epoch
        log's state. Everything the next epoch changes in place is copied first."""
        randomness = self.dist.gather(random_state(learn.dls))  # every process's own generators
        if self.dist.is_main:
            optimizer = copy.deepcopy(learn.opt.state_dict()) if learn.opt is not None else None
            self.saver.save(self.run, Checkpoint(epoch=epoch, recipe=self.recipe_toml, model=weights,
                                                 optimizer=optimizer, random=randomness, log=log))

    def check(self) -> None:
        """Raise the last write's error (a full disk) without waiting: called before each epoch and batch."""
        self.saver.check()

    def wait(self) -> None:
        """Until the last write is on disk; raise its error, if it had one."""
        self.saver.wait()


def remove(run: RunFolder) -> None:
    run.checkpoint.unlink(missing_ok=True)


def load(run_dir: Path) -> Checkpoint | None:
    """The checkpoint of an unfinished run, checked; None for a run that wrote its recipe but no checkpoint yet
    (killed during its first epoch or its first checkpoint's write), which starts again from its recipe.
    Anything else is a one-line error; nothing is changed."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    path = run.checkpoint
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} does not exist; pass the folder of a run that stopped before it finished")
    if not path.is_file():
        if run.finished:
            raise UsageError(f"{run_dir} finished (its model is saved): there is nothing to resume; start a new run, "
                             f"e.g. `fastft run {run.recipe} --out NEW_FOLDER`")
        if claimant(run_dir) is not None:
            raise UsageError(f"{run_dir} stopped before it wrote its recipe (nothing trained, nothing to resume); start "
                             f"the run again with --out {run_dir}, which takes the folder over")
        if run.recipe.is_file():
            return None
        raise UsageError(f"{run_dir} is not a fastft run folder (no {CHECKPOINT}, no {run.recipe.name}); pass the "
                         "folder of a run that stopped before it finished")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or not a checkpoint: torch raises many types
        raise UsageError(f"{path} is truncated or corrupt ({type(e).__name__}); the run cannot resume from it; "
                         "start it again") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{path} is not a {FORMAT} checkpoint; the run cannot resume from it; start it again")
    try:
        return Checkpoint.from_state(state)
    except KeyError as e:
        raise UsageError(f"{path} lacks its {e} part; the run cannot resume from it; start it again") from None
