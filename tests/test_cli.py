"""The installed `fastft` command end to end: outputs, reproduction, predict, bad input, Ctrl-C, wheel."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import TINY, fastft, invoke

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command_and_version_works():
    result = fastft("--help")
    assert result.returncode == 0
    for command in ("hotdog", "cifar", "run", "predict", "recipes"):
        assert command in result.stdout
    module = subprocess.run([sys.executable, "-m", "fastft", "--version"], capture_output=True, text=True)
    assert module.returncode == 0 and re.fullmatch(r"fastft \d+\.\d+\.\d+\n", module.stdout)


def test_recipe_help_shows_every_option_in_panels_and_the_common_ones_first():
    """`fastft train --help` was 252 lines, where a new user wanted six options."""
    result = fastft("cifar", "--help", env={"COLUMNS": "200"})
    for option in ("--epochs", "--lr", "--bs", "--size", "--arch", "--weights", "--no-pretrained", "--aug",
                   "--data", "--out", "--seed", "--workers", "--device", "--limit"):
        assert option in result.stdout
    shown = fastft("train", "--help", env={"COLUMNS": "100"}).stdout
    panels = [line.rstrip(":") for line in shown.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert panels == ["Arguments", "Data", "Model", "Training", "Automatic choice", "Validation", "Output", "Advanced",
                      "Other options"]  # --help
    first_screen = shown[:shown.index("\nAutomatic choice:")]
    for option in ("--arch", "--weights", "--size", "--epochs", "--strategy", "--holdout"):
        assert f"\n  {option} " in first_screen or f"\n  {option}/" in first_screen, option
    assert len(first_screen.splitlines()) <= 60 and "vflip" not in shown  # the presets: `fastft augs`, the README
    assert "vflip" in fastft("augs", "--help").stdout


def test_a_run_writes_every_output(trained_run):
    out, result = trained_run
    assert {"model.pkl", "metrics.json", "recipe.toml", "history.csv", "curves.png"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]) == {"loss", "train_acc", "test_acc", "test_acc_tta", "examples_per_sec",  # cifar: tta
                                     "balanced_accuracy", "macro_f1"}
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert set(metrics["epochs"][0]) >= {"epoch", "train_loss", "test_loss", "test_acc", "seconds"}
    assert 0 <= metrics["final"]["test_acc"] <= 1 and metrics["final"]["examples_per_sec"] > 0
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[-1]["test_acc"]) == metrics["final"]["test_acc"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the log: one line per epoch with history.csv's figures, epochs counted across phases, no progress-bar frames
    for row in rows:
        assert (f"epoch {row['epoch']}/2: train_loss {float(row['train_loss']):.4f}, train_acc {float(row['train_acc']):.4f}, "
                f"test_loss {float(row['test_loss']):.4f}, test_acc {float(row['test_acc']):.4f}") in result.stdout
    assert "\r" not in result.output and "\u2588" not in result.output
    assert result.stdout.splitlines()[0].startswith("cifar: 2 epoch(s) of scratch: epochs 1-2: all stages, one-cycle")
    final = metrics["final"]
    assert (f"loss {final['loss']:.3f}, train acc {final['train_acc']:.3f}, test acc {final['test_acc']:.3f} "
            f"({final['test_acc_tta']:.3f} with flip TTA), {final['examples_per_sec']:.1f} examples/sec on cpu") in result.output


def test_model_pkl_loads_with_fastai(trained_run, dataset):
    from fastai.learner import load_learner

    learn = load_learner(trained_run[0] / "model.pkl")
    label, _, probs = learn.predict(next((dataset / "test" / "red").iterdir()))
    assert label in ("blue", "red") and abs(float(probs.sum()) - 1) < 1e-5


def test_saved_recipe_reproduces_the_run(trained_run, tmp_path):
    out = trained_run[0]
    again = invoke("run", out / "recipe.toml", "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    first, second = (json.loads((p / "metrics.json").read_text()) for p in (out, tmp_path / "again"))
    strip = lambda m: [{k: v for k, v in e.items() if k != "seconds"} for e in m["epochs"]]
    assert strip(first) == strip(second)


def test_help_gives_the_probes_cost_as_a_pass_over_the_images_not_seconds():
    from fastft.recipe import Recipe
    from fastft.schedules import STRATEGIES

    shown = fastft("train", "--help", env={"COLUMNS": "200"}).stdout
    strategy = shown[shown.index("--strategy"):shown.index("--epochs")]
    assert "probe (one pass of the backbone over the images" in " ".join(strategy.split())
    assert "seconds" not in STRATEGIES["probe"].help.split("cached pass")[0]  # seconds only once its pass is cached
    assert "one pass of the backbone over them" in Recipe.__dataclass_fields__["strategy"].metadata["help"]


def test_a_second_run_whose_features_are_cached_trains_the_same_numbers(dataset, tmp_path):
    """lp-ft's probe reads the frozen features from the cache the second time: the run must not draw other random
    numbers for it (a loader computing them draws its seed; reading them back draws none)."""
    import hashlib

    args = ["train", dataset, *TINY, "--epochs", "3", "--strategy", "lp-ft", "--seed", "3"]
    env = {"FASTFT_CACHE": str(tmp_path / "cache")}  # empty: the first run computes the features, the second reads them
    for run in ("first", "second"):
        result = fastft(*args, "--out", tmp_path / run, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "cache").glob("*.features.safetensors"))  # the second run had them to read
    digest = lambda run: hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest()
    first, second = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("first", "second"))
    strip = lambda m: [{k: v for k, v in e.items() if k != "seconds"} for e in m["epochs"]]
    assert strip(first) == strip(second) and digest("first") == digest("second")


def test_a_saved_recipe_with_relative_paths_reproduces_from_another_folder(dataset, tmp_path):
    import timm
    from safetensors.torch import save_file

    (tmp_path / "w").mkdir()
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(tmp_path / "w" / "resnet18.safetensors"))
    args = ["--arch", "resnet18", "--size", "32", "--bs", "4", "--workers", "0", "--device", "cpu", "--epochs", "1"]
    first = fastft("train", dataset, *args, "--weights", "w/resnet18.safetensors", "--out", "first", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    saved = (tmp_path / "first" / "recipe.toml").read_text()
    assert f'weights = "{tmp_path / "w" / "resnet18.safetensors"}"' in saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = fastft("run", tmp_path / "first" / "recipe.toml", "--out", "again", cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    metrics = [json.loads((run / "metrics.json").read_text())["epochs"] for run in (tmp_path / "first", elsewhere / "again")]
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in metrics[0]] == \
           [{k: v for k, v in e.items() if k != "seconds"} for e in metrics[1]]


def test_predict_labels_files_and_folders(trained_run, dataset, tmp_path):
    out = trained_run[0]
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    result = invoke("predict", out, dataset / "test", bad, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 8 and "broken.jpg" in result.stderr
    # predict agrees with the run's own test accuracy, image for image (as trained: the cifar recipe's flip TTA)
    correct = sum(Path(r["path"]).parent.name == r["label"] for r in rows) / len(rows)
    assert correct == pytest.approx(json.loads((out / "metrics.json").read_text())["final"]["test_acc_tta"])
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    lines = invoke("predict", out, dataset / "test" / "red").stdout.strip().splitlines()
    assert len(lines) == 4 and all(re.fullmatch(r".+\t(blue|red)\t[01]\.\d{3}", line) for line in lines)


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr


def test_bad_input_is_one_line_and_exit_2(dataset, tmp_path):
    args = [*TINY, "--epochs", "1"]
    _one_line_error(fastft("cifar", "--data", tmp_path / "nowhere", *args), "does not exist", "class folders")
    _one_line_error(fastft("cifar", "--data", dataset, *args, "--arch", "resnet19"), "resnet19", "resnet18")
    _one_line_error(fastft("cifar", "--data", dataset, *args, "--aug", "flip+spin"), "spin", "vflip")
    _one_line_error(fastft("cifar", "--data", dataset, *args, "--device", "cuda:99"), "--device cpu")  # no GPU, or not that one
    _one_line_error(fastft("cifar", "--data", dataset, *args, "--strategy", "warp"), "warp", "fine-tune")
    _one_line_error(fastft("nosuchrecipe"), "nosuchrecipe")
    _one_line_error(fastft("run", tmp_path / "missing.toml"), "missing.toml")
    _one_line_error(fastft("predict", tmp_path / "nomodel", dataset), "no trained model")


def test_existing_output_folder_is_never_overwritten(dataset, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = fastft("cifar", "--data", dataset, *TINY, "--epochs", "1", "--out", out)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"


def test_unreadable_images_in_the_data_are_skipped_and_listed(dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "train" / "red" / "half.png").write_bytes((data / "train" / "red" / "red_1.png").read_bytes()[:60])
    out = tmp_path / "run"
    result = invoke("cifar", "--data", data, *TINY, "--epochs", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert "half.png" in result.stderr and "half.png" in (out / "skipped_images.txt").read_text()


def test_ctrl_c_keeps_the_last_finished_epoch(dataset, tmp_path):
    out = tmp_path / "run"
    exe = Path(sys.executable).with_name("fastft")
    # PYTHONFAULTHANDLER: a run that does not stop prints every thread's stack on SIGABRT, for the failure's message
    # the run starts as from a terminal, where Ctrl-C raises KeyboardInterrupt: a shell that starts pytest in the
    # background (`pytest &`, no job control) hands its children SIGINT ignored, and Python keeps it ignored
    proc = subprocess.Popen([str(exe), "cifar", "--data", str(dataset), *TINY, "--epochs", "200", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (out / "history.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, stderr = proc.communicate()
        before, dump = stderr.split("Fatal Python error", 1) if "Fatal Python error" in stderr else (stderr, "")
        # what it printed first too: an interrupt raised in a finalizer is printed ("Exception ignored in") and lost
        pytest.fail(f"the run did not stop within 120 s of Ctrl-C; it printed:\n{before[-3000:]}\nits threads:\n"
                    f"{dump[:6000]}")
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    assert 1 <= len(epochs) < 200 and (out / "model.pkl").stat().st_size > 0


def test_ctrl_c_during_the_final_tta_pass_still_saves_the_trained_model(dataset, tmp_path):
    import fastft.deploy.bundle
    from fastai.callback.core import Callback

    from fastft.recipe import load_recipe
    from fastft.errors import Interrupted
    from fastft.train.pipeline import train

    class CtrlCInTheNextForwardPass(Callback):
        """When training ends, the model's next forward pass (the final TTA scores) is cut by Ctrl-C."""

        def after_fit(self):
            def pressed(module, inputs):
                handle.remove()
                raise KeyboardInterrupt
            handle = self.learn.model.register_forward_pre_hook(pressed)

    recipe = load_recipe("cifar").replace(data=str(dataset), arch="resnet18", pretrained=False, size=32, bs=4, workers=0,
                                          device="cpu", epochs=1, tta=True)
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="interrupted"):
        train(recipe, str(out), callbacks=[CtrlCInTheNextForwardPass()])
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert "test_acc" in final and "test_acc_tta" not in final
    assert fastft.deploy.bundle.load(out).predict(next((dataset / "test").rglob("*.png")))[0] in ("blue", "red")


def test_wheel_ships_the_recipes(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("fastft-*.whl"))
    assert {"fastft/recipes/hotdog.toml", "fastft/recipes/cifar.toml"} <= set(zipfile.ZipFile(wheel).namelist())
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = "from fastft.recipe import recipe_files; print({n: str(p) for n, p in recipe_files().items()})"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(target)}, check=True).stdout
    assert "hotdog" in shown and "cifar" in shown and str(target) in shown
