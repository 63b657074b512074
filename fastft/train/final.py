"""The end of a run: the kept model's scores on the test split as its bundle gives them, the temperature fitted on
the validation split (calibration), the last report, and the saved model."""
from __future__ import annotations

import functools
import sys
from typing import Callable, NamedTuple

import numpy as np
import torch

from fastft.atomic import replacing
from fastft.data.loaders import validation_loader
from fastft.deploy.bundle import activation, averaged_with_mirror, mirror_image, write_bundle
from fastft.errors import Interrupted
from fastft.fastai_internals import release_last_batch
from fastft.run_folder import RunFolder
from fastft.train.context import RunContext
from fastft.train.devices import training_only_callbacks
from fastft.train.distributed import unwrapped
from fastft.train.epochs import EpochLog
from fastft.train.report import write_reports


def unaugmented_train_accuracy(learn) -> float:
    """Accuracy on the training images with the test transforms: next to test accuracy, this is what
    shows overfitting (d2l's train acc is measured on augmented batches, mid-epoch)."""
    dl = learn.dls.test_dl(learn.dls.train_ds.items, with_labels=True)
    with learn.no_bar(), learn.no_logging():
        return float(learn.validate(dl=dl)[1])


class Predictions(NamedTuple):
    """A model's logits over one split, as its bundle makes them (float32, whatever precision trained it), its mirror
    images' too where the recipe's tta asks for them, and the targets. The probabilities at any temperature are made
    from them, so one pass over a split serves both the calibration and the final scores."""
    logits: np.ndarray  # (N, C), before any temperature
    mirror_logits: np.ndarray | None  # (N, C) of each image's mirror image; None where the recipe's tta is off
    targets: np.ndarray
    multi_label: bool

    def probabilities(self, temperature=None) -> np.ndarray:
        return _activated(self.logits, self.multi_label, temperature)

    def with_tta(self, temperature=None) -> np.ndarray | None:
        """The probabilities averaged with the mirror images' (flip TTA); None where the recipe's tta is off."""
        if self.mirror_logits is None:
            return None
        return averaged_with_mirror(self.probabilities(temperature),
                                    _activated(self.mirror_logits, self.multi_label, temperature))


def _activated(logits: np.ndarray, multi_label: bool, temperature) -> np.ndarray:
    return activation(torch.from_numpy(logits), multi_label, temperature).numpy()


def split_predictions(learn, dl, context: RunContext) -> Predictions:
    """The model's logits over one split, and its mirror images' where the recipe's tta asks for them
    (`fastft predict --tta`)."""
    network = unwrapped(learn.model).eval()
    logits, mirrors, targets = [], [], []
    with torch.inference_mode():
        for xb, yb in dl:
            logits.append(network(xb).float().cpu())
            if context.recipe.tta:
                mirrors.append(network(mirror_image(xb)).float().cpu())
            targets.append(yb.cpu())
    if not targets:
        empty = np.zeros((0, len(context.classes)), np.float32)
        return Predictions(empty, empty if context.recipe.tta else None, np.zeros(0), context.multi_label)
    return Predictions(torch.cat(logits).numpy(), torch.cat(mirrors).numpy() if mirrors else None,
                       torch.cat(targets).numpy(), context.multi_label)


def calibrate(learn, context: RunContext, test: Predictions, validation_predictions: Callable[[], Predictions]) -> dict:
    """Fit a temperature (deploy/calibration.py) on the validation split's predictions, kept where it beats its
    noise; the test split's ECE, NLL and Brier score before and after (and with the fitted temperature, where it was
    not kept), and reliability.png. A run without a validation split of at least calibration.MIN_HELD_OUT images
    stays uncalibrated, and says so: the test split is never used to fit anything. `test`: the test split's
    predictions; `validation_predictions`: the validation split's, made where first asked for."""
    from fastft.deploy import calibration

    validation = validation_loader(learn.dls)
    held_out = len(validation.dataset) if validation is not None else 0
    out_of_fold = None
    if held_out < calibration.MIN_HELD_OUT:
        why = (f"its validation split has only {held_out} images (at least {calibration.MIN_HELD_OUT} are needed)"
               if held_out else "it has no validation split apart from the test split "
                                f"({no_holdout_why(context, len(learn.dls.train_ds))})")
        out_of_fold = probe_out_of_fold(learn, context)
        if out_of_fold is None:
            print(f"note: the model's probabilities are not calibrated: {why}", file=sys.stderr)
            return {"calibrated": False, "why": why}
    if out_of_fold is not None:  # a probe: its k-fold out-of-fold logits, no image held out
        logits, targets, words = out_of_fold
    else:
        fitted_on = validation_predictions()
        logits, targets, words = fitted_on.logits, fitted_on.targets, validation_words(context, held_out)
    temperature = calibration.choose_temperature(logits, targets, context.multi_label)
    before = calibration.scaled(test.logits, 1.0, context.multi_label)
    after = calibration.scaled(test.logits, temperature.value, context.multi_label)
    calibration.reliability_diagram(before, after, test.targets, context.multi_label, context.folder.reliability,
                                    f"{context.recipe.name}: the test split ({len(test.targets)} images)")
    figures = {"before": calibration.figures(before, test.targets, context.multi_label),
               "after": calibration.figures(after, test.targets, context.multi_label)}
    if temperature.kept_at_one:  # what the fitted temperature would have done, for the record: it was not used
        figures["if_fitted"] = calibration.figures(calibration.scaled(test.logits, temperature.fitted,
                                                                      context.multi_label), test.targets, context.multi_label)
    # calibrated: a temperature other than 1 is applied (anywhere, for multi-label); else the model is as it was
    return {"calibrated": temperature.value != (1.0 if not context.multi_label else [1.0] * len(context.classes)),
            "temperature": temperature.value, "fitted_temperature": temperature.fitted,
            "validation_nll_saved": temperature.gain, "validation_nll_noise": temperature.noise,
            "fitted_on": words, "test": figures}


