"""Train one recipe: data -> learner -> schedule -> outputs in the run folder (fastft/run_folder.py lists them).

`train` is the run as one sequence: `prepare` (fastft/train/setup.py) checks everything and builds the RunContext
and the Learner; the learning rate is resolved (fastft/train/lr_finder.py); the strategy's phases are fitted under
Ctrl-C (`fit_under_interruption`); the kept model is scored and the final report written, and the model saved
(fastft/train/final.py). A stopped run continues from its checkpoint (fastft/train/resume.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

from fastft.atomic import remove_partial_files, write_text
from fastft.data.images import large_images_allowed
from fastft.data.loaders import validation_loader
from fastft.errors import Interrupted
from fastft.recipe import Recipe
from fastft.run_folder import RunFolder, check_new_out
from fastft.schedules import STRATEGIES, Phase, describe_plan
from fastft.train import checkpoint, ema, strategies, strategy_choice, wise
from fastft.train.context import RunContext
from fastft.train.devices import resolve_device
from fastft.train.epochs import EpochLog, RunProgress, unwrapped
from fastft.train.final import calibration_line, final_report, save_model
from fastft.train.lr_finder import resolve_lr
from fastft.train.report import summary_line
from fastft.train.resume import recipe_from_checkpoint, restart_recipe, resumer
from fastft.train.setup import NO_VALIDATION, prepare
from fastft.train.strategies import Progress


def schedule(learn, context: RunContext) -> list[Phase]:
    """The recipe's strategy's phases for this Learner, with the head's peak rate the run resolved."""
    return STRATEGIES[context.recipe.strategy].plan(learn, context.resolved.lr, context.recipe)


@large_images_allowed()
def train(recipe: Recipe, out: str | None = None, measure_unaugmented: bool = False, callbacks=(),
          resume: Path | None = None, trial: bool = False) -> dict:
    """Run `recipe`, or (`resume`) continue a stopped run from its checkpoint; returns metrics.json's content
    (empty on ranks other than 0). Raises Interrupted after saving on Ctrl-C. `measure_unaugmented` adds
    final.train_acc_unaugmented (one more pass over the training images); `callbacks` are extra fastai
    callbacks for the Learner; `trial`: --strategy auto's trial run, on the training images alone."""
    saved = choice = None
    if resume is not None:
        saved = checkpoint.load(resume)
        recipe = recipe_from_checkpoint(saved, resume) if saved else restart_recipe(resume)
        out = str(resume)
    elif strategy_choice.choosing(recipe):  # a trial run first, when the run has no validation split to choose on
        check_new_out(out)
        choice = strategy_choice.choose(recipe, lambda r, o: train(r, o, trial=True), resolve_device(recipe.device))
        recipe = choice.recipe
    context, learn = prepare(recipe, out, resuming=resume is not None, trial=trial)
    dist, folder = context.dist, context.folder
    if resume is not None and dist.is_main:
        remove_partial_files(folder.path)
    learn.add_cbs(callbacks)
    context = resolve_lr(learn, context)
    if dist.is_main and saved is None:
        write_text(folder.recipe, context.saved_recipe().to_toml())

    log = EpochLog(context, Progress(), averaging=ema.AveragedWeights(recipe.ema) if recipe.ema else None)
    if dist.is_main and sys.stdout.isatty():  # progress bars on rank 0's terminal; a log gets clean lines
        learn.add_cb(RunProgress(log))
    interrupted = fit_under_interruption(learn, context, log, saved)
    learn.remove_cbs([log, *([log.averaging] if log.averaging else []), *callbacks,
                      *learn.cbs.filter(lambda cb: isinstance(cb, RunProgress))])
    if not dist.is_main:
        dist.wait()
        return {}
    averaged = wise.apply(learn, context, log.probe_weights)  # before calibration: it calibrates these weights
    extra = {"wise": averaged} if averaged else {}
    if choice is not None:
        extra["strategy_choice"] = strategy_choice.report(choice, averaged, folder)
    results, threshold, interrupted = final_report(learn, context, log, interrupted, measure_unaugmented, extra)
    save_model(learn, context, threshold, results["calibration"].get("temperature"))
    dist.wait()
    if interrupted:
        raise Interrupted(f"interrupted: kept the outputs of epoch {log.kept_epoch} of {recipe.epochs} in {folder}; "
                          f"`fastft resume {folder}` continues it")
    checkpoint.remove(folder)  # finished: the bundle is the result, and nothing is left to resume
    kept = f" (kept epoch {log.kept_epoch} of {len(log.epochs)})" if log.kept_epoch != len(log.epochs) else ""
    print(summary_line(results["final"], str(context.device)) + kept)
    if (calibration := results["calibration"]).get("calibrated"):
        print(calibration_line(calibration, folder))
    return results


