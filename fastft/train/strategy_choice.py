"""Choosing the strategy on the user's own training images (`--strategy auto`).

Whether fine-tuning beats a linear probe on a small set depends on the data (issue 28: on the three sets fastft's
default was chosen on, lp-ft beat a probe by 0.02-0.03; on three real photo sets it never saw, the probe beat lp-ft
by 0.01-0.05). So `auto` measures both on images the run did not train on, and lets fine-tuning in only where it wins.

One run of lp-ft with `--wise auto` measures every candidate at once: on its validation split WiSE-FT scores the
probe's weights (weight 0: the probe epoch), the fine-tuned ones (1: lp-ft) and the mixes between them, and keeps the
probe unless a weight with fine-tuning in it beats it by more than two images (fastft/train/wise.py). Where does that
validation split come from?
- The run has one (valid/, or --holdout): `auto` is that run, lp-ft with --wise auto; the choice is made on it.
- It has none (the usual folder of photos): a *trial* run first. lp-ft trains on the training images less one fold
  of five (TRIAL_SHARE, stratified and seeded), the fold is its validation split, and the test split is never read.
  The run proper then trains the choice on every training image: `--strategy probe` when the probe won (seconds),
  else `--strategy lp-ft --wise W`. The trial costs about 0.8 of a run's training. `--budget` bounds it
  (fastft/train/budget.py): out of time, it trains no further epoch (EpochLog.should_stop) and the candidates are
  scored on the weights it has; a budget too small for even its probe epoch is an error naming the least that would
  do.
recipe.toml names what was chosen (`fastft run` reproduces the run without the trial), strategy.csv and strategy.png
keep every candidate's figures, and metrics.json's `strategy_choice` the trial's. A backbone chosen too (--arch a,b,c)
is chosen by the trial, on its training images, and selection.csv comes with it.
"""
from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from fastft.errors import Interrupted, UsageError
from fastft.recipe import Recipe
from fastft.run_folder import FILES
from fastft.schedules import AUTO


class StrategyChoice(NamedTuple):
    """What `--strategy auto` decided, and on what."""
    recipe: Recipe  # the run's recipe with the choice in place
    scores: dict  # mixing weight (str) -> (accuracy, loss) on the held-out images; {} when the run itself chooses
    images: int  # how many held-out images scored them
    chosen_on: str  # in words
    trial: dict  # metrics.json's `strategy_choice`: the trial's figures ({} without a trial)
    selection: dict  # the trial's selection.csv and .png (name -> content), when it chose a backbone too


def choosing(recipe: Recipe) -> bool:
    return recipe.strategy == AUTO


def check(recipe: Recipe) -> None:
    if recipe.wise != "off":
        raise UsageError(f"--strategy auto chooses the WiSE-FT weight itself; drop --wise {recipe.wise} (or give "
                         "--strategy lp-ft with it)")


def has_validation_split(recipe: Recipe) -> bool:
    """Whether the recipe's data has a validation split of its own, without reading any image."""
    from fastft.data.folders import split_files
    from fastft.data.split import holdout_share

    if recipe.holdout == 0:
        return bool(recipe.data) and not recipe.labels and (Path(recipe.data).expanduser() / "valid").is_dir()
    split = split_files(Path(recipe.data).expanduser(), recipe)
    return bool(split.valid) or bool(holdout_share(recipe.holdout, split, recipe.limit))


def too_few_to_hold_out(recipe: Recipe) -> str:
    """Why a trial could not score the candidates (its held-out fold would have fewer images than classes), or ""."""
    from fastft.data.folders import split_files
    from fastft.data.split import TRIAL_SHARE

    split = split_files(Path(recipe.data).expanduser(), recipe, trial=True)
    held_out = sum(map(len, split.valid.values()))
    if held_out >= len(split.classes):
        return ""
    return (f"{TRIAL_SHARE:.0%} of each class's training images is {held_out} image(s) in all, too few to score the "
            f"strategies on ({len(split.classes)} classes)")


def choose(recipe: Recipe, run_training, device) -> StrategyChoice:
    """The recipe with `--strategy auto` resolved. `run_training(recipe, out)` trains the trial run (train() itself:
    a run like any other, in a folder of its own, distributed when the run is)."""
    from fastft.train.backbone_choice import selecting
    from fastft.train.distributed import Distributed

    check(recipe)
    lp_ft = recipe.replace(strategy="lp-ft", wise="auto")
    if recipe.data and has_validation_split(recipe):
        if recipe.budget and not selecting(recipe):
            raise UsageError(f"--budget {recipe.budget} bounds a trial run, and this data's validation split chooses the "
                             "strategy without one; drop --budget")
        return StrategyChoice(lp_ft, {}, 0, "the run's validation split", {}, {})
    if recipe.data and (too_few := too_few_to_hold_out(recipe)):
        print(f"note: --strategy auto: {too_few}; the probe trains (fine-tuning is chosen only where it beats the "
              "probe on held-out images)", file=sys.stderr)
        probe = recipe.replace(strategy="probe", epochs=1, ema=0.0, budget=recipe.budget if selecting(recipe) else "")
        return StrategyChoice(probe, {}, 0, too_few, {}, {})
    dist = Distributed(device)
    folder = Path(dist.from_main(new_trial_folder)) / "trial"
    if dist.is_main:
        from fastft.data.split import TRIAL_SHARE

        bounded = f"; --budget {recipe.budget} bounds it" if recipe.budget else ""
        print(f"choosing the strategy: a trial run of lp-ft on the training images less {TRIAL_SHARE:.0%} of each "
              f"class, which then score the probe, lp-ft and WiSE-FT's mixes of the two (about {1 - TRIAL_SHARE:.1f} "
              f"of this run's training; the test split is not read{bounded})", flush=True)
    try:
        results = run_training(lp_ft.replace(keep="last", patience=0, tta=False), str(folder))
        decided = dist.from_main(lambda: decision(recipe, folder, results))
    except Interrupted:  # the trial's own message would offer to resume the trial
        raise Interrupted("interrupted while choosing the strategy (its trial run), before the run began: nothing "
                          "to keep; start it again, or give --strategy lp-ft (or probe) to skip the trial") from None
    finally:
        if dist.is_main:
            shutil.rmtree(folder.parent, ignore_errors=True)
    return decided


