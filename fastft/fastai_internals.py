"""Every place fastft relies on fastai behaviour that is private (a leading underscore) or undocumented.

Each is one small, named piece here, with the fastai behaviour it depends on; the rest of fastft uses these
names and never the private ones. tests/test_fastai_internals.py checks each behaviour directly, so a fastai
upgrade that changes one fails there first, with a name that says what broke. Importing this module imports
fastai (not fastai.distributed, until a distributed hook is asked for): only code that trains does.
"""
from __future__ import annotations

import contextlib
import random
from pathlib import Path

from fastai.callback.core import Callback, TrainEvalCallback
from fastai.callback.progress import ProgressCallback
from fastai.learner import Recorder
from fastai.optimizer import OptimWrapper, set_item_pg

# Where fastft's callbacks run among fastai's own (a Callback's `order`: lower runs first at every event). fastai
# documents `order` but not the numbers of its own callbacks; these are placed relative to them.
AFTER_TRAINING_MODE = TrainEvalCallback.order + 15  # TrainEvalCallback's before_train puts the model in train mode
AFTER_RECORDER = Recorder.order + 5  # Recorder's after_epoch has the epoch's figures
AFTER_PROGRESS = ProgressCallback.order + 5  # ProgressCallback's before_train has opened its bar


def train_only(transform):
    """Apply `transform` to training items/batches only. fastai's Transform runs when its `split_idx` is
    None or equals the one the pipeline is called with: 0 for the training set, 1 for validation."""
    transform.split_idx = 0
    return transform


def valid_only(transform):
    """Apply `transform` to validation (test) items only: split_idx 1 (see `train_only`)."""
    transform.split_idx = 1
    return transform


def release_last_batch(learn) -> None:
    """Drop the tensors of the last batch a Learner holds (dl, xb, yb, pred, loss), so they are not pickled
    into model.pkl. fastai's private `Learner._end_cleanup` does exactly that at the end of a fit that
    finishes; a fit stopped by Ctrl-C skips it."""
    learn._end_cleanup()


def plain_loader(dl):
    """The DataLoader itself: during a fit of several processes fastai's DistributedTrainer has wrapped the training
    and test loaders in DistributedDLs, which keep the DataLoader they wrap as `dl`."""
    return getattr(dl, "dl", dl)


def loader_rng(dl) -> random.Random:
    """The generator a fastai DataLoader shuffles (and draws random crops) with: its `rng` attribute, seeded when
    the DataLoader is made (a wrapped one's: see `plain_loader`)."""
    return plain_loader(dl).rng


def labelled_loader(dls, items, with_labels: bool = True, **kwargs):
    """`dls.test_dl(items, with_labels)`: a DataLoader over `items` through the test split's transforms, also while
    the test loader is wrapped for several processes (a DistributedDL does not pass `new` through to its `dl`)."""
    from fastai.data.core import test_set

    test = plain_loader(dls.valid)
    return test.new(test_set(test.dataset, items, with_labels=with_labels), **kwargs)


@contextlib.contextmanager
def finder_saves_under(learn, folder: Path):
    """fastai's `lr_find` saves the model before it starts and loads it back when it ends, as
    `learn.path / learn.model_dir / _tmp.pth`: point `learn.path` at `folder` for the duration (a Learner's path is
    the data's folder, which may be read-only), then remove the temporary folder it leaves, empty."""
    saved, learn.path = learn.path, folder
    try:
        yield
    finally:
        learn.path = saved
        with contextlib.suppress(OSError):
            (folder / learn.model_dir).rmdir()


def set_workers(dl, count: int) -> None:
    """Make `dl`'s next passes load in `count` worker processes. fastai's DataLoader hands its num_workers to the
    private torch loader it iterates through (`fake_l`), which starts that many at every pass over the data; each
    worker takes every count-th batch. DataLoaders made from `dl` (`new`, `test_dl`) start with the same count."""
    dl.fake_l.num_workers = count


class HyperHookOptimWrapper(OptimWrapper):
    """fastai's OptimWrapper.set_hyper(key, value) spreads a value or a slice over the parameter groups, then
    stores the values through the private `_set_hyper(key, values)`. This routes that one step to
    `store_hyper`, for an optimizer whose torch groups are not one per fastai group (FusedAdam)."""

    def _set_hyper(self, k, v):
        self.store_hyper(k, v)

    def store_hyper(self, key: str, values: list) -> None:
        raise NotImplementedError

    def set_group_hyper(self, group: dict, key: str, value) -> None:
        """Set fastai hyperparameter `key` (lr, mom, sqr_mom, wd, eps) in one torch parameter group, under torch's
        name for it: OptimWrapper's `bwd_map` maps fastai's names to torch's, and fastai's `set_item_pg` writes
        the value there (`mom` into betas[0], `sqr_mom` into betas[1])."""
        set_item_pg(group, self.bwd_map[key], value)


def __getattr__(name: str):
    """LoaderHookTrainer and BroadcastHookDL, built on first use: their fastai base classes live in
    fastai.distributed, which imports accelerate, seconds a single-process run does not spend."""
    if name not in ("LoaderHookTrainer", "BroadcastHookDL"):
        raise AttributeError(name)
    from fastai.distributed import DistributedDL, DistributedTrainer

    class LoaderHookTrainer(DistributedTrainer):
        """fastai's DistributedTrainer wraps every DataLoader it trains or validates on through the private
        `_wrap_dl(dl)` (in before_fit, before_train and before_validate). This routes that to `wrap_loader`.
        Its own __init__ builds a new Accelerator; this takes one already made, and sets the two attributes the
        trainer's methods read (`accelerator`, `sync_bn`)."""

        def __init__(self, accelerator, sync_bn: bool):
            Callback.__init__(self)
            self.accelerator, self.sync_bn = accelerator, sync_bn

        def _wrap_dl(self, dl):
            return self.wrap_loader(dl)

        def wrap_loader(self, dl):
            raise NotImplementedError

    class BroadcastHookDL(DistributedDL):
        """fastai's DistributedDL.get_idxs shares rank 0's shuffled order with every rank through the private
        `_broadcast(indices, rank)` (a CUDA tensor broadcast: NCCL only). This routes that to `broadcast_order`."""

        def _broadcast(self, t, rank):
            return self.broadcast_order(list(t), rank)

        def broadcast_order(self, indices: list[int], rank: int) -> list[int]:
            raise NotImplementedError

    globals().update(LoaderHookTrainer=LoaderHookTrainer, BroadcastHookDL=BroadcastHookDL)
    return globals()[name]
