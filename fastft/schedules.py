"""Fine-tuning schedules: one declarative record per strategy, in the spirit of Lightning's `BaseFinetuning`.

A `Strategy` holds everything about one schedule: its help text, its default learning rate, whether it
starts from random weights, the settings it takes (`StrategySetting`s: each becomes a recipe key and a
command-line option, checked against its minimum), its phases (which parameter groups train, for how many
epochs, at which rates, on which schedule) and any set-up it needs (an optimizer of its own, frozen
BatchNorm). Adding a strategy, or a setting of one, is adding one record here; the recipe, its checks, the CLI
help, the run, `compare` and the LR finder all read it from there. fastft/train/strategies.py trains a record's
phases.

Parameter groups are the stage groups of `model.stage_splitter`: stem, stage 1 ... stage N, head. `lr` is
always the head's peak learning rate; a slice(lr / spread, lr) spreads rates geometrically from the stem up
to the head. `epochs` is the total across phases. BatchNorm: fastai's convention (`train_bn`) keeps the
BatchNorm layers of frozen stages training (their affine weights and running statistics adapt to the new
images). Everything else in a frozen stage stays exactly as loaded. `keras` follows Keras instead: BatchNorm
of frozen stages is frozen too, statistics included.

Light to import (no fastai, nothing of fastft's but the ground floor): the recipe and the CLI read the records for
--help. It sits below the recipe, data and training layers, and imports none of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from fastft.values import number_or_word


ONE_CYCLE, CONSTANT, PROBE = "one-cycle", "constant", "probe"


@dataclass(frozen=True)
class Phase:
    """Part of a schedule: `epochs` epochs training the top `trains` parameter groups (0: all of them)."""
    epochs: int
    trains: int
    lr: float | slice | list  # one rate, a geometric slice from the stem to the head, or one rate per group
    schedule: str = ONE_CYCLE  # ONE_CYCLE (fastai's fit_one_cycle), CONSTANT (fastai's fit) or PROBE (fastft/train/probe.py)
    pct_start: float = 0.25  # one-cycle: share of the steps spent warming up
    div: float = 25.0  # one-cycle: the rate starts at peak / div
    wd: float | None = None  # None: the recipe's weight decay

    def describe_groups(self) -> str:
        if not self.trains:
            return "all stages"
        return "the head only" if self.trains == 1 else f"the top {self.trains - 1} stage(s) and the head"

    def describe(self) -> str:
        """What the phase trains and how: 'the head only, one-cycle to peak lr 1.0e-02'."""
        rate = self.lr
        if isinstance(rate, slice):
            rate = f"{rate.stop:.1e}" if rate.start is None else f"{rate.start:.1e} (stem) .. {rate.stop:.1e} (head)"
        elif isinstance(rate, list):
            rate = f"{rate[0]:.1e} (body), {rate[-1]:.1e} (head)"
        else:
            rate = f"{rate:.1e}"
        if self.schedule == PROBE:
            return "the head fitted on the frozen backbone's features (a linear probe)"
        return f"{self.describe_groups()}, {'one-cycle to peak' if self.schedule == ONE_CYCLE else 'constant'} lr {rate}"


@dataclass(frozen=True)
class StrategySetting:
    """A setting some strategies take: a recipe key (and --flag) of that name, of any type. Declared once and listed
    by every strategy record that reads it; its help names those strategies. `type` is the recipe field's type;
    `parse(value, source)` reads a value from a recipe file or the command line, or raises a UsageError naming
    `source` (None: the type's own check and `minimum`); `only_its_strategies`: a value other than the default is an
    error with a strategy that does not take it, where it would do nothing without a word (`title` names the setting
    in that error)."""
    name: str
    default: object
    help: str
    minimum: int | None = 0
    type: str = "int"
    parse: Callable | None = None
    only_its_strategies: bool = False
    title: str = ""


FREEZE_EPOCHS = StrategySetting("freeze_epochs", 1, "epochs that train only the head (part of --epochs).")
UNFREEZE = StrategySetting("unfreeze", 2, "stages unfrozen from the top after the head-only phase.", minimum=1)
WISE = StrategySetting(
    "wise", "off", "WiSE-FT: keep (1 - W) x the probe's weights + W x the fine-tuned ones, one network; auto: W chosen "
    "on the validation split (0.5 without one); off: the fine-tuned weights.", minimum=None, type="float | str",
    parse=lambda value, source: number_or_word("wise", value, source, 0, 1, words=("off", "auto"), meaning="off, "
                                               "auto, or a weight from 0 (the probe) to 1 (the fine-tuned network)"),
    only_its_strategies=True, title="the WiSE-FT weight")


def describe_plan(phases: list[Phase]) -> str:
    """'epoch 1: the head only, ...; epochs 2-5: all stages, ...': what each phase will do, epochs counted 1..N."""
    parts, first = [], 1
    for phase in phases:
        last = first + phase.epochs - 1
        parts.append(f"{'epoch' if first == last else 'epochs'} {first}{'' if first == last else f'-{last}'}: "
                     f"{phase.describe()}")
        first = last + 1
    return "; ".join(parts)


@dataclass(frozen=True)
class Strategy:
    """A schedule over the stage groups. Subclasses override `phases` and, when they need one, `setup`."""
    help: str
    default_lr: float  # the head's peak rate when the recipe leaves lr at 0
    random_init: bool = False  # starts from random weights whatever --weights / --pretrained say
    head: str = "fastai"  # the head's shape, a name in fastft/deploy/network.py's HEADS
    settings: tuple[StrategySetting, ...] = field(default=())  # what it takes beyond lr and epochs
    # BatchNorm keeps the running statistics the weights were loaded (and a probe fitted) with, while its affine
    # weights train (fastft/train/probe.py's FrozenBatchNormStatistics, added by fastft/train/strategies.py's fit)
    frozen_bn_statistics: bool = False
    trains_by_steps: bool = True  # False: fitted in one solve (the probe), with no training steps to average (--ema)

    def phases(self, lr: float, epochs: int, n_groups: int, options: dict) -> list[Phase]:
        """The schedule: `lr` the head's peak rate, `options` this strategy's settings by name."""
        raise NotImplementedError

    def options(self, recipe) -> dict:
        """This strategy's settings, as the recipe gives them."""
        return {s.name: getattr(recipe, s.name) for s in self.settings}

    def plan(self, learn, lr: float, recipe, epochs: int | None = None) -> list[Phase]:
        """The phases for this Learner (its splitter says how many parameter groups there are) and the recipe's
        settings; `epochs` instead of the recipe's, if given."""
        return self.phases(lr, epochs or recipe.epochs, len(learn.splitter(learn.model)), self.options(recipe))

    def setup(self, learn) -> None:
        """Change the Learner before the first phase (optimizer, BatchNorm); undone by `teardown`."""

    def teardown(self, learn) -> None:
        pass


def head_epochs(epochs: int, freeze_epochs: int) -> int:
    """Epochs of a head-only phase: at most freeze_epochs, and always one epoch left for the rest."""
    return min(freeze_epochs, epochs - 1)


class FineTune(Strategy):
    """fastai's `fine_tune`: the head alone, then every stage with discriminative rates (fastai's lr_mult 100,
    div 5, base rate halved)."""

    def phases(self, lr, epochs, n_groups, options):
        frozen = head_epochs(epochs, options["freeze_epochs"])
        head = [Phase(frozen, 1, slice(lr), pct_start=0.99)] if frozen else []
        return head + [Phase(epochs - frozen, 0, slice(lr / 200, lr / 2), pct_start=0.3, div=5.0)]


class D2L(Strategy):
    """d2l 13.2's `train_fine_tuning`: SGD without momentum, L2 weight decay 1e-3, the head at 10x the body."""

    def phases(self, lr, epochs, n_groups, options):
        return [Phase(epochs, 0, [lr / 10] * (n_groups - 1) + [lr], CONSTANT, wd=1e-3)]

    def setup(self, learn):
        from fastai.optimizer import SGD

        learn.opt_func, learn.opt = partial(SGD, mom=0.0, decouple_wd=False), None  # torch SGD: L2 decay


class Keras(Strategy):
    """The Keras transfer-learning guide: frozen backbone (BatchNorm included), then the top stages at lr/100."""

    def phases(self, lr, epochs, n_groups, options):
        frozen = head_epochs(epochs, options["freeze_epochs"])
        head = [Phase(frozen, 1, lr, CONSTANT)] if frozen else []
        return head + [Phase(epochs - frozen, min(options["unfreeze"] + 1, n_groups), lr / 100, CONSTANT)]  # + 1: the head

    def setup(self, learn):
        from fastai.callback.training import BnFreeze

        learn.train_bn, learn.opt = False, None  # frozen means frozen, BatchNorm included, as in Keras
        learn.add_cb(BnFreeze())

    def teardown(self, learn):
        from fastai.callback.training import BnFreeze

        learn.remove_cb(BnFreeze)


class Gradual(Strategy):
    """ULMFiT's gradual unfreezing: one more stage group per epoch, from the top down, then everything."""

    def phases(self, lr, epochs, n_groups, options):
        steps = min(epochs, n_groups)
        return [Phase(1, k, slice(lr / 100, lr)) for k in range(1, steps)] + [Phase(epochs - steps + 1, 0, slice(lr / 100, lr))]


class Probe(Strategy):
    """A linear probe: the backbone stays as loaded, the linear head is fitted on its features. One epoch."""

    def phases(self, lr, epochs, n_groups, options):
        return [Phase(1, 1, 0.0, PROBE)]


class LinearProbeThenFineTune(Strategy):
    """LP-FT (Kumar et al., ICLR 2022): the head fitted as a linear probe in the first epoch, then every stage
    fine-tuned from it with discriminative rates (lr/100 at the stem .. lr at the head), one-cycle. BatchNorm
    keeps the statistics the probe was fitted with: batch statistics of small, augmented batches would move
    every feature the head was fitted on (its affine weights still train)."""

    def phases(self, lr, epochs, n_groups, options):
        probe = [Phase(1, 1, 0.0, PROBE)]
        return probe + ([Phase(epochs - 1, 0, slice(lr / 100, lr), pct_start=0.1)] if epochs > 1 else [])


class Scratch(Strategy):
    """Random initialisation, every layer at one rate."""

    def phases(self, lr, epochs, n_groups, options):
        return [Phase(epochs, 0, lr)]


STRATEGIES: dict[str, Strategy] = {
    # 1e-2, not fastai's 2e-3: a small dataset gives the new head few steps, and on the hotdog set 2e-3 left
    # it under-trained (bench/strategies.py; README).
    "fine-tune": FineTune("fastai's fine_tune: the head alone for --freeze-epochs, then every stage with "
                          "discriminative LRs (lr/200 at the stem .. lr/2 at the head); one-cycle, Adam", 1e-2,
                          settings=(FREEZE_EPOCHS,)),
    # d2l trains with lr 5e-5 on a loss *summed* over 128 images; fastft's loss is the batch mean, so the same
    # steps take 128 x 5e-5 = 6.4e-3 for the body and 10x that, 0.064, for the head.
    "d2l": D2L("d2l 13.2 as printed: every layer trains from the start, SGD without momentum, weight decay "
               "1e-3, head at 10x the body's LR, constant rate", 0.064),
    "keras": Keras("the Keras guide: freeze the backbone, train the head at lr, then unfreeze the top "
                   "--unfreeze stages at lr/100; constant-rate Adam, BatchNorm of frozen stages frozen", 1e-3,
                   settings=(FREEZE_EPOCHS, UNFREEZE)),
    "gradual": Gradual("ULMFiT's gradual unfreezing: one more stage group per phase from the top down, "
                       "discriminative LRs (lr/100 .. lr); one-cycle, Adam", 1e-2),
    # on CIFAR-10 (10,000 images, 3 epochs) one-cycle Adam peaking at 1e-2 beat 5e-3 and 2e-3
    # (0.510, 0.497, 0.479 test acc)
    "probe": Probe("a linear probe: the backbone as loaded, a linear head fitted on its features of the training "
                   "images (and their mirror images): one pass of the backbone over them, whatever --epochs says (on "
                   "2 CPU cores about 25 images a second for tf_efficientnet_lite0 at 224 px: 3 minutes for 4,300 "
                   "photos; a cached pass, seconds)", 0.0,
                   head="linear", trains_by_steps=False),
    "lp-ft": LinearProbeThenFineTune("LP-FT: epoch 1 fits a linear head as a probe, the other epochs fine-tune every "
                                     "stage from it (lr/100 at the stem .. lr at the head); one-cycle, Adam", 1e-3,
                                     head="linear", settings=(WISE,), frozen_bn_statistics=True),
    "scratch": Scratch("random initialisation, every layer at one LR; one-cycle, Adam (d2l's baseline)", 1e-2,
                       random_init=True),
}


# the two strategies --strategy auto chooses between (fastft/train/pipeline.py), and the one a probe learner is built
# with wherever fastft probes a backbone's frozen features (the backbone choice, the label check)
LINEAR_PROBE, LP_FT = "probe", "lp-ft"

# `--strategy auto` is not a schedule but a choice between two of them, made on the training images before the run
# trains (fastft/train/strategy_choice.py): the run then trains what was chosen, and recipe.toml names it.
AUTO = "auto"
AUTO_HELP = ("the probe or lp-ft (mixed with its probe by WiSE-FT), whichever scores best on training images held out "
             "from a trial run (a validation split, when the run has one); fine-tuning must beat the probe to be chosen")


def strategy_settings() -> dict[str, tuple[StrategySetting, list[str]]]:
    """Every strategy setting by name, with the strategies that take it: the recipe's keys for them."""
    found: dict[str, tuple[StrategySetting, list[str]]] = {}
    for name, strategy in STRATEGIES.items():
        for setting in strategy.settings:
            found.setdefault(setting.name, (setting, []))[1].append(name)
    return found
