"""An exponential moving average (EMA) of the weights while they train (`--ema D`), with timm's ModelEmaV3.

The weights after the last step of a short, noisy fine-tuning run sit wherever the last few batches left them; an
average over the last steps sits nearer the middle of where they wandered, and often generalises better (Polyak
averaging; timm trains its ImageNet weights with one). It is one network of the same shape, so the bundle, ONNX
and hub exports are unchanged.

timm's warm-up sets the decay at step t to min(D, 1 - (1 + t)^(-2/3)): a short run averages its last steps (after
80 steps the decay is 0.95, a window of about 20) rather than holding on to the weights it started from, and a long
one reaches D. The average starts at the first optimizer step: a probe epoch (lp-ft's first) takes none, and its
fitted head is where the average begins. At the end of every epoch the averaged weights are the ones measured,
kept (--keep best compares epochs by them) and saved; training goes on from the network's own weights, which the
checkpoint keeps too, so a resumed run continues both exactly.
"""
from __future__ import annotations

from fastai.callback.core import Callback
from timm.utils import ModelEmaV3

from fastft.fastai_internals import AFTER_RECORDER
from fastft.train.distributed import unwrapped
from fastft.train.epochs import _copy


class AveragedWeights(Callback):
    """Keeps the EMA through every phase of the fit and puts it in the network for each epoch's measurements;
    EpochLog (order AFTER_RECORDER) snapshots it at the epoch's end, then this puts the trained weights back."""

    order = AFTER_RECORDER + 1

    def __init__(self, decay: float):
        self.decay, self.average, self.steps, self.trained, self.restored = decay, None, 0, None, None

    def before_fit(self):  # every phase of a strategy is a fit; one average runs through them all
        if self.average is None:
            self.average = ModelEmaV3(unwrapped(self.learn.model), decay=self.decay, use_warmup=True)
            if self.restored is not None:  # a resumed run: the average as the stopped run left it
                self.average.module.load_state_dict(self.restored)

    def after_step(self):
        self.steps += 1
        self.average.update(unwrapped(self.learn.model), step=self.steps)

    def before_validate(self):
        if self.steps:  # before the first step (a probe epoch) the network's own weights are the average
            self.trained = _copy(self.learn.model)
            unwrapped(self.learn.model).load_state_dict(self.average.module.state_dict())

    def after_epoch(self):
        if self.trained is not None:
            unwrapped(self.learn.model).load_state_dict(self.trained)
            self.trained = None

    def training_weights(self, snapshot: dict) -> dict:
        """The weights training goes on from, at an epoch's end (`snapshot`: the measured ones, the average's)."""
        return self.trained if self.trained is not None else snapshot

    def state(self) -> dict:
        return {"steps": self.steps, "weights": _copy(self.average.module) if self.average else None}

    def measured(self, network_weights: dict) -> dict:
        """The weights an epoch measured: the average once it has taken a step, else the network's own."""
        return self.restored if self.steps > 0 else network_weights

    def restore(self, state: dict) -> None:
        self.steps, self.restored = state["steps"], state["weights"]
