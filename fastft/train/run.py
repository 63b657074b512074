"""Train one recipe: data -> learner -> schedule -> outputs in the run folder (fastft/run_folder.py lists them).

`TrainingRun` is the run as one sequence: `setup` (fastft/train/setup.py's `prepare` checks everything and builds
the RunContext and the Learner; the learning rate is resolved: fastft/train/lr_finder.py), `fit` (the strategy's
phases under Ctrl-C), `finish` (the kept model scored, the final report: fastft/train/final.py) and `save`. A stopped
run continues from its checkpoint (fastft/train/resume.py). fastft/train/pipeline.py starts runs: this one, or the
automatic choice's trial and then this one.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from fastft.atomic import remove_partial_files, write_text
from fastft.data.images import large_images_allowed
from fastft.data.loaders import validation_loader
from fastft.errors import Interrupted
from fastft.recipe import Recipe
from fastft.run_folder import RunFolder
from fastft.schedules import LINEAR_PROBE, STRATEGIES, Phase, describe_plan
from fastft.train import checkpoint, ema, strategies, strategy_choice, wise
from fastft.train.context import RunContext
from fastft.train.distributed import unwrapped
from fastft.train.epochs import EpochLog, RunProgress
from fastft.train.final import calibration_line, final_report, save_model
from fastft.train.lr_finder import resolve_lr
from fastft.train.report import ONE_EPOCH_NOTE, drop_note, summary_line
from fastft.train.resume import recipe_from_checkpoint, restart_recipe, resumer
from fastft.train.setup import NO_VALIDATION, prepare
from fastft.train.strategies import Progress


def schedule(learn, context: RunContext) -> list[Phase]:
    """The recipe's strategy's phases for this Learner, with the head's peak rate the run resolved."""
    return STRATEGIES[context.recipe.strategy].plan(learn, context.resolved.lr, context.recipe)


@dataclass(frozen=True)
class RunResult:
    """What a finished run hands back to whoever started it (the command line, or --strategy auto's choice)."""
    metrics: dict  # metrics.json's content; {} on ranks other than 0
    recipe: Recipe  # recipe.toml's: every value the run settled on in place (the backbone it chose among them)
    selection: object = None  # backbone_choice.Selection, when the run chose its backbone


