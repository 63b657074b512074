"""What `--strategy auto` chose, and on what: the trial's verdict (`decision`), the candidates' table (strategy.csv,
strategy.png) and metrics.json's `strategy_choice`. The choice itself runs in fastft/train/pipeline.py.

The candidates are the probe (WiSE-FT weight 0), lp-ft (1) and WiSE-FT's mixes between them, each scored on images
the run did not train on; fine-tuning is chosen only where it beats the probe by more than two images.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import NamedTuple

from fastft.atomic import replacing, write_json
from fastft.data.folders import split_files, validation_folder
from fastft.data.split import holdout_share
from fastft.errors import UsageError
from fastft.recipe import Recipe, asked_differences
from fastft.schedules import AUTO, LINEAR_PROBE, LP_FT
from fastft.train.backbone_choice import write_report
from fastft.train.report import candidate_chart, standard_error
from fastft.train.tie import TIE_IMAGES


class StrategyChoice(NamedTuple):
    """What `--strategy auto` decided, and on what. The run folder's choice.json keeps all of it but the recipe (the
    run's own) and the selection (selection.csv): a resumed run reports the same choice."""
    recipe: Recipe  # the run's recipe with the choice in place
    scores: dict  # mixing weight (str) -> (accuracy, loss) on the held-out images; {} when the run itself chooses
    images: int  # how many held-out images scored them
    chosen_on: str  # in words
    trial: dict  # metrics.json's `strategy_choice`: the trial's figures ({} without a trial)
    selection: object  # backbone_choice.Selection: the trial's choice of backbone, when it made one; else None
    asked: dict = {}  # what the command asked where the choice differs (recipe.toml's [asked]): strategy auto ...
    untrained: dict = {}  # candidate -> why it has no figures (lp-ft, when the trial stopped after its probe epoch)

    def save(self, folder) -> None:
        """choice.json, when the run starts: the choice belongs to the run and survives any kill."""
        write_json(folder.choice, {"asked": self.asked, "scores": {w: list(s) for w, s in self.scores.items()},
                                   "images": self.images, "chosen_on": self.chosen_on, "trial": self.trial,
                                   "untrained": self.untrained})

    @classmethod
    def saved(cls, folder, recipe: Recipe) -> "StrategyChoice | None":
        """The choice a stopped run made (its choice.json), for `recipe`, the run's own; None where it made none."""
        if not folder.choice.is_file():
            return None
        try:
            kept = json.loads(folder.choice.read_text())
            return cls(recipe, {w: tuple(s) for w, s in kept["scores"].items()}, kept["images"], kept["chosen_on"],
                       kept["trial"], None, kept["asked"], dict(kept.get("untrained", {})))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise UsageError(f"{folder.choice} is damaged: the run's record of what --strategy auto chose cannot be "
                             f"read; start the run again") from None

    def write_tables(self, folder, wise: dict | None = None) -> tuple | None:
        """strategy.csv and strategy.png (and the trial's selection.csv/png) in the run folder: (scores, images,
        chosen weight), or None where nothing was scored. `wise`: the run's own WiSE-FT record, where its validation
        split chose (known once it has trained)."""
        if self.scores:  # a trial chose
            scores, images, weight = self.scores, self.images, self.trial["weight"]
        elif wise and "valid_acc_by_weight" in wise:  # this run's validation split chose, through its WiSE-FT weight
            scores, images, weight = held_out_scores(wise), wise["valid_images"], wise["weight"]
        else:  # too few images to hold any out (or the run has not trained yet): nothing scored
            return None
        chosen = f"{float(weight):.1f}"
        if self.selection is not None:
            write_report(self.selection, folder.selection, folder.selection_chart)
        with replacing(folder.strategy) as temporary, open(temporary, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["candidate", "wise_weight", "held_out_accuracy", "standard_error", "held_out_loss", "chosen",
                             "rule"])
            writer.writerows([candidate(w), w, f"{a:.4f}", f"{standard_error(a, images):.4f}", f"{loss:.4f}",
                              str(w == chosen).lower(), TIE_RULE if w == chosen else ""]
                             for w, (a, loss) in scores.items())
            writer.writerows([name, "", "", "", "", "false", why] for name, why in self.untrained.items())
        candidate_chart([candidate(w) for w in scores], [a for a, _ in scores.values()], list(scores).index(chosen),
                        f"accuracy on {images} held-out training images", f"--strategy auto: {describe(weight)}",
                        folder.strategy_chart, row_height=0.35, images=images, rule=TIE_RULE)
        return scores, images, weight


def choosing(recipe: Recipe) -> bool:
    return recipe.strategy == AUTO


