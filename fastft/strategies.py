"""Freeze/unfreeze schedules over one set of building blocks: the stage groups of `model.stage_splitter`.

Parameter groups run stem, stage 1 ... stage N, head. `lr` is always the head's peak learning rate;
a slice(lr / spread, lr) spreads rates geometrically from the stem up to the head. `epochs` is the
total across phases. BatchNorm: fastai's convention (`train_bn`) keeps BatchNorm layers of frozen
stages training (their affine weights and running statistics adapt to the new images, which helps
when the body is frozen). Everything else in a frozen stage stays exactly as loaded. `keras` follows
Keras instead: BatchNorm of frozen stages is frozen too, statistics included.
"""
from __future__ import annotations

from functools import partial

# name -> (what it does, default head LR when the recipe leaves lr at 0)
STRATEGIES = {
    "fine-tune": ("fastai's fine_tune: the head alone for --freeze-epochs, then every stage with "
                  "discriminative LRs (lr/200 at the stem .. lr/2 at the head); one-cycle, Adam", 1e-2),
    "d2l": ("d2l 13.2 as printed: every layer trains from the start, SGD without momentum, weight decay "
            "1e-3, head at 10x the body's LR, constant rate", 0.064),
    "keras": ("the Keras guide: freeze the backbone, train the head at lr, then unfreeze the top "
              "--unfreeze stages at lr/100; constant-rate Adam, BatchNorm of frozen stages frozen", 1e-3),
    "gradual": ("ULMFiT's gradual unfreezing: one more stage group per phase from the top down, "
                "discriminative LRs (lr/100 .. lr); one-cycle, Adam", 1e-2),
    "scratch": ("random initialisation, every layer at one LR; one-cycle, Adam (d2l's baseline)", 1e-2),
}
# fine-tune and gradual default to 1e-2, not fastai's 2e-3: a small dataset gives the new head few
# steps, and on the hotdog set 2e-3 left it under-trained (bench/strategies.py; README).
# scratch: on CIFAR-10 (10,000 images, 3 epochs) one-cycle Adam peaking at 1e-2 beat 5e-3 and 2e-3
# (0.510, 0.497, 0.479 test acc; issue 7 notes).
# d2l trains with lr 5e-5 on a loss *summed* over 128 images; fastft's loss is the batch mean, so
# the same steps take 128 x 5e-5 = 6.4e-3 for the body and 10x that, 0.064, for the head.


def default_lr(strategy: str) -> float:
    return STRATEGIES[strategy][1]


def phases(strategy: str, epochs: int, freeze_epochs: int, n_groups: int) -> list[tuple[int, int]]:
    """[(trainable groups counted from the head, epochs)], summing to `epochs`. 0 groups means all."""
    if strategy in ("d2l", "scratch"):
        return [(0, epochs)]
    if strategy in ("fine-tune", "keras"):
        frozen = min(freeze_epochs, epochs - 1)
        return ([(1, frozen)] if frozen else []) + [(0, epochs - frozen)]
    if strategy == "gradual":
        steps = min(epochs, n_groups)
        return [(k, 1) for k in range(1, steps)] + [(0, epochs - steps + 1)]
    raise ValueError(strategy)


def _freeze_all_but(learn, groups: int) -> None:
    learn.freeze_to(-groups) if groups else learn.unfreeze()


def fine_tune(learn, lr: float, epochs: int, freeze_epochs: int, **_):
    for groups, n in phases("fine-tune", epochs, freeze_epochs, 0):
        _freeze_all_but(learn, groups)
        if groups:
            learn.fit_one_cycle(n, slice(lr), pct_start=0.99)
        else:
            learn.fit_one_cycle(n, slice(lr / 200, lr / 2), pct_start=0.3, div=5.0)


def d2l(learn, lr: float, epochs: int, **_):
    from fastai.optimizer import SGD

    learn.opt_func, learn.opt = partial(SGD, mom=0.0, decouple_wd=False), None  # torch SGD: L2 decay
    learn.unfreeze()
    n_groups = len(learn.opt.param_lists)
    learn.fit(epochs, lr=[lr / 10] * (n_groups - 1) + [lr], wd=1e-3)


def keras(learn, lr: float, epochs: int, freeze_epochs: int, unfreeze: int, **_):
    from fastai.callback.training import BnFreeze

    learn.train_bn, learn.opt = False, None  # frozen means frozen, BatchNorm included, as in Keras
    learn.add_cb(BnFreeze())
    try:
        for groups, n in phases("keras", epochs, freeze_epochs, 0):
            _freeze_all_but(learn, groups or unfreeze + 1)  # + 1: the head
            learn.fit(n, lr=lr if groups else lr / 100)
    finally:
        learn.remove_cb(BnFreeze)


def gradual(learn, lr: float, epochs: int, **_):
    learn.create_opt()
    for groups, n in phases("gradual", epochs, 0, len(learn.opt.param_lists)):
        _freeze_all_but(learn, groups)
        learn.fit_one_cycle(n, slice(lr / 100, lr))


def scratch(learn, lr: float, epochs: int, **_):
    learn.unfreeze()
    learn.fit_one_cycle(epochs, lr)


SCHEDULES = {"fine-tune": fine_tune, "d2l": d2l, "keras": keras, "gradual": gradual, "scratch": scratch}


def train_with(strategy: str, learn, **settings) -> None:
    SCHEDULES[strategy](learn, **settings)
