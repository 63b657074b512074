"""Training a strategy's phases (the records themselves, declarative, are in fastft/schedules.py).

`fit` runs the phases in turn on a Learner, resumable mid-phase; a probe phase fits the head on the frozen
backbone's features instead of training it (fastft/train/probe.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from fastai.callback.core import Callback, CancelTrainException

from fastft.fastai_internals import AFTER_PROGRESS
from fastft.schedules import CONSTANT, ONE_CYCLE, Phase, Strategy
from fastft.train.probe import FrozenBatchNormStatistics, fit_probe


@dataclass
class Progress:
    """What a strategy's fit and the run's epoch log (fastft/train/epochs.py) tell each other while training."""
    stop: bool = False  # early stopping: the log asks the strategy to skip the phases left
    probe: dict | None = None  # a probe epoch: the fitted head's figures on the training images, for the log


def fit(strategy: Strategy, learn, phases: list[Phase], context, progress: Progress | None = None,
        start_epoch: int = 0, restore=None) -> None:
    """Train `strategy`'s phases in turn (`context`: the run's RunContext). A resumed run passes the epochs already done
    (`start_epoch`) and `restore(learn, optimizer)`, called once just before the first epoch still to run:
    phases done are skipped, and a phase stopped in its middle continues at its next epoch on the same
    schedule (fastai's `start_epoch`). Early stopping (`progress.stop`) skips the phases left."""
    progress = progress or Progress()
    strategy.setup(learn)
    if strategy.frozen_bn_statistics:
        learn.add_cb(FrozenBatchNormStatistics())
    try:
        first = 0  # the phase's first epoch, counted from 0 across phases
        for phase in phases:
            done_here, first = max(0, min(phase.epochs, start_epoch - first)), first + phase.epochs
            if done_here == phase.epochs or progress.stop:
                continue
            learn.freeze_to(-phase.trains) if phase.trains else learn.unfreeze()
            if restore is not None:
                restore(learn, optimizer=done_here > 0)
                restore = None
            if phase.schedule == ONE_CYCLE:
                learn.fit_one_cycle(phase.epochs, phase.lr, pct_start=phase.pct_start, div=phase.div, wd=phase.wd,
                                    start_epoch=done_here)
            elif phase.schedule == CONSTANT:
                learn.fit(phase.epochs, lr=phase.lr, wd=phase.wd, start_epoch=done_here)
            else:
                fit_probe_epoch(learn, context, progress)
    finally:
        strategy.teardown(learn)
        learn.remove_cbs(learn.cbs.filter(lambda cb: isinstance(cb, FrozenBatchNormStatistics)))


def fit_probe_epoch(learn, context, progress: Progress) -> None:
    """One epoch that fits the head as a linear probe instead of training it, then measures the test split
    like any epoch. The epoch's training figures are the probe's, on the training images (`progress.probe`,
    read by the run's EpochLog)."""
    class ProbeInsteadOfTraining(Callback):
        order = AFTER_PROGRESS  # every other before_train has run (DDP wraps, bars open), no batch has

        def before_train(self):
            progress.probe = fit_probe(learn, context)
            raise CancelTrainException

    try:
        learn.fit(1, lr=0.0, cbs=ProbeInsteadOfTraining())
    finally:
        progress.probe = None