def has_validation_split(recipe: Recipe) -> bool:
    """Whether the recipe's data has a validation split of its own, without reading any image."""
    if recipe.holdout == 0:
        return bool(recipe.data) and not recipe.labels and validation_folder(Path(recipe.data).expanduser()) is not None
    split = split_files(Path(recipe.data).expanduser(), recipe)
    return bool(split.valid) or bool(holdout_share(recipe.holdout, split, recipe.limit))


def decision(recipe: Recipe, ran, seconds: float) -> StrategyChoice:
    """The trial's verdict, from what its run handed back (`ran`: a run.RunResult; rank 0): its WiSE-FT record, the
    backbone it trained (and chose, when the recipe listed several). `seconds`: the whole trial's, set-up included."""
    results, trial_recipe = ran.metrics, ran.recipe
    wise = results["wise"]
    scores, images, weight = held_out_scores(wise), wise["valid_images"], wise["weight"]
    chosen = recipe.replace(arch=trial_recipe.arch, weights=trial_recipe.weights, select=False, budget="")
    chosen = as_probe(chosen) if weight == 0 else chosen.replace(strategy=LP_FT, wise=weight)
    if weight == 0 and recipe.ema:
        print("note: the probe was chosen, which has no training steps to average; --ema is dropped", file=sys.stderr)
    history = [{k: round(row[k], 4) if k == "seconds" else row[k] for k in ("epoch", "valid_acc", "valid_loss", "seconds")
                if k in row} for row in results["epochs"]]
    trial = {"held_out_images": images, "chosen": describe(weight), "weight": weight, "epochs": history,
             "seconds": round(seconds, 1), "epoch_seconds": round(sum(row["seconds"] for row in results["epochs"]), 1)}
    # a trial stopped after its probe epoch (--budget) fine-tuned nothing: lp-ft and its mixes have no figures
    untrained = {} if wise.get("fine_tuned", True) else {
        LP_FT: "not trained (budget)" if "--budget" in wise.get("why", "") else f"not trained ({wise.get('why')})"}
    # the trial's backbone choice goes with the run (selection.csv and .png); the rest of the trial folder goes
    return StrategyChoice(chosen, scores, images, f"{images} training images held out from a trial run", trial,
                          ran.selection, asked_differences(recipe, chosen), untrained)


TIE_RULE = (f"rule: fine-tuning must beat the probe by more than {TIE_IMAGES} held-out images; among the rest, "
            f"within {TIE_IMAGES} images of the best, the lowest loss")


def as_probe(recipe: Recipe) -> Recipe:
    """`recipe` as a linear probe: one pass, without --ema (it averages training steps, and a probe takes none)."""
    return recipe.replace(strategy=LINEAR_PROBE, epochs=1, ema=0.0)


def held_out_scores(wise: dict) -> dict:
    """(accuracy, loss) by mixing weight, from a run's WiSE-FT record in metrics.json."""
    return {w: (a, wise["valid_loss_by_weight"][w]) for w, a in wise["valid_acc_by_weight"].items()}


def describe(weight: float) -> str:
    return ("the probe" if weight == 0 else LP_FT if weight == 1 else
            f"lp-ft mixed with its probe by WiSE-FT ({1 - weight:.1f} x the probe's weights + {weight:.1f} x lp-ft's)")


def candidate(weight: str) -> str:
    """A row's name: the probe (weight 0), lp-ft (1), or a WiSE-FT mix."""
    return {"0.0": LINEAR_PROBE, "1.0": LP_FT}.get(weight, f"WiSE-FT {weight}")


def report(choice: StrategyChoice, wise: dict, folder) -> dict:
    """Print the candidates' table, write strategy.csv and strategy.png (and the trial's selection.csv/png) in the
    run folder; returns metrics.json's `strategy_choice`. `wise`: the run's own WiSE-FT record (rank 0)."""
    written = choice.write_tables(folder, wise)
    if written is None:
        return {"chosen": describe(0.0), "weight": 0.0, "chosen_on": "nothing: " + choice.chosen_on}
    scores, images, weight = written
    chosen = f"{float(weight):.1f}"
    print(f"strategy chosen on {choice.chosen_on}: {describe(weight)} ({TIE_RULE})", flush=True)
    for w, (accuracy, loss) in scores.items():
        print(f"  {candidate(w):<12} held-out accuracy {accuracy:.3f}, loss {loss:.3f}{'  <- chosen' * (w == chosen)}",
              flush=True)
    for name, why in choice.untrained.items():
        print(f"  {name:<12} {why}", flush=True)
    return {"chosen": describe(weight), "weight": float(weight), "chosen_on": choice.chosen_on, "held_out_images": images,
            **({"trial": choice.trial} if choice.trial else {})}
