"""`train`: what a command line asks for, as one visible sequence.

A run whose recipe leaves nothing to choose is one `TrainingRun` (fastft/train/run.py); a stopped one is resumed.
`--strategy auto` chooses first, on the training images alone (issue 28: whether fine-tuning beats a linear probe on
a small set depends on the data), then trains what it chose:

1. the backbone, when the recipe lists several (--arch a,b,c or auto): k-fold probes on the trial's training images
   (fastft/train/backbone_choice.py), in the trial's set-up;
2. the strategy: a *trial* run of lp-ft with `--wise auto` on the training images less one fold of five
   (`carve_trial`), scored on that fold. WiSE-FT scores the probe's weights (weight 0), the fine-tuned ones (1) and the
   mixes between them at once, and keeps the probe unless a weight with fine-tuning in it beats it by more than two
   images (fastft/train/wise.py). Where the data has a validation split of its own (valid/, --holdout), the run
   itself is that lp-ft run and chooses on it, with no trial;
3. the final run: `--strategy probe` where the probe won, else `--strategy lp-ft --wise W`, on every training image.

The trial never reads the test split. It fine-tunes only where fine-tuning can be expected to be chosen: after a probe
that misses two or fewer held-out images, or so few that beating it takes fixing more than half of its misses (twice
the most fine-tuning fixed in any run measured), it stops (fastft/train/tie.py, `probe_out_of_reach`). The whole
command's time is estimated before the work and again as the backbone choice and the trial end
(fastft/train/estimate.py). `--budget` bounds the choice (fastft/train/budget.py): out of time, it trains no further
epoch and the candidates are scored on the weights it has; a budget too small for even its probe epoch is an error
naming the least that would do. recipe.toml names what was chosen (`fastft run` reproduces the run without the
trial), strategy.csv and strategy.png keep every candidate's figures (fastft/train/strategy_choice.py), and
metrics.json's `strategy_choice` the trial's.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from fastft.data.folders import split_files
from fastft.atomic import process_alive
from fastft.data.split import Split, seeded_split
from fastft.errors import Interrupted, InterruptedBeforeTraining, UsageError
from fastft.recipe import Recipe, asked_differences, selecting
from fastft.run_folder import claim_run_folder, release_claim
from fastft.schedules import LP_FT
from fastft.train.budget import Budget
from fastft.train.devices import resolve_device
from fastft.train.estimate import Counts, Forecast, duration, span
from fastft.train.distributed import Distributed
from fastft.train.run import TrainingRun
from fastft.train.setup import checked_before_work
from fastft.train.strategy_choice import StrategyChoice, as_probe, choosing, decision, has_validation_split

TRIAL_SHARE = 0.2  # the trial holds out one fold of five, as the backbone choice's k-fold probes do
TRIAL_PREFIX = "fastft-strategy-trial-"


def train(recipe: Recipe, out: str | None = None, measure_unaugmented: bool = False, callbacks=(),
          resume: Path | None = None) -> dict:
    """Run `recipe` (choosing first where it says auto), or (`resume`) continue a stopped run from its checkpoint;
    returns metrics.json's content (empty on ranks other than 0). Raises Interrupted after saving on Ctrl-C.
    `measure_unaugmented` adds final.train_acc_unaugmented (one more pass over the training images); `callbacks` are
    extra fastai callbacks for the Learner."""
    if resume is not None:
        return TrainingRun.resumed(resume, measure_unaugmented, callbacks).train().metrics
    recipe.check()  # the rules between its keys, before any work (a recipe built in code may not have met them yet)
    if not choosing(recipe):
        return TrainingRun(recipe, out, measure_unaugmented, callbacks).train().metrics
    checked_before_work(recipe, out)  # a usage error is one line, before any plan is printed
    device = resolve_device(recipe.device)
    dist = Distributed(device)
    # --out is claimed before the choice, so that a second run given the same folder fails now rather than after its
    # own choice; a run that fails before writing anything gives the claim (and a folder it made) back
    created = out is not None and not Path(out).exists()
    if out is not None:
        dist.from_main(lambda: claim_run_folder(out, recipe.name))
    try:
        began = time.perf_counter()
        choice = choose_strategy(recipe, device)
        metrics = TrainingRun(choice.recipe, out, measure_unaugmented, callbacks, choice=choice,
                              claimed=out is not None).train().metrics
        if dist.is_main and (said := choice.trial.get("estimate", {}).get("up_front")):
            print(f"the whole command took {duration(time.perf_counter() - began)} (estimated "
                  f"{span(*said)} up front)", flush=True)
        return metrics
    except BaseException:
        if out is not None and dist.is_main:
            release_claim(Path(out), created)
        raise


def carve_trial(split: Split, seed: int) -> Split:
    """The trial's split: TRIAL_SHARE of each class's training images held out as both its test and its validation
    split (the same images), the rest its training images; the data's own test split is never read. Classes too
    small to spare an image train on all theirs."""
    split.train, held_out = seeded_split(split.train, TRIAL_SHARE, seed + 3, "the strategy trial", strict=False)
    split.test, split.valid = held_out, dict(held_out)
    return split


def trial_split(recipe: Recipe) -> tuple[Split, int]:
    """(the trial's split, the run's test images), from the data's files alone (no image is read)."""
    split = split_files(Path(recipe.data).expanduser(), recipe)
    test = sum(map(len, split.test.values()))
    return carve_trial(split, recipe.seed), test


def too_few_to_hold_out(split: Split) -> str:
    """Why a trial could not score the candidates on `split` (its held-out fold would have fewer images than
    classes), or ""."""
    held_out = sum(map(len, split.valid.values()))
    if held_out >= len(split.classes):
        return ""
    return (f"{TRIAL_SHARE:.0%} of each class's training images is {held_out} image(s) in all, too few to score the "
            f"strategies on ({len(split.classes)} classes)")


