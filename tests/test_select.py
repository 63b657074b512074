"""Choosing the backbone on the training images: `fastft train DIR --arch a,b` (tiny random-init backbones saved as
local weight files, so nothing needs the hub)."""
import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import SELECTION_ARCHS, TenSecondClock, files_opened, invoke, make_split_dataset
from test_distributed import torchrun

ARCHS = SELECTION_ARCHS
SMALL = ["--size", "32", "--bs", "4", "--workers", "0", "--device", "cpu", "--epochs", "1"]


def selection_of(run: Path) -> list[dict]:
    with open(run / "selection.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_list_of_backbones_is_scored_on_the_training_images_and_the_best_one_trains(weights_folder, tmp_path):
    data = make_split_dataset(tmp_path / "colours", classes=("blue", "red", "green"), per_class=10)
    args = ["train", data, "--arch", ",".join(ARCHS), "--weights", weights_folder, *SMALL, "--seed", "3"]
    first = invoke(*args, "--out", tmp_path / "first")
    assert first.exit_code == 0, first.output
    rows = selection_of(tmp_path / "first")
    assert [r["arch"] for r in rows] == list(ARCHS)  # every candidate, in the order given
    assert sum(r["chosen"] == "true" for r in rows) == 1 and all(0 <= float(r["cv_accuracy"]) <= 1 for r in rows)
    chosen = next(r for r in rows if r["chosen"] == "true")
    assert f"chose {chosen['arch']}" in first.stdout
    recipe = (tmp_path / "first" / "recipe.toml").read_text()
    assert f'arch = "{chosen["arch"]}"' in recipe and "select = false" in recipe  # `fastft run` trains the chosen one
    assert json.loads((tmp_path / "first" / "model.json").read_text())["arch"] == chosen["arch"]
    assert (tmp_path / "first" / "selection.png").read_bytes()[:4] == b"\x89PNG"
    again = invoke(*args, "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    same = lambda rows: [(r["arch"], r["cv_accuracy"], r["cv_log_loss"], r["chosen"]) for r in rows]
    assert same(selection_of(tmp_path / "again")) == same(rows)  # a seeded run reproduces its choice
    # and its numbers, though its second time reads every backbone's features back from the cache
    epochs = lambda run: [{k: v for k, v in e.items() if k != "seconds"}
                          for e in json.loads((tmp_path / run / "metrics.json").read_text())["epochs"]]
    assert epochs("again") == epochs("first")
    # the default (--strategy auto) chose the backbone in its trial: the run checks its labels with it all the same
    with open(tmp_path / "first" / "label_issues.csv", newline="") as f:
        assert next(csv.reader(f))[0] == "file"
    predicted = invoke("predict", tmp_path / "first", data / "test" / "red", "--json")  # the chosen model deploys
    assert predicted.exit_code == 0, predicted.output


def test_choosing_never_opens_a_test_image(weights_folder, tmp_path):
    from fastft.data.augment import parse_aug
    from fastft.data.loaders import load_split
    from fastft.recipe import load_recipe
    from fastft.train import backbone_choice

    data = make_split_dataset(tmp_path / "colours", per_class=8)
    recipe = load_recipe("train").replace(data=str(data), arch=",".join(ARCHS), weights=str(weights_folder), size=32)
    split = load_split(data, recipe, parse_aug(recipe.aug))
    with files_opened() as opened:
        chosen = backbone_choice.choose(split, recipe, backbone_choice.candidates(recipe), torch.device("cpu"))
    assert chosen.chosen.arch in ARCHS
    assert any("/train/" in f for f in opened)  # the spy sees image reads
    assert not [f for f in opened if "/test/" in f]


@pytest.mark.parametrize("options, message", [
    (["--arch", "resnet18,resnet_eighteen"], "unknown architecture 'resnet_eighteen'"),
    (["--arch", "resnet18,mobilenetv3_small_050", "--weights", "resnet18=R,efficientnet_b0=E"],
     "--weights names efficientnet_b0, which --arch does not list"),
    (["--arch", "resnet18,mobilenetv3_small_050", "--no-pretrained"], "drop --no-pretrained"),
    (["--arch", "resnet18,mobilenetv3_small_050", "--weights", "resnet18=/no/such/file.safetensors"],
     "/no/such/file.safetensors does not exist"),
    # a trailing comma, an empty item, a name twice and one backbone under two names: the same error
    (["--arch", "resnet18,", "--weights", "resnet18=R"], "must name each backbone once, separated by single commas"),
    (["--arch", "resnet18,,mobilenetv3_small_050"], "must name each backbone once, separated by single commas (an empty"),
    (["--arch", "resnet18,resnet18"], "must name each backbone once, separated by single commas (resnet18 twice)"),
    (["--arch", "tf_efficientnet_lite0,tf_efficientnet_lite0.in1k"],
     "must name each backbone once, separated by single commas (tf_efficientnet_lite0 and tf_efficientnet_lite0.in1k "
     "are the same weights)"),
])
def test_bad_candidate_lists_are_one_line_errors_before_any_work(options, message, tmp_path):
    data = make_split_dataset(tmp_path / "colours", per_class=4)
    result = invoke("train", data, *options, *SMALL, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_weights_folders_that_cannot_serve_every_candidate_are_one_line_errors_before_any_work(weights_folder, tmp_path):
    import shutil

    data = make_split_dataset(tmp_path / "colours", per_class=4)
    lacking, misfit, single = tmp_path / "lacking", tmp_path / "misfit", tmp_path / "single"
    for folder in (lacking, misfit, single):
        folder.mkdir()
    shutil.copy(weights_folder / f"{ARCHS[0]}.rand.safetensors", lacking)
    shutil.copy(weights_folder / f"{ARCHS[0]}.rand.safetensors", single)
    shutil.copy(weights_folder / f"{ARCHS[0]}.rand.safetensors", misfit)
    shutil.copy(weights_folder / f"{ARCHS[0]}.rand.safetensors", misfit / f"{ARCHS[1]}.rand.safetensors")  # not its own
    cases = [(["--arch", ",".join(ARCHS), "--weights", lacking], f"holds no file for {ARCHS[1]}"),
             (["--arch", ",".join(ARCHS), "--weights", misfit], f"of {ARCHS[1]}; pass the weights of that architecture"),
             (["--arch", "auto", "--weights", single], "choosing a backbone needs at least two candidates, and there is 1")]
    for options, message in cases:
        out = tmp_path / "run"
        result = invoke("train", data, *options, *SMALL, "--out", out)
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1 and not out.exists()


def _score(arch: str, right: list[int]) -> "Score":
    from fastft.train.backbone_choice import Candidate, Score

    correct = torch.tensor(right, dtype=torch.float)
    return Score(Candidate(arch, ""), correct.mean().item(), 1 - correct.mean().item(), 1.0, correct)


def test_a_backbone_is_chosen_over_another_only_beyond_the_noise_of_their_paired_difference():
    from fastft.train.backbone_choice import TIED, WON, beats, decide, paired_difference
    from fastft.train.prior import Prior

    prior = {"small": Prior(75.0, "top-1 75%"), "big": Prior(77.5, "top-1 77.5%"), "other": Prior(70.0, "top-1 70%")}
    # on 160 images the small backbone is right on 3 more (0.919 against 0.900): a coin toss, so the stronger model
    small = _score("small", [1] * 147 + [0] * 13)
    big = _score("big", [1] * 144 + [0] * 16)
    difference, error = paired_difference(small, big)
    assert difference == pytest.approx(3 / 160) and difference < 2 * error and not beats(small, big)
    chosen, reason, verdicts = decide([small, big], prior)
    assert chosen.arch == "big" and reason == TIED
    assert verdicts == {"small": "tied within noise; a weaker ImageNet model", "big": TIED}
    # right on 30 more of the same images: beyond noise, whatever the prior says
    clearly = _score("small", [1] * 150 + [0] * 10)
    worse = _score("big", [1] * 120 + [0] * 40)
    chosen, reason, verdicts = decide([clearly, worse], prior)
    assert beats(clearly, worse) and chosen.arch == "small" and reason == WON
    assert verdicts["big"] == "beaten beyond noise by small"
    # paired: two backbones wrong on the same hard images differ by little noise, though each accuracy is noisy
    same_hard = _score("other", [1] * 150 + [0] * 10)
    nearly = _score("big", [1] * 145 + [0] * 15)
    assert beats(same_hard, nearly)  # 5 images, and none the other gets right: consistent, so beyond noise


def test_the_choice_says_why_with_the_prior_and_deals_the_folds_again_for_a_small_set(weights_folder, tmp_path):
    data = make_split_dataset(tmp_path / "colours", classes=("blue", "red", "green"), per_class=10)
    out = tmp_path / "run"
    result = invoke("train", data, "--arch", ",".join(ARCHS), "--weights", weights_folder, *SMALL, "--strategy", "probe",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert "the folds dealt 3 times" in result.output  # under 500 training images: 3 dealings of the folds
    rows = selection_of(out)
    chosen = [r for r in rows if r["chosen"] == "true"]
    assert len(chosen) == 1 and chosen[0]["reason"] in ("won beyond noise",
                                                        "tied within noise; chose the stronger ImageNet model")
    assert {r["prior_rank"] for r in rows} == {"1", "2"}  # no top-1 known for these: parameters x pixels ranks them
    assert all("parameters at" in r["prior"] for r in rows)
    line = next(l for l in result.output.splitlines() if l.startswith("chose "))
    assert chosen[0]["reason"].split(";")[0] in line and "folds dealt 3 times" in line
    if chosen[0]["reason"].startswith("tied"):  # a tie goes to the stronger ImageNet model: prior rank 1
        assert chosen[0]["prior_rank"] == "1"


def test_a_candidate_whose_weights_fail_to_load_is_reported_and_the_choice_goes_on(weights_folder, tmp_path):
    import shutil

    from fastft.data.augment import parse_aug
    from fastft.data.loaders import load_split
    from fastft.recipe import load_recipe
    from fastft.run_folder import RunFolder
    from fastft.train import backbone_choice

    data = make_split_dataset(tmp_path / "colours", per_class=6)
    broken = tmp_path / "broken.safetensors"
    shutil.copy(weights_folder / f"{ARCHS[0]}.rand.safetensors", broken)  # another network's: fails when it loads
    recipe = load_recipe("train").replace(data=str(data), arch=",".join(ARCHS), size=32,
                                          weights=f"{ARCHS[0]}={weights_folder / f'{ARCHS[0]}.rand.safetensors'},"
                                                  f"{ARCHS[1]}={broken}")
    split = load_split(data, recipe, parse_aug(recipe.aug))
    found = backbone_choice.candidates(recipe)
    selection = backbone_choice.choose(split, recipe, found, torch.device("cpu"))
    assert [s.candidate.arch for s in selection.scores] == [ARCHS[0]] and selection.chosen.arch == ARCHS[0]
    assert [f.candidate.arch for f in selection.failed] == [ARCHS[1]] and selection.reason == "the only candidate scored"
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    backbone_choice.write_report(selection, folder.selection, folder.selection_chart)
    rows = {r["arch"]: r for r in selection_of(folder.path)}
    assert rows[ARCHS[1]]["chosen"] == "false" and rows[ARCHS[1]]["reason"].startswith("failed: weights file")
    assert rows[ARCHS[1]]["cv_accuracy"] == ""  # no figures for what was never scored
    both_broken = recipe.replace(weights=f"{ARCHS[0]}={weights_folder / f'{ARCHS[1]}.rand.safetensors'},{ARCHS[1]}={broken}")
    with pytest.raises(backbone_choice.UsageError, match="no backbone could be scored"):
        backbone_choice.choose(split, both_broken, backbone_choice.candidates(both_broken), torch.device("cpu"))


def test_choosing_on_two_processes_chooses_what_one_process_chooses(weights_folder, tmp_path):
    data = make_split_dataset(tmp_path / "colours", classes=("blue", "red", "green"), per_class=10)
    args = ["train", data, "--arch", ",".join(ARCHS), "--weights", weights_folder, *SMALL, "--strategy", "probe"]
    two = torchrun("-m", "fastft", *args, "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert sum(line.startswith("chose ") for line in two.stdout.splitlines()) == 1  # rank 0 chooses and speaks for all
    one = invoke(*args, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    scores = lambda run: [(r["arch"], r["cv_accuracy"], r["chosen"]) for r in selection_of(tmp_path / run)]
    assert scores("two") == scores("one")
    assert json.loads((tmp_path / "two" / "model.json").read_text())["arch"] == \
        json.loads((tmp_path / "one" / "model.json").read_text())["arch"]


def test_the_budget_stops_the_search_and_keeps_the_best_so_far(weights_folder, tmp_path, capsys):
    from fastft.data.augment import parse_aug
    from fastft.data.loaders import load_split
    from fastft.recipe import load_recipe
    from fastft.errors import UsageError
    from fastft.train import backbone_choice
    from fastft.train.budget import Budget
    from fastft.run_folder import RunFolder

    data = make_split_dataset(tmp_path / "colours", per_class=8)
    recipe = load_recipe("train").replace(data=str(data), arch=",".join(ARCHS), weights=str(weights_folder), size=32)
    split = load_split(data, recipe, parse_aug(recipe.aug))
    found = backbone_choice.candidates(recipe)
    cpu = torch.device("cpu")
    clock = TenSecondClock()
    with pytest.raises(UsageError, match=r"--budget 5s is too small for even one backbone \(resnet18's pass over the "
                                         r"\d+ training images\): about [\d.]+ s here; give at least \d+[sm] "):
        backbone_choice.choose(split, recipe, found, cpu, Budget.start("5s", clock), clock)
    backbone_choice.choose(split, recipe, found, cpu)  # both backbones' features now cached
    assert "s a backbone here (resnet18's pass timed on one batch" in capsys.readouterr().out  # the estimate, upfront
    # the budget starts at 10 (deadline 70), the choice at 20, candidate 1 at 30: its features cached, loading it
    # took 10 s (reading 40), and another 10 s from 50 ends by 70; it ends at 60. At 70, 50 s a candidate from the
    # next reading (80) would end past 70: stop
    clock = TenSecondClock()
    short = backbone_choice.choose(split, recipe, found, cpu, Budget.start("60s", clock), clock)
    assert [s.candidate.arch for s in short.scores] == ["resnet18"] and short.chosen.arch == "resnet18"
    assert [c.arch for c in short.dropped] == ["mobilenetv3_small_050"]
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    backbone_choice.write_report(short, folder.selection, folder.selection_chart)
    assert [(r["arch"], r["chosen"], r["reason"]) for r in selection_of(folder.path)] == [  # every candidate, and why
        ("resnet18", "true", "the only candidate scored"), ("mobilenetv3_small_050", "false", "not scored: --budget")]
    clock = TenSecondClock()
    whole = backbone_choice.choose(split, recipe, found, cpu, Budget.start("2m", clock), clock)
    assert len(whole.scores) == 2 and not whole.dropped


@pytest.mark.parametrize("options, message", [
    (["--budget", "ten minutes", "--arch", "resnet18,mobilenetv3_small_050"], "--budget 'ten minutes' is not a time"),
    (["--budget", "10m", "--strategy", "lp-ft"], "and this run chooses neither"),
])
def test_bad_budgets_are_one_line_errors(options, message, tmp_path):
    data = make_split_dataset(tmp_path / "colours", per_class=4)
    result = invoke("train", data, *options, *SMALL, "--out", tmp_path / "run")
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_auto_offline_without_weights_names_how_to_give_them(tmp_path):
    data = make_split_dataset(tmp_path / "colours", per_class=4)
    result = invoke("train", data, "--arch", "auto", *SMALL, "--out", tmp_path / "run")  # conftest: HF_HUB_OFFLINE=1
    assert result.exit_code == 2 and "--weights ARCH=FILE,ARCH=FILE" in result.output and "--weights DIR" in result.output
    assert "--no-pretrained" not in result.output and not (tmp_path / "run").exists()


@pytest.mark.parametrize("strategy", ["probe", "auto"])
def test_ctrl_c_while_choosing_the_backbone_is_one_line_saying_what_was_kept(weights_folder, tmp_path, monkeypatch,
                                                                             strategy):
    """It exited 130 with no message; under --strategy auto, the trial's message would have offered nothing."""
    from fastft.train import out_of_fold

    scored = out_of_fold.probabilities_of

    def second_pass_interrupted(learn, recipe, *args):
        if recipe.arch == ARCHS[1]:
            raise KeyboardInterrupt  # Ctrl-C during the second backbone's pass
        return scored(learn, recipe, *args)

    monkeypatch.setattr(out_of_fold, "probabilities_of", second_pass_interrupted)
    data = make_split_dataset(tmp_path / "colours", per_class=8)
    out = tmp_path / "run"
    result = invoke("train", data, "--arch", ",".join(ARCHS), "--weights", weights_folder, *SMALL, "--strategy",
                    strategy, "--out", out)
    assert result.exit_code == 130, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("interrupted while choosing the backbone, before anything trained; kept: the frozen "
                           "features of each backbone that finished its pass are cached"), result.output
    assert not out.exists()  # nothing trained: the folder claimed for the run is given back


def test_ctrl_c_during_the_label_check_is_one_line(weights_folder, tmp_path, monkeypatch):
    from fastft.train import label_issues

    def interrupted(recipe):
        raise KeyboardInterrupt
    monkeypatch.setattr(label_issues, "check_folder", interrupted)
    data = make_split_dataset(tmp_path / "colours", per_class=8)
    result = invoke("inspect", data, "--labels-check", "--out", tmp_path / "report")
    assert result.exit_code == 130 and "interrupted while checking the labels: nothing was written" in result.output
    assert not (tmp_path / "report").exists()


def test_a_budget_smaller_than_a_cached_backbone_is_an_error_naming_the_least(weights_folder, tmp_path):
    """With every backbone's features cached, the pass is not timed, and --budget 0.01s was accepted and overrun."""
    from fastft.data.augment import parse_aug
    from fastft.data.loaders import load_split
    from fastft.errors import UsageError
    from fastft.recipe import load_recipe
    from fastft.train import backbone_choice
    from fastft.train.budget import Budget

    data = make_split_dataset(tmp_path / "colours", per_class=8)
    recipe = load_recipe("train").replace(data=str(data), arch=",".join(ARCHS), weights=str(weights_folder), size=32)
    split = load_split(data, recipe, parse_aug(recipe.aug))
    found = backbone_choice.candidates(recipe)
    backbone_choice.choose(split, recipe, found, torch.device("cpu"))  # every backbone's features cached
    with pytest.raises(UsageError, match=rf"--budget 0.01s is too small for even one backbone \({ARCHS[0]}, its "
                                         r"features cached\): about [\d.]+ s here; give at least \d+s"):
        backbone_choice.choose(split, recipe, found, torch.device("cpu"), Budget.start("0.01s"))