class TrainingRun:
    """One run, as torchtune's recipe classes read: `setup` (checks, data, Learner, learning rate), `fit` (the
    strategy's phases under Ctrl-C), `finish` (WiSE-FT, scores, calibration, the report) and `save` (the model).
    `carve`: a change to the split before any image is read (--strategy auto's trial: fastft/train/pipeline.py);
    `budget`: a deadline the run's epochs end by (the same trial); `choice`: the strategy choice this run trains,
    whose table it reports."""

    def __init__(self, recipe: Recipe, out: str | None = None, measure_unaugmented: bool = False, callbacks=(), *,
                 choice=None, carve=None, budget=None, saved: checkpoint.Checkpoint | None = None,
                 resuming: bool = False, claimed: bool = False, forecast=None):
        self.recipe, self.out, self.measure_unaugmented, self.callbacks = recipe, out, measure_unaugmented, callbacks
        self.choice, self.carve, self.budget, self.saved, self.resuming = choice, carve, budget, saved, resuming
        self.claimed = claimed  # `out` is claimed for this run already (before --strategy auto's choice)
        self.forecast = forecast  # estimate.Forecast: the whole command's estimate, which this run times (the trial)

    @classmethod
    def resumed(cls, folder: Path, measure_unaugmented: bool = False, callbacks=()) -> "TrainingRun":
        """The stopped run in `folder`, to continue from its checkpoint (or from its start, stopped before one)."""
        saved = checkpoint.load(folder)
        recipe = recipe_from_checkpoint(saved, folder) if saved else restart_recipe(folder)
        choice = strategy_choice.StrategyChoice.saved(RunFolder(Path(folder)), recipe)  # --strategy auto's, if it chose
        return cls(recipe, str(folder), measure_unaugmented, callbacks, choice=choice, saved=saved, resuming=True)

    @large_images_allowed()
    def train(self) -> RunResult:
        """setup -> fit -> finish -> save. Raises Interrupted after saving on Ctrl-C."""
        self.setup()
        interrupted = self.fit()
        dist = self.context.dist
        if not dist.is_main:
            dist.wait()
            return RunResult({}, self.context.saved_recipe(), self.selection)
        results, threshold, interrupted = self.finish(interrupted)
        self.save(results, threshold, interrupted)
        return RunResult(results, self.context.saved_recipe(), self.selection)

    def setup(self) -> None:
        """Everything checked, the data read, the Learner built, the learning rate resolved, recipe.toml written."""
        chosen_backbone = self.choice is not None and self.choice.selection is not None  # by the trial
        self.context, self.learn, self.selection = prepare(self.recipe, self.out, resuming=self.resuming,
                                                           carve=self.carve, budget=self.budget, claimed=self.claimed,
                                                           check_labels_too=chosen_backbone,
                                                           forecast=self.forecast)
        dist, folder = self.context.dist, self.context.folder
        if self.resuming and dist.is_main:
            remove_partial_files(folder.path)
        self.learn.add_cbs(self.callbacks)
        self.context = resolve_lr(self.learn, self.context)
        if dist.is_main and not self.resuming:  # a resumed run keeps its recipe.toml, [asked] table and all
            asked = {**(self.choice.asked if self.choice else {}), **self.context.asked}
            # recipe.toml first: until it is written the folder is a claim, which resume refuses to continue
            write_text(folder.recipe, self.context.saved_recipe().to_toml(asked))
            if self.choice is not None:  # the choice and its tables belong to the run from its start: a kill keeps them
                self.choice.save(folder)
                self.choice.write_tables(folder)

    def fit(self) -> bool:
        """The strategy's phases; the kept epoch's weights left in the model. Returns whether Ctrl-C stopped it."""
        recipe, learn = self.context.recipe, self.learn
        self.log = EpochLog(self.context, Progress(), averaging=ema.AveragedWeights(recipe.ema) if recipe.ema else None,
                            probe=wise.ProbeWeights() if recipe.wise != "off" else None)
        if self.context.dist.is_main and sys.stdout.isatty():  # progress bars on rank 0's terminal; a log gets clean lines
            learn.add_cb(RunProgress(self.log))
        interrupted = fit_under_interruption(learn, self.context, self.log, self.saved)
        learn.remove_cbs([self.log, *([self.log.averaging] if self.log.averaging else []), *self.callbacks,
                          *learn.cbs.filter(lambda cb: isinstance(cb, RunProgress))])
        return interrupted

    def finish(self, interrupted: bool) -> tuple[dict, float | None, bool]:
        """WiSE-FT's average, the strategy choice's table, the kept model's scores and calibration, the last report
        (rank 0). Returns (metrics.json's content, a multi-label model's threshold, whether Ctrl-C came)."""
        log = self.log
        probe = log.probe.weights if log.probe else None
        last = log.snapshot if len(log.epochs) > 1 else None  # lp-ft's epoch 1 is its probe: later ones fine-tune
        # before calibration: it calibrates these weights
        averaged = wise.apply(self.learn, self.context, probe, last, log.kept_epoch, log.stopped)
        extra = {**({"wise": averaged} if averaged else {}),
                 **({"probe": log.probe_penalty} if log.probe_penalty else {})}
        if self.choice is not None:
            extra["strategy_choice"] = strategy_choice.report(self.choice, averaged, self.context.folder)
        return final_report(self.learn, self.context, self.log, interrupted, self.measure_unaugmented, extra)

    def save(self, results: dict, threshold: float | None, interrupted: bool) -> None:
        """The model files; then the checkpoint goes (nothing is left to resume) and the summary lines."""
        context, log, folder = self.context, self.log, self.context.folder
        calibration = results["calibration"]  # a temperature of 1 kept changes nothing: the bundle says uncalibrated
        save_model(self.learn, context, threshold, calibration.get("temperature") if calibration["calibrated"] else None)
        context.dist.wait()
        if interrupted:
            raise Interrupted(f"interrupted: kept the outputs of epoch {log.kept_epoch} of {context.recipe.epochs} in "
                              f"{folder}; `fastft resume {folder}` continues it")
        checkpoint.remove(folder)  # finished: the bundle is the result, and nothing is left to resume
        if context.validation_is_test:  # --strategy auto's trial: its verdict, not its summary, is what follows
            return
        kept = f" (kept epoch {log.kept_epoch} of {len(log.epochs)})" if log.kept_epoch != len(log.epochs) else ""
        print(summary_line(results["final"], str(context.device)) + kept)
        if len(log.epochs) == 1:
            print(ONE_EPOCH_NOTE)
        validation = validation_loader(self.learn.dls)
        scored = len(validation.dataset) if validation is not None else len(self.learn.dls.valid_ds)
        if note := drop_note(log.epochs, context.recipe.strategy, scored, log.kept_epoch):
            print(note)
        if "temperature" in (calibration := results["calibration"]):  # a temperature was fitted, kept or not
            print(calibration_line(calibration, folder))