def fit_under_interruption(learn, context: RunContext, log: EpochLog, saved: dict | None) -> bool:
    """Print the plan, fit the strategy's phases (from the checkpoint's next epoch when resuming) and leave the
    kept epoch's weights in the model. Returns whether Ctrl-C stopped it after an epoch had finished (before
    one had, it raises Interrupted)."""
    recipe, dist, folder = context.recipe, context.dist, context.folder
    phases = schedule(learn, context)
    learn.add_cbs([log, *([log.averaging] if log.averaging else [])])
    extra_logs = ([tensorboard_log(folder, log, context.mean, context.std)]
                  if recipe.log == "tensorboard" and dist.is_main else [])
    learn.add_cbs(extra_logs)
    start_epoch, restore = 0, None
    if saved is not None:
        start_epoch, restore = saved["epoch"], resumer(saved, log, dist)
    if dist.is_main:
        print_plan(learn, context, phases)
        if saved is not None:
            print(f"resuming after epoch {start_epoch} of {recipe.epochs} from {folder.checkpoint}", flush=True)
    interrupted = False
    try:
        if start_epoch < recipe.epochs:
            strategies.fit(STRATEGIES[recipe.strategy], learn, phases, context, log.progress, start_epoch=start_epoch,
                           restore=restore)
    except KeyboardInterrupt:
        interrupted = True
        if log.snapshot is None:
            raise Interrupted(f"interrupted before the first epoch finished; {folder} holds only recipe.toml") from None
    finally:
        for extra in extra_logs:
            extra.close()
        learn.remove_cbs(extra_logs)
    learn.model = unwrapped(learn.model)
    learn.model.load_state_dict(log.kept_weights())  # the epoch --keep chose (after Ctrl-C: of those finished)
    return interrupted


def print_plan(learn, context: RunContext, phases: list[Phase]) -> None:
    """The plan line and the set-up line: what will train, on what, where the run goes."""
    recipe, dist = context.recipe, context.dist
    processes = (f"{dist.size} processes x batch {learn.dls.bs} (global batch {dist.size * learn.dls.bs}, --bs is per "
                 f"process)" if dist.size > 1 else f"batch {learn.dls.bs}")
    validation = validation_loader(learn.dls)
    counts = f", {len(validation.dataset)} validation" if validation is not None else ""
    if context.trial:
        counts += " (both held out from the training images: this trial never reads the test split)"
    left_out = ""
    if recipe.exclude_suspects:
        left_out = (f" (left out: the {len(context.excluded)} whose labels look most wrong, --exclude-suspects "
                    f"{recipe.exclude_suspects}{'' if len(context.excluded) == recipe.exclude_suspects else ', no more look wrong'}"
                    f"; {context.folder.label_issues.name})")
    mixing = (f"; training batches mixed by MixUp (Beta({recipe.mixup:g}, {recipe.mixup:g}))" if recipe.mixup else
              f"; training batches mixed by CutMix (Beta({recipe.cutmix:g}, {recipe.cutmix:g}))" if recipe.cutmix else "")
    if recipe.ema:
        mixing += f"; each epoch measures and keeps an EMA of the weights (decay up to {recipe.ema:g}, --ema)"
    print(f"{recipe.name}: {recipe.epochs} epoch(s) of {recipe.strategy}: {describe_plan(phases)}{mixing}")
    print(f"{recipe.arch} from {context.starting_weights}, {len(learn.dls.train_ds)} train{left_out} / "
          f"{len(learn.dls.valid_ds)} test{counts} images, {len(context.classes)} classes, {processes}, {context.resolved.precision} on "
          f"{context.device}, keeping the {context.resolved.keep} epoch"
          f"{NO_VALIDATION if not context.has_validation else ''} -> {context.folder}", flush=True)


def tensorboard_log(folder: RunFolder, log, mean, std):
    from fastft.train.tensorboard import TensorBoardLog

    return TensorBoardLog(folder.tensorboard, log, mean, std)


