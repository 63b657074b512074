"""WiSE-FT (`--wise`): lp-ft's fine-tuned weights averaged with its probe's, one network."""
import json
from pathlib import Path

import numpy as np

from conftest import TINY, invoke, make_split_dataset, make_unlearnable_split
from test_distributed import torchrun


def log_probabilities(run: Path, images: list[Path]) -> np.ndarray:
    import fastft

    model = fastft.load(run)
    # log-probabilities: these easy colours end near 0 and 1, where plain probabilities hide every difference
    return np.log(model.probabilities(np.stack([model.preprocess(p) for p in images])).astype(np.float64))


def test_mixing_weight_0_is_the_probe_and_1_the_fine_tuned_network(tmp_path):
    data = make_split_dataset(tmp_path / "colours", classes=("blue", "red", "green"), per_class=8)
    lp_ft = [*TINY, "--strategy", "lp-ft", "--epochs", "2", "--keep", "last", "--lr", "3e-3"]
    runs = {"wise0": ["--wise", "0"], "wise1": ["--wise", "1"], "plain": [],
            "probe": ["--strategy", "probe", "--epochs", "1"]}
    for name, options in runs.items():
        result = invoke("train", data, *lp_ft, *options, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
    images = sorted((data / "test").rglob("*.*"))
    probe, tuned = log_probabilities(tmp_path / "probe", images), log_probabilities(tmp_path / "plain", images)
    assert np.abs(probe - tuned).max() > 0.5  # fine-tuning moved the network: the two ends differ
    np.testing.assert_allclose(log_probabilities(tmp_path / "wise0", images), probe, atol=1e-3)
    np.testing.assert_allclose(log_probabilities(tmp_path / "wise1", images), tuned, atol=1e-3)
    assert json.loads((tmp_path / "wise0" / "metrics.json").read_text())["wise"]["weight"] == 0.0


def test_auto_chooses_the_weight_on_the_validation_split_and_other_strategies_refuse_it(tmp_path):
    # a probe at chance on the validation split: fine-tuning could beat it, so the run fine-tunes (tie.probe_out_of_reach)
    data = make_unlearnable_split(tmp_path / "colours")
    result = invoke("train", data, *TINY, "--strategy", "lp-ft", "--epochs", "2", "--keep", "last", "--wise", "auto",
                    "--holdout", "0.3", "--out", tmp_path / "auto")
    assert result.exit_code == 0, result.output
    wise = json.loads((tmp_path / "auto" / "metrics.json").read_text())["wise"]
    assert "validation split" in wise["chosen_on"] and len(wise["valid_acc_by_weight"]) == 11
    assert 0 <= wise["weight"] <= 1 and "WiSE-FT: weights" in result.stdout
    refused = invoke("train", data, *TINY, "--strategy", "fine-tune", "--wise", "0.5", "--out", tmp_path / "refused")
    assert refused.exit_code == 2 and "only --strategy lp-ft" in refused.output
    assert not (tmp_path / "refused").exists()
    bad = invoke("train", data, *TINY, "--wise", "1.5", "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "'wise'" in bad.output


def test_wise_on_two_processes(tmp_path):
    # a probe at chance on 18 validation images: fine-tuning could beat it, so the run fine-tunes
    data = make_unlearnable_split(tmp_path / "colours")
    args = ["train", data, *TINY, "--strategy", "lp-ft", "--epochs", "2", "--wise", "auto", "--holdout", "0.3"]
    two = torchrun("-m", "fastft", *args, "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("WiSE-FT: weights") == 1
    assert "weight" in json.loads((tmp_path / "two" / "metrics.json").read_text())["wise"]
