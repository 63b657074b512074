"""Two CPU processes under torchrun (gloo), as a user would launch them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, invoke

TORCHRUN = Path(sys.executable).with_name("torchrun")
HERE = Path(__file__).resolve().parent
RUN_FILES = ["curves.png", "history.csv", "metrics.json", "model.json", "model.pkl", "model.safetensors", "recipe.toml",
             "test_files.txt"]  # one set, from rank 0


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
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2
    # the test accuracy covers every test image once: it equals a single-process evaluation of the model
    report = json.loads(invoke("evaluate", out, dataset, "--no-tta", "--json", "--out", tmp_path / "eval").stdout)
    assert report["images"] == 8 and metrics["final"]["test_acc"] == pytest.approx(report["accuracy"])
    tta = json.loads(invoke("evaluate", out, dataset, "--json", "--out", tmp_path / "tta").stdout)  # cifar: tta
    assert tta["tta"] and metrics["final"]["test_acc_tta"] == pytest.approx(tta["accuracy"])


# Every strategy with a code path of its own: the probe (features computed per rank and gathered, the head fitted on
# rank 0 and copied to all), lp-ft (that probe, then fine-tuning with BatchNorm statistics frozen), fine-tune (a frozen
# phase, then everything), keras (BatchNorm frozen, the top stages only) and scratch (random init). d2l and gradual
# differ from fine-tune only in their phases and optimizer.
@pytest.mark.parametrize("strategy", ["probe", "lp-ft", "fine-tune", "keras", "scratch"])
def test_every_strategy_trains_on_two_processes(strategy, dataset, tmp_path):
    import fastft
    from distributed_probe import tiny_recipe
    from fastft.train.pipeline import train

    probes, two = tmp_path / "probes", tmp_path / "two"
    probes.mkdir()
    result = torchrun(HERE / "distributed_probe.py", dataset, two, probes, "train", strategy, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((probes / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # every rank ends with the same weights
    one_epoch = strategy == "probe"  # one pass: no curves.png (a single dot)
    assert sorted(p.name for p in two.iterdir()) == [f for f in RUN_FILES if not (one_epoch and f == "curves.png")]
    assert result.stdout.count("test acc") == 1
    assert f'strategy = "{strategy}"' in (two / "recipe.toml").read_text()

    one = tmp_path / "one"
    train(tiny_recipe("train", str(dataset), strategy), str(one))  # the same recipe in one process
    images = sorted(p for p in (dataset / "test").rglob("*") if p.is_file())
    truth = [p.parent.name for p in images]
    two_model, one_model = fastft.load(two), fastft.load(one)
    two_probs = np.array([list(two_model.predict(p)[1].values()) for p in images])
    one_probs = np.array([list(one_model.predict(p)[1].values()) for p in images])
    assert np.allclose(two_probs.sum(1), 1, atol=1e-5)
    two_metrics, one_metrics = (json.loads((run / "metrics.json").read_text()) for run in (two, one))
    # the run's figures are its saved model's: the test accuracy it printed is the bundle's on the test images
    bundle_accuracy = np.mean([two_model.classes[i] == t for i, t in zip(two_probs.argmax(1), truth)])
    assert two_metrics["final"]["test_acc"] == pytest.approx(bundle_accuracy)
    if strategy in ("probe", "lp-ft"):
        # the probe sees the same features of the same images in one process or two, and fits the same head: its
        # epoch scores the same (LP-FT's later epochs train on global batches of 8 instead of 4, and differ)
        assert two_metrics["epochs"][0]["test_acc"] == one_metrics["epochs"][0]["test_acc"]
        assert two_metrics["epochs"][0]["train_loss"] == pytest.approx(one_metrics["epochs"][0]["train_loss"], rel=1e-3)
        # metrics.json reports the probe's L2 penalty, chosen the same way on the same held-out images
        assert two_metrics["probe"] == one_metrics["probe"] and set(two_metrics["probe"]) == {"penalty", "at_edge", "tried"}
        assert f"{two_metrics['probe']['penalty']:g}" in two_metrics["probe"]["tried"]
    else:
        assert "probe" not in two_metrics  # no probe was fitted
    if strategy == "probe":  # nothing else trains: the same model, to float precision
        np.testing.assert_allclose(two_probs, one_probs, atol=1e-4)


def test_accelerate_launch_runs_the_default_command(dataset, tmp_path):
    """`accelerate launch` is the other launcher the README names: the default recipe (`fastft train DIR`: a trial
    run, then the strategy it chose). Its --multi_gpu launcher starts the processes; with --device cpu they train on
    the CPU over gloo (its --cpu alone starts one process)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fastft", "train", str(dataset),
                             *TINY, "--epochs", "2", "--out", str(out)],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes x batch 4" in result.stdout and result.stdout.count("strategy chosen on") == 1
    probe = 'strategy = "probe"' in (out / "recipe.toml").read_text()  # one pass: no curves.png
    expected = [*(f for f in RUN_FILES if not (probe and f == "curves.png")), "strategy.csv", "strategy.png", "choice.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert json.loads((out / "metrics.json").read_text())["final"]["test_acc"] >= 0


def test_precision_choices(dataset, tmp_path):
    from conftest import fastft

    refused = fastft("cifar", "--data", dataset, *TINY, "--epochs", "1", "--precision", "fp16", "--out", tmp_path / "a")
    assert refused.returncode == 2 and "fp16 needs a CUDA GPU" in refused.stderr and not (tmp_path / "a").exists()
    bf16 = invoke("cifar", "--data", dataset, *TINY, "--epochs", "1", "--precision", "bf16", "--out", tmp_path / "b")
    assert bf16.exit_code == 0, bf16.output
    assert 'precision = "bf16"' in (tmp_path / "b" / "recipe.toml").read_text()


def test_auto_precision_picks_bf16_only_on_cpus_that_have_it_in_hardware(monkeypatch):
    import torch

    from fastft.train import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve_precision("auto", cpu) == "bf16"
    assert devices.resolve_precision("fp32", cpu) == "fp32"  # an explicit choice still wins
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)  # emulated bf16 is slower than fp32
    assert devices.resolve_precision("auto", cpu) == "fp32"
    assert devices.resolve_precision("auto", torch.device("mps")) == "fp32"


