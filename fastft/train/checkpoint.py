"""The checkpoint a crashed or stopped run resumes from: checkpoint.pt in the run folder, rewritten (atomically)
after every finished epoch and removed when the run finishes.

It holds what the next epoch depends on: the model's and the optimizer's state, how many epochs are done, the
random number generators' states (Python's, NumPy's, torch's, each DataLoader's, per process), the figures
logged so far with the best epoch's weights, and the resolved recipe. A run resumed from it trains the same
remaining epochs with the same phases, learning-rate schedule and random draws as if it had never stopped.
"""
from __future__ import annotations

import io
import random
import threading
from pathlib import Path

import numpy as np
import torch

from fastft.atomic import write_bytes
from fastft.errors import UsageError
from fastft.fastai_internals import loader_rng
from fastft.run_folder import CHECKPOINT, RunFolder, claimant

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


def save(run: RunFolder, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(plain({"format": FORMAT, **state}), buffer)
    write_bytes(run.checkpoint, buffer.getvalue())


class BackgroundSaver:
    """checkpoint.pt written by a thread while the next epoch trains, so the accelerator does not wait for a
    disk write every epoch. One save at a time: a new one first waits for the last. An error of the thread (a
    full disk) is raised in the training thread at the next save or at `wait()`. The thread is not a daemon:
    the process finishes the file before it exits, and Ctrl-C (delivered to the main thread) never cuts it."""

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, run: RunFolder, state: dict) -> None:
        self.wait()

        def write():
            try:
                save(run, state)
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


def remove(run: RunFolder) -> None:
    run.checkpoint.unlink(missing_ok=True)


def load(run_dir: Path) -> dict | None:
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
    return state
