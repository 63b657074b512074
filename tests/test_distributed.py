"""Two CPU processes under torchrun (gloo), as a user would launch them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, invoke

TORCHRUN = Path(sys.executable).with_name("torchrun")
HERE = Path(__file__).resolve().parent


def torchrun(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_two_processes_shard_the_data_and_end_with_the_same_weights(dataset, tmp_path):
    probes = tmp_path / "probes"
    probes.mkdir()
    result = torchrun(HERE / "distributed_probe.py", dataset, tmp_path / "run", probes, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((probes / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # 16 training images, batch 4: one process takes 4 batches an epoch; each of two takes half
    for epoch in range(2):
        assert [r["epochs"][epoch]["batches"] for r in ranks] == [2, 2]
        assert sum(r["epochs"][epoch]["examples"] for r in ranks) == 16


def test_the_cli_under_torchrun_writes_one_set_of_outputs(dataset, tmp_path):
    out = tmp_path / "run"
    result = torchrun("-m", "fastft", "cifar", "--data", dataset, *TINY, "--epochs", "2", "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes x batch 4 (global batch 8" in result.stdout
    assert result.stdout.count("test acc") == 1  # one summary line: rank 0 speaks for all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no stray run folders from rank 1
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "history.csv", "metrics.json", "model.json",
                                                     "model.pkl", "model.safetensors", "recipe.toml"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2
    # the test accuracy covers every test image once: it equals a single-process evaluation of the model
    report = json.loads(invoke("evaluate", out, dataset, "--no-tta", "--json", "--out", tmp_path / "eval").stdout)
    assert report["images"] == 8 and metrics["final"]["test_acc"] == pytest.approx(report["accuracy"])
    tta = json.loads(invoke("evaluate", out, dataset, "--json", "--out", tmp_path / "tta").stdout)  # cifar: tta
    assert tta["tta"] and metrics["final"]["test_acc_tta"] == pytest.approx(tta["accuracy"])


def test_precision_choices(dataset, tmp_path):
    from conftest import fastft

    refused = fastft("cifar", "--data", dataset, *TINY, "--epochs", "1", "--precision", "fp16", "--out", tmp_path / "a")
    assert refused.returncode == 2 and "fp16 needs a CUDA GPU" in refused.stderr and not (tmp_path / "a").exists()
    bf16 = invoke("cifar", "--data", dataset, *TINY, "--epochs", "1", "--precision", "bf16", "--out", tmp_path / "b")
    assert bf16.exit_code == 0, bf16.output
    assert 'precision = "bf16"' in (tmp_path / "b" / "recipe.toml").read_text()


def test_compare_refuses_to_run_under_a_launcher(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("compare", "cifar", "--data", dataset, *TINY, "--strategy", "fine-tune,scratch", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "one process" in result.output and not (tmp_path / "c").exists()