TRIAL_PREFIX = "fastft-strategy-trial-"


def new_trial_folder() -> str:
    """A folder in the system's temporary folder for a trial, named after this process and machine. The folders of
    trials whose process is gone are removed first: a killed run (kill -9, a lost machine) never reached its
    `finally`, and each left a checkpoint behind (the size of the network three times over). The machine's name
    keeps a container that shares /tmp from taking another's running trial for a dead one."""
    import socket

    import psutil

    host = socket.gethostname()
    for stale in Path(tempfile.gettempdir()).glob(f"{TRIAL_PREFIX}*"):
        pid, _, rest = stale.name.removeprefix(TRIAL_PREFIX).partition("@")
        if pid.isdigit() and rest.startswith(f"{host}@") and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)  # another user's is not ours: rmtree fails there, harmlessly
    return tempfile.mkdtemp(prefix=f"{TRIAL_PREFIX}{os.getpid()}@{host}@")


def decision(recipe: Recipe, folder: Path, results: dict) -> StrategyChoice:
    """The trial's verdict, from its metrics (rank 0)."""
    from fastft.recipe import load_recipe

    wise = results["wise"]
    scores, images, weight = held_out_scores(wise), wise["valid_images"], wise["weight"]
    trial_recipe = load_recipe(str(folder / "recipe.toml"))
    chosen = recipe.replace(arch=trial_recipe.arch, weights=trial_recipe.weights, select=False, budget="",
                            **({"strategy": "probe", "epochs": 1, "ema": 0.0} if weight == 0 else {"strategy": "lp-ft", "wise": weight}))
    if weight == 0 and recipe.ema:
        print("note: the probe was chosen, which has no training steps to average; --ema is dropped", file=sys.stderr)
    history = [{k: row[k] for k in ("epoch", "valid_acc", "valid_loss") if k in row} for row in results["epochs"]]
    trial = {"held_out_images": images, "chosen": describe(weight), "weight": weight, "epochs": history,
             "seconds": round(results["epochs"][-1]["seconds"], 1)}
    # the trial's backbone choice goes with the run; the rest of the trial folder goes
    selection = {name: (folder / name).read_bytes() for name in (FILES["selection"], FILES["selection_chart"])
                 if (folder / name).exists()}
    return StrategyChoice(chosen, scores, images, f"{images} training images held out from a trial run", trial,
                          selection)


def held_out_scores(wise: dict) -> dict:
    """(accuracy, loss) by mixing weight, from a run's WiSE-FT record in metrics.json."""
    return {w: (a, wise["valid_loss_by_weight"][w]) for w, a in wise["valid_acc_by_weight"].items()}


def describe(weight: float) -> str:
    return ("the probe" if weight == 0 else "lp-ft" if weight == 1 else
            f"lp-ft mixed with its probe by WiSE-FT ({1 - weight:.1f} x the probe's weights + {weight:.1f} x lp-ft's)")


def candidate(weight: str) -> str:
    """A row's name: the probe (weight 0), lp-ft (1), or a WiSE-FT mix."""
    return {"0.0": "probe", "1.0": "lp-ft"}.get(weight, f"WiSE-FT {weight}")


def report(choice: StrategyChoice, wise: dict, folder) -> dict:
    """Print the candidates' table, write strategy.csv and strategy.png (and the trial's selection.csv/png) in the
    run folder; returns metrics.json's `strategy_choice`. `wise`: the run's own WiSE-FT record (rank 0)."""
    from fastft.atomic import replacing
    from fastft.train.report import candidate_chart

    if choice.scores:  # a trial chose
        scores, images, weight = choice.scores, choice.images, choice.trial["weight"]
    elif "valid_acc_by_weight" in wise:  # this run's validation split chose, through its WiSE-FT weight
        scores, images, weight = held_out_scores(wise), wise["valid_images"], wise["weight"]
    else:  # too few images to hold any out: nothing scored
        return {"chosen": describe(0.0), "weight": 0.0, "chosen_on": "nothing: " + choice.chosen_on}
    chosen = f"{float(weight):.1f}"
    for name, content in choice.selection.items():
        (folder.path / name).write_bytes(content)
    print(f"strategy chosen on {choice.chosen_on}: {describe(weight)}", flush=True)
    for w, (accuracy, loss) in scores.items():
        print(f"  {candidate(w):<12} held-out accuracy {accuracy:.3f}, loss {loss:.3f}{'  <- chosen' * (w == chosen)}",
              flush=True)
    with replacing(folder.strategy) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["candidate", "wise_weight", "held_out_accuracy", "held_out_loss", "chosen"])
        writer.writerows([candidate(w), w, f"{a:.4f}", f"{loss:.4f}", str(w == chosen).lower()]
                         for w, (a, loss) in scores.items())
    candidate_chart([candidate(w) for w in scores], [a for a, _ in scores.values()], list(scores).index(chosen),
                    f"accuracy on {images} held-out training images", f"--strategy auto: {describe(weight)}",
                    folder.strategy_chart, row_height=0.35)
    return {"chosen": describe(weight), "weight": float(weight), "chosen_on": choice.chosen_on, "held_out_images": images,
            **({"trial": choice.trial} if choice.trial else {})}
