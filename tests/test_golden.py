"""Behaviour pinned before moving code (issue 40): tiny seeded runs of every training path, at one process and under
torchrun at two, plus a resume after kill -9, give the weights, test accuracy and choices recorded in golden.json.

A refactor must leave every figure here as it is. Where a real bug fix changes one, re-record it with
`FASTFT_GOLDEN=record pytest tests/test_golden.py` and say in that commit which figure changed and why.

The exact figures (weights, losses) hold on the kind of machine they were recorded on: another CPU's kernels and
number formats give the same choices and test accuracies but weights and losses a little apart (an AVX512-BF16 CPU
against the one these were first recorded on, 2026-12-07: losses 0.1-4% apart). So each run's record names its
machine (`machine()`); on that machine every figure must match, and on any other what does not depend on rounding:
every choice, the kept epoch, the test accuracies and the tables without their losses.
"""
import csv
import json
import os
import platform
from pathlib import Path

import numpy as np

import pytest
import torch
from PIL import Image

from conftest import SELECTION_ARCHS, TINY, invoke
from test_distributed import torchrun
from test_lifecycle import _kill_after_checkpoint, _start, fastft, weights_digest

GOLDEN = Path(__file__).with_name("golden.json")
RECORDING = os.environ.get("FASTFT_GOLDEN") == "record"
SELECT = ["--arch", ",".join(SELECTION_ARCHS), "--size", "32", "--bs", "4", "--workers", "0", "--device", "cpu"]

# name -> (arguments after `train DATA`, whether it runs under torchrun at 2 processes)
RUNS = {
    "probe": ([*TINY, "--strategy", "probe", "--epochs", "1"], False),
    "lp-ft": ([*TINY, "--strategy", "lp-ft", "--epochs", "3"], False),
    "auto": ([*TINY, "--strategy", "auto", "--epochs", "2"], False),
    "select-auto": ([*SELECT, "--strategy", "auto", "--epochs", "2"], False),
    "select-wise": ([*SELECT, "--strategy", "lp-ft", "--wise", "0.5", "--epochs", "2"], False),
    "select-ema": ([*SELECT, "--strategy", "lp-ft", "--ema", "0.9", "--epochs", "3"], False),
    "lp-ft-wise-2proc": ([*TINY, "--strategy", "lp-ft", "--wise", "0.5", "--epochs", "2"], True),
    "auto-2proc": ([*TINY, "--strategy", "auto", "--epochs", "2"], True),
}


def outcome(run: Path) -> dict:
    """What a refactor must not change: the saved weights, the test accuracy, and everything the run chose."""
    metrics = json.loads((run / "metrics.json").read_text())
    chosen = {"arch": json.loads((run / "model.json").read_text())["arch"]}
    if "strategy_choice" in metrics:
        chosen["strategy"] = metrics["strategy_choice"]["chosen"]
    if "wise" in metrics:
        chosen["wise_weight"] = metrics["wise"]["weight"]
    tables = {name: [stable(row) for row in csv.DictReader(open(run / name, newline=""))]
              for name in ("strategy.csv", "selection.csv") if (run / name).exists()}
    return {"weights": weights_digest(run), "test_acc": metrics["final"]["test_acc"], "chosen": chosen,
            "kept_epoch": metrics["kept_epoch"], "tables": tables,
            "epochs": [{k: v for k, v in e.items() if k != "seconds"} for e in metrics["epochs"]]}


def stable(row: dict) -> dict:
    """A table row without what differs between two runs of the same code: timings, and where the weights lie."""
    return {k: Path(v).name if k == "weights" else v for k, v in row.items() if k != "seconds"}


def machine() -> str:
    """What exact figures depend on besides the code: the CPU, its widest kernels, whether bf16 runs in hardware
    (`--precision auto` trains in it there), and torch's build."""
    from fastft.train.devices import cpu_has_native_bf16

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return (f"{platform.machine()} {model}, {torch.backends.cpu.get_cpu_capability()}"
            f"{' with native bf16' if cpu_has_native_bf16() else ''}, torch {torch.__version__}")


def rounding_free(outcome: dict) -> dict:
    """What a run gives on any machine: its choices, kept epoch and test accuracies, and its tables less their losses
    (training accuracy is left out too: under augmentation one image near the boundary tips either way)."""
    return {"chosen": outcome["chosen"], "kept_epoch": outcome["kept_epoch"], "test_acc": outcome["test_acc"],
            "epoch_test_acc": [e.get("test_acc") for e in outcome["epochs"]],
            "tables": {name: [{k: v for k, v in row.items() if not k.endswith("loss")} for row in rows]
                       for name, rows in outcome["tables"].items()}}


def check(name: str, got: dict) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if RECORDING:
        GOLDEN.write_text(json.dumps({**golden, name: {"machine": machine(), **got}}, indent=2, sort_keys=True) + "\n")
        return
    assert name in golden, f"no golden figures for {name}: record them (see this file's docstring)"
    recorded = dict(golden[name])
    recorded_on = recorded.pop("machine")
    assert rounding_free(got) == rounding_free(recorded)
    if recorded_on == machine():
        assert got == recorded


def noisy_split(root: Path, train_per_class: int, test_per_class: int, size: int = 32) -> Path:
    """Three classes of noise whose means differ a little: every model is wrong on some images, so the figures
    below (and the choices made on them) move with any change to what trains."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, mean in (("dark", 110), ("mid", 128), ("light", 146)):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(mean, 50, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return noisy_split(tmp_path_factory.mktemp("golden") / "noise", train_per_class=10, test_per_class=6)


@pytest.mark.parametrize("name", list(RUNS))
def test_every_training_path_gives_its_recorded_weights_and_choices(name, data, weights_folder, tmp_path):
    options, two_processes = RUNS[name]
    args = ["train", data, *options, "--seed", "7", "--out", tmp_path / "run"]
    if name.startswith("select"):  # the backbones' weights: local files, as a user offline gives them
        args += ["--weights", weights_folder]
    if two_processes:
        result = torchrun("-m", "fastft", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    else:
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    check(name, outcome(tmp_path / "run"))


def test_a_run_killed_after_an_epoch_resumes_to_its_recorded_weights(tmp_path):
    # enough images that an epoch takes a moment: room to kill the run inside its third epoch
    data = noisy_split(tmp_path / "photos", train_per_class=24, test_per_class=8, size=48)
    cut = tmp_path / "cut"
    proc = _start(["train", data, *TINY, "--size", "48", "--epochs", "4", "--strategy", "lp-ft", "--ema", "0.9",
                   "--wise", "0.5", "--seed", "7", "--out", cut], tmp_path / "cut.log")
    _kill_after_checkpoint(proc, cut, epochs_done=2)
    resumed = fastft("resume", cut)
    assert resumed.returncode == 0, resumed.stderr
    check("resumed", outcome(cut))