def probe_out_of_fold(learn, context: RunContext) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(logits, targets, what they are in words) of the training images from k probes fitted on the other folds,
    where the model is a probe (the same model family, on four fifths of the same images) and its features are at
    hand (one process: the feature cache); None otherwise, or where a class is too small to deal into folds."""
    from fastft.errors import UsageError
    from fastft.schedules import LINEAR_PROBE
    from fastft.train.features import frozen_features
    from fastft.train.out_of_fold import fold_count, out_of_fold_logits, stratified_folds

    if context.recipe.strategy != LINEAR_PROBE or context.dist.size > 1 or context.train_targets is None:
        return None
    items = learn.dls.train_ds.items
    keys = [key for _, key in items]
    try:
        k, _ = fold_count(keys, context.multi_label)
    except UsageError:  # a class of one image: no fold could hold it out
        return None
    features, mirrors = frozen_features(learn, items, context.recipe)
    logits = out_of_fold_logits(features, mirrors, context.train_targets, len(context.classes),
                                stratified_folds(keys, k, context.recipe.seed), context.recipe.seed, context.multi_label)
    targets = context.train_targets.numpy() if context.multi_label else context.train_targets.numpy().astype(np.int64)
    return logits.numpy(), targets, f"the out-of-fold predictions of {k} probes on the {len(items)} training images"


def validation_words(context: RunContext, images: int) -> str:
    """What the validation split is, in words: the data's own, or held out from the training images."""
    if not context.holdout:
        return f"the validation split ({images} images)"
    how = "auto: " if context.recipe.holdout == "auto" else ""
    return f"{images} training images held out as a validation split (--holdout {how}{context.holdout:.0%} of each class)"


def no_holdout_why(context: RunContext, training_images: int) -> str:
    """Why a run has no validation split, and how to give it one."""
    if context.recipe.holdout == "auto":
        from fastft.data.split import AUTO_HOLDOUT, MIN_HELD_OUT

        return (f"--holdout auto holds out {AUTO_HOLDOUT:.0%} of the training images from "
                f"{round(MIN_HELD_OUT / AUTO_HOLDOUT)} up, and this run trains on {training_images}; --holdout 0.2 "
                "holds out a larger share")
    return "--holdout auto sets a tenth of the training images aside for it, from 500 up"


def final_scores(learn, context: RunContext, test: Predictions, validation_predictions: Callable[[], Predictions],
                 temperature=None) -> tuple[dict, dict | None]:
    """The kept model's scores on the test split (`test`: its predictions) as its bundle gives them
    (deploy/scores.py): accuracy, balanced accuracy and macro F1; a multi-label run's at the threshold with the best
    micro F1 on the validation split (0.5 without one), chosen on calibrated probabilities, with mAP. Returns
    (scores, the same with flip TTA when the recipe asks for it, else None)."""
    from fastft.deploy import scores

    classes = list(context.classes)
    if not context.multi_label:
        score = lambda probs: scores.single_label(probs, test.targets.astype(int), classes)
    else:
        threshold = 0.5
        if validation_loader(learn.dls) is not None:
            held_out = validation_predictions()
            averaged = held_out.with_tta(temperature)
            threshold = scores.choose_threshold(held_out.probabilities(temperature) if averaged is None else averaged,
                                                held_out.targets)
        score = lambda probs: scores.multi_label(probs, test.targets, classes, threshold)
    averaged = test.with_tta(temperature)
    return score(test.probabilities(temperature)), (score(averaged) if averaged is not None else None)


