"""Continuing a stopped run: its recipe from the checkpoint (or, stopped before the first one, from recipe.toml),
and the state put back just before its next epoch (fastft/train/checkpoint.py)."""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from fastft.errors import UsageError
from fastft.recipe import Recipe
from fastft.run_folder import RunFolder
from fastft.train.checkpoint import Checkpoint


def recipe_from_checkpoint(saved: Checkpoint, run_dir: Path) -> Recipe:
    from fastft.recipe import recipe_from_values

    try:
        return recipe_from_values(tomllib.loads(saved.recipe), f"{RunFolder(run_dir).checkpoint}'s recipe")
    except UsageError as e:
        raise UsageError(f"{run_dir} cannot resume: its recipe no longer validates ({e})") from None


def restart_recipe(run_dir: Path) -> Recipe:
    """The recipe of a run that stopped before its first checkpoint was written: it trains again from the start,
    in its own folder (its seed gives the same run)."""
    from fastft.recipe import read_recipe_file

    folder = RunFolder(run_dir)
    try:
        recipe = read_recipe_file(folder.recipe)
    except UsageError as e:
        raise UsageError(f"{run_dir} cannot resume: its recipe does not validate ({e})") from None
    print(f"note: {run_dir} stopped before its first checkpoint was written (during its first epoch, or while that "
          f"epoch's {folder.checkpoint.name} was being written); training it again from the start with its "
          f"{folder.recipe.name}", file=sys.stderr)
    return recipe


def resumer(saved: Checkpoint, log, dist):
    """restore(learn, optimizer): put the stopped run's state back just before its next epoch (Checkpoint.apply);
    the log (its figures, its callbacks' states, its last measured weights) at once."""
    log.restore(saved.log, saved.model)

    def restore(learn, optimizer: bool) -> None:
        saved.apply(learn, dist.rank, optimizer)
    return restore
