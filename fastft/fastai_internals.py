"""Every place fastft relies on fastai behaviour that is private (a leading underscore) or undocumented.

Each is one small, named piece here, with the fastai behaviour it depends on; the rest of fastft uses these
names and never the private ones. tests/test_fastai_internals.py checks each behaviour directly, so a fastai
upgrade that changes one fails there first, with a name that says what broke. Importing this module imports
fastai (not fastai.distributed, until a distributed hook is asked for): only code that trains does.
"""
from __future__ import annotations

from fastai.optimizer import OptimWrapper


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


def __getattr__(name: str):
    """LoaderHookTrainer and BroadcastHookDL, built on first use: their fastai base classes live in
    fastai.distributed, which imports accelerate, seconds a single-process run does not spend."""
    if name not in ("LoaderHookTrainer", "BroadcastHookDL"):
        raise AttributeError(name)
    from fastai.distributed import DistributedDL, DistributedTrainer

    class LoaderHookTrainer(DistributedTrainer):
        """fastai's DistributedTrainer wraps every DataLoader it trains or validates on through the private
        `_wrap_dl(dl)` (in before_fit, before_train and before_validate). This routes that to `wrap_loader`."""

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