def calibration_line(calibration: dict, folder: RunFolder) -> str:
    """The run's last line about its probabilities: the temperature, what it was fitted on, and the test ECE."""
    def shown(t):
        return f"{t:.2f}" if isinstance(t, float) else f"{min(t):.2f}-{max(t):.2f}"
    before, after = calibration["test"]["before"]["ece"], calibration["test"]["after"]["ece"]
    applied, fitted, where = calibration["temperature"], calibration["fitted_temperature"], calibration["fitted_on"]
    if not calibration["calibrated"]:
        return (f"calibrated: temperature 1 (no change): the {shown(fitted)} fitted on {where} lowered their NLL by "
                f"less than its noise; test ECE {before:.3f} ({folder.reliability.name})")
    kept = (f"temperature {shown(applied)} fitted on {where}" if applied == fitted else
            f"temperature {shown(applied)}, as the {shown(fitted)} fitted on {where} lowered their NLL by less than "
            f"its noise{' for some labels, which keep 1' if isinstance(applied, list) else ''}")
    return f"calibrated: {kept}; test ECE {before:.3f} -> {after:.3f} ({folder.reliability.name})"


def final_report(learn, context: RunContext, log: EpochLog, interrupted: bool, measure_unaugmented: bool,
                 extra: dict | None = None) -> tuple[dict, float | None, bool]:
    """Score the kept model on the test split, then write the reports (metrics.json, history.csv, curves.png) for
    the last time; `extra`: more keys for metrics.json. Returns (metrics.json's content, a multi-label model's
    threshold, whether Ctrl-C came)."""
    final, threshold = {}, 0.5 if context.multi_label else None
    test, calibration = None, {"calibrated": False, "why": "the final measurements were skipped"}
    try:  # extra passes over the data: a Ctrl-C here skips them, and the trained model is still saved
        # after fit the Learner holds the whole test set again (fastai's DistributedTrainer restores it); one pass
        # over it, and over the validation split where needed, serves the calibration and the scores both
        test_predictions = split_predictions(learn, learn.dls.valid, context)
        validation_predictions = functools.cache(lambda: split_predictions(learn, validation_loader(learn.dls), context))
        calibration = (calibrate(learn, context, test_predictions, validation_predictions)
                       if not context.validation_is_test else
                       {"calibrated": False, "why": "its validation split is its test split"})
        plain, with_tta = final_scores(learn, context, test_predictions, validation_predictions,
                                       calibration.get("temperature"))
        test = with_tta or plain  # what `fastft evaluate` reports for the saved model (it uses the recipe's tta)
        # the saved model's test accuracy in float32: the kept epoch's line was measured in the training precision
        final["test_acc"] = plain["accuracy"]
        final.update({k: test[k] for k in ("balanced_accuracy", "macro_f1", "micro_f1", "mAP", "threshold") if k in test})
        threshold = test.get("threshold")
        if with_tta:
            final["test_acc_tta"] = with_tta["accuracy"]
        if measure_unaugmented and not interrupted and context.dist.size == 1:
            final["train_acc_unaugmented"] = unaugmented_train_accuracy(learn)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: skipping the final test-time measurements, saving the trained model", file=sys.stderr)
    additions = {"final": final, "calibration": calibration, **(extra or {}), **({"test_scores": test} if test else {}),
                 **({"stopped_early": log.stopped} if log.stopped else {})}
    # the last epoch's checkpoint, written while the final scores were computed, on disk before any model file (a
    # full disk raises here), so a run that fails from here on can be resumed
    log.checkpoints.wait()
    results = write_reports(context.folder, log.epochs, log.examples_per_sec, str(context.device), log.kept_epoch,
                            additions)
    return results, threshold, interrupted


def save_model(learn, context: RunContext, threshold: float | None, temperature=None) -> None:
    """The pickle-free bundle (model.safetensors + model.json) and fastai's model.pkl, without the callbacks that
    only training needs."""
    recipe, folder = context.recipe, context.folder
    try:
        training_only = training_only_callbacks()  # not needed to load or use the model
        if context.dist.accelerator:
            from fastft.train.sharding import DistributedTraining  # loaded only by a run of many processes

            training_only = (DistributedTraining, *training_only)
        for callback in training_only:
            learn.remove_cbs(learn.cbs.filter(lambda cb: isinstance(cb, callback)))
        release_last_batch(learn)
        with replacing(folder.pickle.resolve()) as temporary:
            learn.export(temporary)
        write_bundle(learn.model, folder, arch=recipe.arch, classes=list(context.classes), size=recipe.size,
                     crop_pct=recipe.crop_pct, mean=context.mean, std=context.std, head=context.head, tta=recipe.tta,
                     threshold=threshold, temperature=temperature)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while saving the model: the earlier model files in {folder} are whole; "
                          "metrics.json and the curves are kept; `fastft resume` finishes it") from None
