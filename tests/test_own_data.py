"""Your own data, as a new user meets it: `fastft train DIR`, folders that are not class folders, evaluating
on the run's own folder, the LR finder on a small set, and what --help and `fastft recipes` show."""
import json
import re
import shutil
import stat

import pytest

from conftest import TINY, fastft, invoke, make_class_folders, write_image
from fastft.data.folders import find_images
from fastft.errors import UsageError


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of class folders with no split, as users keep their photos: 8 per class."""
    return make_class_folders(tmp_path_factory.mktemp("mine") / "my photos", per_class=8)


@pytest.fixture(scope="module")
def photo_run(photos, tmp_path_factory):
    """`fastft train DIR` with no --out, from a fresh working folder: (working folder, run folder, result)."""
    cwd = tmp_path_factory.mktemp("cwd")
    result = fastft("train", photos, *TINY, "--epochs", "2", "--valid-pct", "0.25", cwd=cwd)
    assert result.returncode == 0, result.stderr
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1
    return cwd, runs[0], result


def test_train_names_the_run_after_the_folder(photo_run):
    _, run, result = photo_run
    assert re.fullmatch(r"my_photos-\d{8}-\d{6}", run.name)
    assert 'name = "my_photos"' in (run / "recipe.toml").read_text()
    assert result.stdout.startswith("choosing the strategy: a trial run of lp-ft")  # the train recipe: --strategy auto
    chosen = "lp-ft" if 'strategy = "lp-ft"' in (run / "recipe.toml").read_text() else "probe"
    assert ("my_photos: 2 epoch(s) of lp-ft: epoch 1: the head fitted" if chosen == "lp-ft" else
            "my_photos: a linear probe: one pass over the features") in result.stdout
    assert "12 train / 4 test images, 2 classes" in result.stdout  # a quarter of each class held out
    assert {"model.safetensors", "model.json", "metrics.json"} <= {p.name for p in run.iterdir()}


def test_every_output_file_gets_the_usual_permissions(photo_run):
    _, run, _ = photo_run
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir()}
    assert modes["model.safetensors"] == modes["metrics.json"] == modes["model.json"]
    assert not [p.name for p in run.iterdir() if "partial" in p.name]  # no temporary files left


def test_evaluate_on_the_runs_own_folder_scores_only_the_held_out_images(photo_run, photos, tmp_path):
    _, run, _ = photo_run
    report = json.loads(invoke("evaluate", run, photos, "--json", "--out", tmp_path / "own").stdout)
    metrics = json.loads((run / "metrics.json").read_text())
    assert report["images"] == 4 and "held out" in report["scored"]
    assert report["accuracy"] == pytest.approx(metrics["final"]["test_acc"])
    # without DATA: the data its recipe.toml names, so the same held-out images
    implied = json.loads(invoke("evaluate", run, "--json", "--out", tmp_path / "implied").stdout)
    assert (implied["images"], implied["scored"], implied["accuracy"]) == (4, report["scored"], report["accuracy"])
    other = make_class_folders(tmp_path / "other", per_class=3, seed=7)
    shown = invoke("evaluate", run, other, "--out", tmp_path / "other-eval")
    assert shown.exit_code == 0, shown.output
    assert "on 6 images: every image in the class folders of" in shown.stdout


def test_a_folder_with_one_class_folder_and_a_csv_is_an_error_that_names_both(tmp_path):
    root = tmp_path / "cats"
    for i in range(4):
        write_image(root / "images" / f"{i}.jpg", (200, 100, 50))
    (root / "labels.csv").write_text("image,label\n0.jpg,tabby\n1.jpg,tabby\n2.jpg,siamese\n3.jpg,siamese\n")
    with pytest.raises(UsageError, match=r"one class folder \(images/\); a classifier needs at least two.*labels.csv.*--labels"):
        find_images(root, 0.2, 0)
    result = fastft("train", root, *TINY, "--epochs", "1", "--out", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr and not (tmp_path / "run").exists()
    assert len(result.stderr.strip().splitlines()) == 1 and "labels.csv" in result.stderr


def test_a_class_too_small_to_hold_out_a_test_image_is_named(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=6)
    for extra in list((root / "red").iterdir())[1:]:
        extra.unlink()
    with pytest.raises(UsageError, match=r"class 'red' has 1 image\(s\): too few .*at least 3 needed"):
        find_images(root, 0.2, 0)


def test_lr_find_loops_over_a_small_set_and_refuses_options_that_do_nothing(photos, tmp_path):
    found = invoke("lr-find", "train", "--data", photos, *TINY, "--out", tmp_path / "find")
    assert found.exit_code == 0, found.output
    assert "up to 100 steps" in found.stdout  # 12 images, batch 4: 3 batches a pass, looped over for a usable curve
    steps = [int(m) for m in re.findall(r"lr-find: step (\d+)/100", found.stdout)]
    assert steps and max(steps) == 100 and (tmp_path / "find" / "lr_find.png").is_file()
    assert not (tmp_path / "find" / "models").exists()
    refused = fastft("lr-find", "train", "--data", photos, *TINY, "--epochs", "3", "--out", tmp_path / "again")
    assert refused.returncode == 2 and "--epochs" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "again").exists()


def test_help_shows_each_recipes_own_values_and_wraps_at_80_columns():
    cifar = fastft("cifar", "--help", env={"COLUMNS": "80"}).stdout
    hotdog = fastft("hotdog", "--help", env={"COLUMNS": "80"}).stdout

    def default_of(text, flag):
        block = text[text.index("\n  " + flag + " "):]  # the option's own line, not a mention in another's help
        return re.search(r"\[default:\s*\(([^)]*)\)\]", block.replace("\n", " ")).group(1)
    assert default_of(cifar, "--size") == "40" and default_of(hotdog, "--size") == "224"
    assert default_of(cifar, "--strategy") == "scratch" and default_of(hotdog, "--epochs") == "5"
    assert "…" not in cifar and all(len(line) <= 80 for line in cifar.splitlines())
    listed = fastft("recipes").stdout
    assert "fastft cifar: resnet18, scratch, 10 epochs" in listed and "fastft train DIR:" in listed


def test_a_user_recipe_named_like_a_command_is_refused_with_a_warning(tmp_path, trained_run, dataset):
    (tmp_path / "predict.toml").write_text('description = "mine"\nepochs = 1\n')
    result = fastft("predict", trained_run[0], dataset / "test" / "red", env={"FASTFT_RECIPE_PATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr  # the built-in command still runs
    assert "ignoring recipe" in result.stderr and "predict.toml" in result.stderr and "fastft command" in result.stderr
    assert len(result.stdout.strip().splitlines()) == 4
    shutil.copy(tmp_path / "predict.toml", tmp_path / "hotdog.toml")
    listed = fastft("recipes", env={"FASTFT_RECIPE_PATH": str(tmp_path)})
    assert "hotdog.toml" in listed.stderr and "already" in listed.stderr and "d2l 13.2" in listed.stdout
