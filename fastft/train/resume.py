"""Continuing a stopped run: its recipe from the checkpoint (or, stopped before the first one, from recipe.toml),
and the state put back just before its next epoch (fastft/train/checkpoint.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from fastft.errors import UsageError
from fastft.recipe import Recipe
from fastft.run_folder import RunFolder
from fastft.train import checkpoint
from fastft.train.epochs import unwrapped


def recipe_from_checkpoint(saved: dict, run_dir: Path) -> Recipe:
    import tomllib

    from fastft.recipe import recipe_from_values

    try:
        return recipe_from_values(tomllib.loads(saved["recipe"]), f"{RunFolder(run_dir).checkpoint}'s recipe")
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


def resumer(saved: dict, log, dist):
    """restore(learn, optimizer): put the stopped run's state back, just before its next epoch: the weights and
    the log always; the optimizer's state when the next epoch is in the middle of a phase (a new phase starts
    with a fresh optimizer state, as it did in the first run); every random generator last, so the next draw
    is the one the first run made."""
    log.restore(saved["log"])
    # the stopped run's last measured weights: --ema's average once it has taken a step, else the network's
    averaged = log.averaging is not None and log.averaging.steps > 0
    log.snapshot = saved["log"]["ema"]["weights"] if averaged else saved["model"]

    def restore(learn, optimizer: bool) -> None:
        unwrapped(learn.model).load_state_dict(saved["model"])
        if optimizer and saved["optimizer"] is not None:
            learn.opt.load_state_dict(saved["optimizer"])
        randomness = saved["random"]
        checkpoint.set_random_state(randomness[dist.rank if dist.rank < len(randomness) else 0], learn.dls)
    return restore