def forecast_of(recipe: Recipe, split: Split, test: int) -> Forecast:
    """The whole command's estimate, before its speeds are timed: what it will pass over."""
    trial_train, held_out = (sum(map(len, part.values())) for part in (split.train, split.valid))
    candidates = ()
    if selecting(recipe):
        from fastft.train.backbone_choice import candidates as listed
        from fastft.train.prior import size_proxy

        parameters = [size_proxy(c.arch)[1] for c in listed(recipe)]  # a candidate's pass scales with its size
        candidates = tuple(n / parameters[0] for n in parameters)
    return Forecast(Counts(trial_train + held_out, trial_train, held_out, test, recipe.epochs, candidates))


def choose_strategy(recipe: Recipe, device) -> StrategyChoice:
    """The recipe with `--strategy auto` resolved: on the run's own validation split (the run is lp-ft with --wise
    auto), or by a trial run (a TrainingRun like any other, in a folder of its own, distributed when the run is)."""
    lp_ft = recipe.replace(strategy=LP_FT, wise="auto", budget=recipe.budget if selecting(recipe) else "")
    if recipe.data and has_validation_split(recipe):
        if recipe.budget and not selecting(recipe):
            raise UsageError(f"--budget {recipe.budget} bounds a trial run, and this data's validation split chooses the "
                             "strategy without one; drop --budget")
        return StrategyChoice(lp_ft, {}, 0, "the run's validation split", {}, None, asked_differences(recipe, lp_ft))
    split, test = trial_split(recipe) if recipe.data else (None, 0)
    if split is not None and (too_few := too_few_to_hold_out(split)):
        print(f"note: --strategy auto: {too_few}; the probe trains (fine-tuning is chosen only where it beats the "
              "probe on held-out images)", file=sys.stderr)
        probe = as_probe(recipe).replace(budget=recipe.budget if selecting(recipe) else "")
        return StrategyChoice(probe, {}, 0, too_few, {}, None, asked_differences(recipe, probe))
    # --budget bounds the whole choice on one clock from here: the backbone's, then the trial's epochs (a malformed one
    # fails here, before anything trains)
    budget = Budget.start(recipe.budget)
    dist = Distributed(device)
    folder = Path(dist.from_main(new_trial_folder)) / "trial"
    if dist.is_main:
        bounded = f"; --budget {recipe.budget} bounds it" if recipe.budget else ""
        print(f"choosing the strategy: a trial run of lp-ft on the training images less {TRIAL_SHARE:.0%} of each "
              f"class, which then score the probe, lp-ft and WiSE-FT's mixes of the two (the test split is not "
              f"read{bounded})", flush=True)
    # on every rank, so that every rank takes the same steps; rank 0's alone is timed and speaks
    forecast = forecast_of(recipe, split, test) if split is not None else None
    try:
        started = time.perf_counter()
        with indented_output(dist.is_main):  # the trial's lines, a block under the line above
            trial = TrainingRun(lp_ft.replace(keep="last", patience=0, tta=False, budget=""), str(folder),
                                carve=partial(carve_trial, seed=recipe.seed), budget=budget,
                                forecast=forecast).train()
        seconds = time.perf_counter() - started
        choice = dist.from_main(lambda: decision(recipe, trial, seconds))
        if forecast is not None and dist.is_main:
            fine_tuning = [row["seconds"] for row in choice.trial["epochs"][1:]]
            forecast.ended("trial", fine_tuned=choice.trial["weight"] > 0,
                           epoch_seconds=sum(fine_tuning) / len(fine_tuning) if fine_tuning else None)
            choice.trial["estimate"] = forecast.record()
        return choice
    except InterruptedBeforeTraining:  # its message says what it kept, and nothing of the trial's is to resume
        raise
    except Interrupted:  # the trial's own message would offer to resume the trial
        raise Interrupted("interrupted while choosing the strategy (its trial run), before the run began: nothing "
                          "to keep; start it again, or give --strategy lp-ft (or probe) to skip the trial") from None
    finally:
        if dist.is_main:
            shutil.rmtree(folder.parent, ignore_errors=True)


class IndentedLines(io.TextIOBase):
    """A text stream that writes each whole line to `out` indented (a progress bar's redrawn frames need a terminal,
    which this is not: the trial shows its epoch lines instead)."""

    def __init__(self, out, indent: str = "  "):
        self.out, self.indent, self.partial = out, indent, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self.out.write(f"{self.indent}{line}\n" if line else "\n")
        if lines:
            self.out.flush()
        return len(text)

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def indented_output(on: bool):
    """Standard output indented within the block (rank 0's; `on` False: as it is)."""
    if not on:
        yield
        return
    stream = IndentedLines(sys.stdout)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        if stream.partial:
            stream.write("\n")


def new_trial_folder() -> str:
    """A folder in the system's temporary folder for a trial, named after this process and machine. The folders of
    trials whose process is gone are removed first: a killed run (kill -9, a lost machine) never reached its
    `finally`, and each left a checkpoint behind (the size of the network three times over). The machine's name
    keeps a container that shares /tmp from taking another's running trial for a dead one."""
    host = socket.gethostname()
    for stale in Path(tempfile.gettempdir()).glob(f"{TRIAL_PREFIX}*"):
        pid, _, rest = stale.name.removeprefix(TRIAL_PREFIX).partition("@")
        if pid.isdigit() and rest.startswith(f"{host}@") and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)  # another user's is not ours: rmtree fails there, harmlessly
    return tempfile.mkdtemp(prefix=f"{TRIAL_PREFIX}{os.getpid()}@{host}@")

