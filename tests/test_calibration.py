"""Calibrated probabilities: the temperature fitted on held-out predictions, carried by the bundle into every way of
predicting (bundle, ONNX, the hub's plain timm model), and reported before and after."""
import json
import shutil

import numpy as np
import pytest

from conftest import TINY, invoke, noisy_classes, plain_timm_probabilities
from conftest import fastft as run_fastft
from fastft.deploy import calibration


def _over_confident(n: int, seed: int):
    """Labels drawn from softmax(z), and a model that reports 4 z: right as often, far too sure."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 3))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in p])
    return 4 * z, labels


def test_an_over_confident_model_gets_a_temperature_above_one_and_a_lower_held_out_nll():
    fit_logits, fit_labels = _over_confident(400, 0)
    temperature = calibration.fit_temperature(fit_logits, fit_labels)
    assert 2.5 < temperature < 6  # about the 4 the logits were inflated by
    logits, labels = _over_confident(400, 1)  # held out: not what the temperature was fitted on
    before, after = (calibration.figures(calibration.scaled(logits, t), labels) for t in (1.0, temperature))
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"] / 2 and after["brier"] < before["brier"]
    assert (calibration.scaled(logits, temperature).argmax(1) == logits.argmax(1)).all()  # no prediction changes
    rng = np.random.default_rng(2)
    multi = rng.normal(0, 1, (300, 2))
    truth = (rng.random((300, 2)) < 1 / (1 + np.exp(-multi))).astype(float)
    per_label = calibration.fit_temperature(3 * multi, truth, multi_label=True)
    assert len(per_label) == 2 and all(2 < t < 4.5 for t in per_label)


def test_a_fitted_temperature_is_kept_only_when_it_lowers_the_held_out_nll_by_more_than_its_noise():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1.5, (80, 3))  # a calibrated model: labels drawn from softmax(z), the model reports z
    labels = np.array([rng.choice(3, p=row) for row in np.exp(z) / np.exp(z).sum(1, keepdims=True)])
    calibrated = calibration.choose_temperature(z, labels)
    assert calibrated.fitted != 1.0 and calibrated.value == 1.0 and calibrated.kept_at_one
    assert calibrated.gain <= calibration.NOISE * calibrated.noise  # what the fit saved is within its noise
    over = calibration.choose_temperature(4 * z, labels)  # the same predictions, far too sure
    assert over.value == over.fitted > 2 and not over.kept_at_one and over.gain > calibration.NOISE * over.noise
    multi = rng.normal(0, 1, (200, 2))
    truth = (rng.random((200, 2)) < 1 / (1 + np.exp(-multi))).astype(float)
    per_label = calibration.choose_temperature(np.stack([multi[:, 0], 4 * multi[:, 1]], 1), truth, multi_label=True)
    assert per_label.value[0] == 1.0 and per_label.value[1] == per_label.fitted[1] > 2  # decided label by label


def test_holdout_auto_holds_out_a_tenth_of_the_training_images_to_calibrate_from_500_up(tmp_path):
    big = noisy_classes(tmp_path / "big", per_class=350)  # 560 training images after the 20% test split: 56 held out
    shutil.copytree(big / "darker", big / "rare", ignore=lambda folder, names: sorted(names)[5:])  # 4 train, 1 test:
    # lp-ft's probe epoch alone: a model that is not a probe, which only a validation split can calibrate
    tiny = [*TINY, "--epochs", "1", "--strategy", "lp-ft"]  # none held out of that class
    default = invoke("train", big, *tiny, "--out", tmp_path / "default")  # the train recipe: every image trains
    assert default.exit_code == 0 and "564 train" in default.stdout, default.output
    assert "not calibrated" in default.stderr and "--holdout auto sets a tenth" in default.stderr
    result = invoke("train", big, *tiny, "--holdout", "auto", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert ", 56 validation images" in result.stdout and "508 train" in result.stdout
    calibrated = json.loads((tmp_path / "run" / "metrics.json").read_text())["calibration"]
    assert "--holdout auto" in calibrated["fitted_on"]  # calibrated: only where a temperature other than 1 was kept
    assert calibrated["calibrated"] == (calibrated["temperature"] != 1.0)
    assert 'holdout = "auto"\n' in (tmp_path / "run" / "recipe.toml").read_text()  # the same share on the same files
    again = invoke("evaluate", tmp_path / "run", big, "--json", "--out", tmp_path / "eval")  # its own data, split as it was
    assert again.exit_code == 0 and json.loads(again.stdout)["images"] == 141, again.output
    small = noisy_classes(tmp_path / "small", per_class=100)  # 160 training images: every one trains
    result = invoke("train", small, *tiny, "--holdout", "auto", "--out", tmp_path / "small-run")
    assert result.exit_code == 0 and "160 train" in result.stdout and "validation images" not in result.stdout
    uncalibrated = json.loads((tmp_path / "small-run" / "metrics.json").read_text())["calibration"]
    assert uncalibrated["calibrated"] is False and "from 500 up, and this run trains on 160" in uncalibrated["why"]
    assert "not calibrated" in result.stderr


def test_a_probe_is_calibrated_on_its_out_of_fold_predictions_without_holding_any_image_out(tmp_path):
    data = noisy_classes(tmp_path / "photos", per_class=100)  # 160 training images, no validation split
    out = tmp_path / "run"
    result = invoke("train", data, *TINY, "--strategy", "probe", "--out", out)
    assert result.exit_code == 0 and "160 train" in result.stdout, result.output
    calibration = json.loads((out / "metrics.json").read_text())["calibration"]
    assert calibration["fitted_on"] == "the out-of-fold predictions of 5 probes on the 160 training images"
    kept = calibration["temperature"] != 1.0  # the 2-standard-error guard decides, as on a validation split
    assert calibration["calibrated"] == kept
    assert kept == (calibration["validation_nll_saved"] > 2 * calibration["validation_nll_noise"])
    assert {"ece", "nll"} <= set(calibration["test"]["before"]) and (out / "reliability.png").is_file()
    meta = json.loads((out / "model.json").read_text())
    assert ("temperature" in meta) == kept and "not calibrated" not in result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("calibrated: "))
    assert ("temperature 1 (no change)" in line) == (not kept) and "out-of-fold predictions" in line
    # a temperature of 1 kept is said as such, and the bundle is as it was trained
    from fastft.run_folder import RunFolder
    from fastft.train.final import calibration_line

    unchanged = {**calibration, "calibrated": False, "temperature": 1.0}
    assert calibration_line(unchanged, RunFolder(out)).startswith("calibrated: temperature 1 (no change): the ")


def test_held_out_predictions_that_are_all_right_leave_the_temperature_at_one():
    logits = np.array([[4.0, -4.0], [-3.0, 3.0], [5.0, 0.0]])
    assert calibration.fit_temperature(logits, np.array([0, 1, 0])) == 1.0  # not sharpened to certainty
    per_label = calibration.fit_temperature(logits, np.array([[1, 0], [0, 1], [1, 1]]), multi_label=True)
    assert per_label[0] == 1.0 and per_label[1] != 1.0  # label 0 all right; label 1 wrong once, so fitted


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    """A lp-ft run (a linear head: exportable to the hub) with a validation split to calibrate on."""
    root = tmp_path_factory.mktemp("calibrated")
    data = noisy_classes(root / "photos", per_class=100)  # 56 validation images: calibration.MIN_HELD_OUT or more
    run = root / "run"
    result = invoke("train", data, *TINY, "--epochs", "2", "--holdout", "0.35", "--bs", "16", "--out", run)
    assert result.exit_code == 0, result.output
    return data, run, result


def test_a_run_with_a_validation_split_is_calibrated_and_reports_it(calibrated_run, tmp_path):
    data, run, result = calibrated_run
    metrics = json.loads((run / "metrics.json").read_text())
    calibrated = metrics["calibration"]
    assert calibrated["temperature"] > 0 and "validation split" in calibrated["fitted_on"]
    assert calibrated["calibrated"] == (calibrated["temperature"] != 1.0)  # a temperature of 1 kept changes nothing
    assert {"ece", "nll", "brier"} <= set(calibrated["test"]["before"]) == set(calibrated["test"]["after"])
    # the fitted temperature is kept only when it beat its noise on the validation split; the record says which
    kept = calibrated["temperature"] == calibrated["fitted_temperature"]
    assert kept == (calibrated["validation_nll_saved"] > 2 * calibrated["validation_nll_noise"]) or calibrated["temperature"] == 1.0
    assert ("if_fitted" in calibrated["test"]) == (not kept)
    assert "calibrated: temperature" in result.stdout and (run / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((run / "model.json").read_text())
    assert meta.get("temperature") == (calibrated["temperature"] if calibrated["calibrated"] else None)
    if not calibrated["calibrated"]:  # what a calibrated bundle does, on a copy given a temperature
        run = tmp_path / "with-temperature"
        shutil.copytree(calibrated_run[1], run)
        (run / "model.json").write_text(json.dumps({**meta, "temperature": 1.5}))
    image = sorted(data.rglob("*.png"))[0]
    rows = json.loads(invoke("predict", run, image, "--json").stdout)
    assert rows[0]["calibrated"] is True
    report = json.loads(invoke("evaluate", run, data, "--json", "--out", tmp_path / "eval").stdout)
    assert report["calibration"]["calibrated"] and {"before", "after"} <= set(report["calibration"])
    every = json.loads(invoke("predict", run, data, "--json").stdout)
    least = min(every, key=lambda r: r["probability"])  # the least sure prediction
    assert least["probability"] < 1
    bar = str(min(1.0, least["probability"] + 1e-4))
    uncertain = json.loads(invoke("predict", run, least["path"], "--json", "--min-confidence", bar).stdout)[0]
    assert uncertain["label"] == "uncertain" and uncertain["probabilities"] == pytest.approx(least["probabilities"], abs=1e-5)
    assert uncertain["guess"] == least["label"]  # the top guess, in JSON and text: `uncertain 0.743` named nothing
    shown = f"uncertain ({least['label']} {least['probability']:.3f})"
    assert uncertain["top"][0][0] == shown
    assert invoke("predict", run, least["path"], "--min-confidence", bar).stdout.strip().endswith(f"\t{shown}")
    sure = json.loads(invoke("predict", run, least["path"], "--json", "--min-confidence", "0.01").stdout)[0]
    assert sure["label"] == least["label"]


def test_the_bundle_onnx_and_hub_give_the_same_calibrated_probabilities(calibrated_run, tmp_path):
    import fastft
    import torch

    data, source, _ = calibrated_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    meta = json.loads((run / "model.json").read_text())
    meta["temperature"] = temperature = 2.5  # whatever this tiny run fitted (1 when it beat no noise): one to see
    (run / "model.json").write_text(json.dumps(meta))
    assert run_fastft("export", run, "--format", "onnx").returncode == 0
    hub = tmp_path / "hub"
    assert run_fastft("export", run, "--format", "hub", "--out", hub).returncode == 0
    bundle, onnx = fastft.load(run), fastft.load(run / "model.onnx")
    images = sorted(data.rglob("*.png"))[:6]
    batch = np.stack([bundle.preprocess(p) for p in images])
    calibrated = bundle.probabilities(batch)
    with torch.no_grad():
        logits = bundle.network(torch.from_numpy(batch))
    np.testing.assert_allclose(calibrated, (logits / temperature).softmax(1).numpy(), atol=1e-5)  # applied
    np.testing.assert_allclose(onnx.probabilities(batch), calibrated, atol=1e-5)
    np.testing.assert_allclose(plain_timm_probabilities(hub, batch, tmp_path), calibrated, atol=1e-5)


def test_a_run_without_held_out_images_says_it_is_uncalibrated(trained_run, dataset):
    out, result = trained_run  # the cifar recipe: train and test splits only
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibration"]["calibrated"] is False and "no validation split" in metrics["calibration"]["why"]
    assert "temperature" not in json.loads((out / "model.json").read_text())
    image = sorted((dataset / "test").rglob("*.*"))[0]
    assert json.loads(invoke("predict", out, image, "--json").stdout)[0]["calibrated"] is False


@pytest.mark.parametrize("tta", [False, True])
def test_the_final_measurements_pass_over_the_test_split_once(dataset, tmp_path, tta):
    """The calibration's figures and the final scores are made from one pass over the test images (with flip TTA,
    each image and its mirror): a probe run on 20 training and 598 test photos passed over them three times, two thirds
    of its time."""
    from fastai.callback.core import Callback

    from fastft.recipe import load_recipe
    from fastft.train.pipeline import train

    seen = []

    class CountImagesAfterTraining(Callback):
        def after_fit(self):
            self.learn.model.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))

    recipe = load_recipe("cifar").replace(data=str(dataset), arch="resnet18", pretrained=False, size=32, bs=4, workers=0,
                                          device="cpu", epochs=1, strategy="probe", tta=tta)
    metrics = train(recipe, str(tmp_path / "run"), callbacks=[CountImagesAfterTraining()])
    tested = sum(f.is_file() for f in (dataset / "test").rglob("*"))
    assert sum(seen) == tested * (2 if tta else 1)
    assert metrics["calibration"]["test"]["before"]["ece"] >= 0 and ("test_acc_tta" in metrics["final"]) == tta