def test_channels_last_changes_the_layout_not_the_numbers(dataset, tmp_path):
    import torch

    from fastft.recipe import load_recipe
    from fastft.train.setup import prepare

    recipe = load_recipe("cifar").replace(data=str(dataset), arch="resnet18", pretrained=False, size=32, bs=4,
                                          workers=0, channels_last=True, device="cpu")
    learn = prepare(recipe, str(tmp_path / "prepared")).learn
    stem = learn.model[0].model.conv1.weight
    assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()

    def loss_and_grads(model, xb, yb):
        model.zero_grad()
        loss = learn.loss_func(model(xb), yb)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]
    torch.manual_seed(0)
    xb, yb = torch.randn(16, 3, 32, 32), torch.randint(0, 2, (16,))
    nhwc = loss_and_grads(learn.model.train(), xb.contiguous(memory_format=torch.channels_last), yb)
    nchw = loss_and_grads(learn.model.to(memory_format=torch.contiguous_format), xb.contiguous(), yb)
    assert nhwc[0] == pytest.approx(nchw[0], rel=1e-5)  # one step: equal up to float summation order
    assert all((a - b).norm() <= 1e-4 * a.norm() + 1e-6 for a, b in zip(nhwc[1], nchw[1]))  # float summation order only

    result = invoke("cifar", "--data", dataset, *TINY, "--epochs", "1", "--channels-last", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "channels_last = true" in (tmp_path / "run" / "recipe.toml").read_text()


def test_a_calibrated_run_on_two_processes_fits_the_temperature_one_process_fits(tmp_path):
    """The temperature is fitted on rank 0 after training, on the whole validation split: a probe (the same head
    whatever the number of processes) gets the same temperature and the same calibrated bundle as one process."""
    import fastft
    from conftest import noisy_classes

    data = noisy_classes(tmp_path / "photos", per_class=100)
    args = ["train", data, *TINY, "--epochs", "1", "--strategy", "probe", "--holdout", "0.35"]
    two = torchrun("-m", "fastft", *args, "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("calibrated: temperature") == 1  # rank 0 speaks for all
    one = invoke(*args, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    fitted = [json.loads((tmp_path / run / "metrics.json").read_text())["calibration"] for run in ("two", "one")]
    assert fitted[0]["calibrated"] == fitted[1]["calibrated"] == (fitted[0]["temperature"] != 1.0)
    assert fitted[0]["temperature"] == pytest.approx(fitted[1]["temperature"], rel=1e-3)
    assert (tmp_path / "two" / "reliability.png").is_file()
    images = sorted(data.rglob("*.png"))[:8]
    batch = np.stack([fastft.load(tmp_path / "one").preprocess(p) for p in images])
    np.testing.assert_allclose(fastft.load(tmp_path / "two").probabilities(batch),
                               fastft.load(tmp_path / "one").probabilities(batch), atol=1e-4)
