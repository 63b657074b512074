"""Recipes are data: every shipped file is valid, unknown keys are errors, CLI > file > default."""
import re

import pytest

from conftest import fastft
from fastft.errors import UsageError
from fastft.recipe import Recipe, load_recipe, read_recipe_file, recipe_files


def test_shipped_recipes_load_and_are_the_d2l_ones():
    files = recipe_files()
    assert {"hotdog", "cifar"} <= set(files)
    for name, path in files.items():
        recipe = read_recipe_file(path)
        assert recipe.name == name and recipe.description
    hotdog, cifar = load_recipe("hotdog"), load_recipe("cifar")
    assert (hotdog.arch, hotdog.pretrained, hotdog.size, hotdog.epochs) == ("resnet18.tv_in1k", True, 224, 5)
    assert round(hotdog.size / hotdog.crop_pct) == 256 and "crop" in hotdog.aug and "flip" in hotdog.aug
    assert hotdog.data_sha1 == "fba480ffa8aa7e0febbb511d181409f899b9baa5"
    assert (cifar.arch, cifar.pretrained, cifar.aug, cifar.epochs) == ("resnet18", False, "flip", 10)


def test_unknown_key_is_an_error_that_names_it(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text('epohcs = 3\n')
    with pytest.raises(UsageError, match="epohcs"):
        read_recipe_file(path)


@pytest.mark.parametrize("line", ['epochs = "five"', "pretrained = 1", "lr = -1.0", "strategy = \"warp\"", "size = 0",
                                  "label_smoothing = 1.0", "head_dropout = -0.1", "wd = -0.01",
                                  "workers = -1", 'workers = "many"', "workers = 2.5", "lr = nan", 'lr = "inf"',
                                  "wd = inf", "label_smoothing = nan", "seed = 99999999999999999999", "seed = -1",
                                  "size = 60000"])
def test_bad_values_are_errors(tmp_path, line):
    path = tmp_path / "bad.toml"
    path.write_text(line + "\n")
    with pytest.raises(UsageError, match=line.split()[0]):
        read_recipe_file(path)


def test_precedence_cli_over_file_over_default(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("epochs = 3\nlr = 0.01\n")
    from_file = read_recipe_file(path)
    assert (from_file.name, from_file.epochs, from_file.lr) == ("mine", 3, 0.01)
    assert from_file.bs == Recipe().bs  # not in the file: the built-in default
    from_cli = from_file.replace(epochs=7, lr=None)  # None: flag not given
    assert (from_cli.epochs, from_cli.lr) == (7, 0.01)


def test_workers_are_auto_or_a_count_from_a_file_or_the_command_line():
    assert Recipe().workers == "auto"
    assert Recipe().replace(workers="3").workers == 3  # the command line gives text
    assert Recipe().replace(workers=0).workers == 0 and Recipe().replace(workers="auto").workers == "auto"


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe("hotdog").replace(epochs=2, data="/some where/with \"quotes\"", lr=3e-4)
    path = tmp_path / "recipe.toml"
    path.write_text(recipe.to_toml())
    assert read_recipe_file(path) == recipe


def test_a_third_recipe_file_makes_a_third_command(tmp_path):
    (tmp_path / "flowers.toml").write_text('description = "my own flowers recipe"\nepochs = 2\n')
    env = {"FASTFT_RECIPE_PATH": str(tmp_path)}
    listed = fastft("recipes", env=env)
    assert listed.returncode == 0 and "flowers" in listed.stdout and "my own flowers recipe" in listed.stdout
    helped = fastft("flowers", "--help", env=env)
    assert helped.returncode == 0 and "--epochs" in helped.stdout


def test_broken_recipe_file_is_a_clean_error(tmp_path):
    (tmp_path / "broken.toml").write_text("epochs = 3\nbatch = 9\n")
    result = fastft("broken", "--epochs", "1", env={"FASTFT_RECIPE_PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "batch" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--lr", "inf"), ("--wd", "inf"),
                                        ("--seed", "99999999999999999999"), ("--size", "60000")])
def test_bad_values_on_the_command_line_are_one_line_errors(dataset, tmp_path, flag, value):
    result = fastft("train", dataset, flag, value, "--out", tmp_path / "run")
    assert result.returncode == 2 and flag.strip("-") in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_recipe_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeffepochs = 3\n".encode("utf-8"))
    assert read_recipe_file(path).epochs == 3


def test_a_typo_gets_a_suggestion_and_no_advice_that_cannot_help(dataset, tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("epohcs = 3\n")
    with pytest.raises(UsageError, match=r"unknown key 'epohcs'.*\(did you mean epochs\?\)"):
        read_recipe_file(path)
    typo = dataset.with_name(dataset.name[:-1])  # the data folder's name with its last letter missing
    result = fastft("train", typo, "--out", tmp_path / "run")
    assert result.returncode == 2 and f"(did you mean {dataset}?)" in result.stderr, result.stderr
    assert "--data" not in result.stderr  # `train` takes the folder as its argument


@pytest.mark.parametrize("lines, says", [
    ('strategy = "probe"\nema = 0.9', "--ema averages the weights over the training steps"),
    ('mixup = 0.4\ncutmix = 1.0', "--mixup and --cutmix"),
    ('strategy = "fine-tune"\nwise = 0.5', "--wise (the WiSE-FT weight) is a setting of only --strategy lp-ft"),
    ('strategy = "auto"\nwise = "auto"', "--strategy auto chooses the WiSE-FT weight itself"),
    ('strategy = "lp-ft"\nbudget = "10m"', "--budget bounds choosing"),
    ('arch = "resnet18,resnet34"\nstrategy = "scratch"', "starts from random weights, so there is no backbone"),
])
def test_rules_between_keys_hold_for_a_recipe_file_before_any_work(tmp_path, lines, says):
    # Recipe.check: the same one-line errors a command line gets, for a file too, before any data is read
    path = tmp_path / "contradicts.toml"
    path.write_text(lines + "\n")
    with pytest.raises(UsageError, match=re.escape(says)):
        read_recipe_file(path)
    fine = tmp_path / "fine.toml"
    fine.write_text('strategy = "lp-ft"\nwise = 0.5\nema = 0.9\n')
    assert (read_recipe_file(fine).wise, read_recipe_file(fine).ema) == (0.5, 0.9)


@pytest.mark.parametrize("key, value, says", [("valid_pct", 1.0, "in (0, 1)"), ("ema", 1.0, "in [0, 1)"),
                                              ("crop_pct", 0.0, "in (0, 1]"), ("epochs", 0, "at least 1"),
                                              ("size", 5000, "in [1, 4096]"), ("limit", -1, "at least 0")])
def test_each_key_is_held_to_the_range_its_field_declares(key, value, says):
    with pytest.raises(UsageError, match=re.escape(f"'{key}' in the command line must be {says}")):
        Recipe().replace(**{key: value})


def test_patience_takes_on_the_command_line_the_default_its_help_shows(tmp_path):
    """--help showed [default: (0); x>=1], and --patience 0 was an error."""
    from conftest import invoke

    result = invoke("train", tmp_path / "nowhere", "--patience", "0")
    assert result.exit_code == 2 and "does not exist" in result.output and "--patience" not in result.output
    shown = invoke("train", "--help").output.split("\n  --patience ", 1)[1].split("\n  --", 1)[0]
    assert "x>=0" in shown and "x>=1" not in shown
    # --head-dropout says which strategies it acts in (it was shown for the probe, where it does nothing)
    dropout = invoke("train", "--help").output.split("\n  --head-dropout ", 1)[1].split("\n  --", 1)[0]
    assert "lp-ft" in dropout and "The probe's one solve uses none" in " ".join(dropout.split())
