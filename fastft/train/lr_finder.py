"""fastai's LR finder: `--lr auto` before a run trains, and `fastft lr-find` alone; lr_find.png."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from fastai.vision.all import Callback

from fastft.atomic import save_figure, subplots
from fastft.data.images import large_images_allowed
from fastft.errors import UsageError
from fastft.fastai_internals import finder_saves_under
from fastft.recipe import Recipe
from fastft.schedules import LP_FT, STRATEGIES
from fastft.train import strategy_choice
from fastft.train.context import RunContext
from fastft.train.distributed import world_size
from fastft.train.setup import prepare


class LrFindLog(Callback):
    """A line every tenth of the LR finder's steps: a log shows it working (a terminal also gets the bar)."""

    def __init__(self, steps: int):
        self.steps, self.done = steps, 0

    def after_batch(self):
        if self.training:
            self.done += 1
            if self.done % max(1, self.steps // 10) == 0 or self.done == self.steps:
                print(f"lr-find: step {self.done}/{self.steps}, lr {self.opt.hypers[-1]['lr']:.1e}, "
                      f"loss {self.smooth_loss.item():.3f}", flush=True)


LR_FIND_STEPS = 100  # fastai's: on a small set the finder loops over the data as often as it takes (20 steps, the
# old bound for small sets, drew a curve of noise with the suggestion on a hump)


def find_lr(learn, context: RunContext) -> float:
    """fastai's LR finder on the groups the strategy's first phase trains, over LR_FIND_STEPS batches (looping over a
    small set); saves lr_find.png."""
    recipe, folder = context.recipe, context.folder
    strategy = STRATEGIES[recipe.strategy]
    # which groups the first phase trains, in a run of at least 2 epochs: a head-only phase, where the strategy has one
    first = strategy.plan(learn, 1.0, recipe, epochs=max(recipe.epochs, 2))[0]
    learn.freeze_to(-first.trains) if first.trains else learn.unfreeze()
    steps = LR_FIND_STEPS
    print(f"lr-find: up to {steps} steps from lr 1e-7 to 10, training {first.describe_groups()}", flush=True)
    progress = LrFindLog(steps)
    learn.add_cb(progress)
    try:  # every step (stop_div off): bounded by the data they cost little, and on small noisy batches fastai's
        # divergence check (loss > 4x its best) stops the finder after a handful of steps, with no curve to read
        with finder_saves_under(learn, folder.path.resolve()):
            suggestion = learn.lr_find(num_it=steps, stop_div=False, show_plot=False)
    except (IndexError, ValueError):  # fastai's suggestion needs a loss curve with a valley
        raise UsageError(f"the LR finder found no rate where the loss falls in {steps} steps; pass --lr yourself") from None
    finally:
        learn.remove_cb(progress)
    plot_lr_find(learn.recorder.lrs, learn.recorder.losses, float(suggestion.valley), folder.lr_find,
                 f"{recipe.name}, {recipe.strategy}")
    return float(suggestion.valley)


def plot_lr_find(lrs, losses, suggestion: float, path: Path, title: str) -> None:
    """The finder's loss against the rate (log scale, fastai's smoothed loss), the suggestion marked."""
    lrs, losses = np.array([float(lr) for lr in lrs]), np.array([float(loss) for loss in losses])
    fig, ax = subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="tab:red", ls="--", label=f"suggested lr {suggestion:.2e}")
    at = int(np.abs(np.log(lrs) - np.log(suggestion)).argmin())  # the suggestion's point on the curve
    ax.plot(lrs[at], losses[at], "o", color="tab:red", ms=8)
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)", title=title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def resolve_lr(learn, context: RunContext) -> RunContext:
    """--lr auto: the LR finder's suggestion (the strategy's default and a given rate are resolved by prepare)."""
    if context.resolved.lr != "auto":
        return context
    lr = find_lr(learn, context)
    print(f"lr finder suggests {lr:.2e} (plot: {context.folder.lr_find})")
    return context.with_lr(lr)


@large_images_allowed()
def lr_find_only(recipe: Recipe, out: str | None = None) -> float:
    """`fastft lr-find`: the suggestion and lr_find.png, no training."""
    if world_size() > 1:
        raise UsageError("lr-find runs in one process; launch it without torchrun/accelerate")
    if strategy_choice.choosing(recipe):  # the rate lp-ft would fine-tune at, if auto chose it
        recipe = recipe.replace(strategy=LP_FT)
    prepared = prepare(recipe, out)
    return find_lr(prepared.learn, prepared.context)