def fit_under_interruption(learn, context: RunContext, log: EpochLog, saved: checkpoint.Checkpoint | None) -> bool:
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
        start_epoch, restore = saved.epoch, resumer(saved, log, dist)
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
    left_out = ""
    if recipe.exclude_suspects:
        left_out = (f" (left out: the {len(context.excluded)} whose labels look most wrong, --exclude-suspects "
                    f"{recipe.exclude_suspects}{'' if len(context.excluded) == recipe.exclude_suspects else ', no more look wrong'}"
                    f"; {context.folder.label_issues.name})")
    mixing = (f"; training batches mixed by MixUp (Beta({recipe.mixup:g}, {recipe.mixup:g}))" if recipe.mixup else
              f"; training batches mixed by CutMix (Beta({recipe.cutmix:g}, {recipe.cutmix:g}))" if recipe.cutmix else "")
    if recipe.ema:
        mixing += f"; each epoch measures and keeps an EMA of the weights (decay up to {recipe.ema:g}, --ema)"
    if recipe.strategy == LINEAR_PROBE:  # no epochs: one pass of the frozen backbone, then a closed-form fit
        print(f"{recipe.name}: a linear probe: one pass over the features (the frozen backbone's, of every training "
              f"image and its mirror image), then a logistic-regression head fitted on them{mixing}")
    else:
        print(f"{recipe.name}: {recipe.epochs} epoch(s) of {recipe.strategy}: {describe_plan(phases)}{mixing}")
    classes = f"{len(context.classes)} classes, {processes}, {context.resolved.precision} on {context.device}"
    if context.validation_is_test:  # --strategy auto's trial: a held-out fold scores the candidates; no folder shown
        print(f"{recipe.arch} from {context.starting_weights}, {len(learn.dls.train_ds)} training images, "
              f"{len(learn.dls.valid_ds)} held out to score the candidates (the test split is not read), {classes}",
              flush=True)
        return
    print(f"{recipe.arch} from {context.starting_weights}, {len(learn.dls.train_ds)} train{left_out} / "
          f"{len(learn.dls.valid_ds)} test{counts} images, {classes}, keeping the {context.resolved.keep} epoch"
          f"{NO_VALIDATION if not context.has_validation else ''} -> {context.folder}", flush=True)


def tensorboard_log(folder: RunFolder, log, mean, std):
    from fastft.train.tensorboard import TensorBoardLog

    return TensorBoardLog(folder.tensorboard, log, mean, std)


