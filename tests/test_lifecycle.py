"""The training lifecycle: the best epoch kept, early stopping, resuming after SIGKILL, files never half
written, TensorBoard logs."""
import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import TINY, fastft, invoke, make_class_folders, make_split_dataset
from fastft.train import checkpoint

FASTFT = Path(sys.executable).with_name("fastft")


def weights_digest(run: Path) -> str:
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(run / "model.safetensors")).items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def test_keep_best_picks_the_epoch_with_the_best_validation_accuracy(tmp_path):
    data = make_class_folders(tmp_path / "photos", per_class=10)
    out = tmp_path / "run"
    result = invoke("train", data, *TINY, "--epochs", "3", "--holdout", "0.25", "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = metrics["epochs"]
    assert all({"valid_loss", "valid_acc", "test_loss", "test_acc"} <= set(e) for e in epochs)
    best = max(epochs, key=lambda e: (e["valid_acc"], -e["epoch"]))  # the first epoch with the best accuracy
    assert metrics["kept_epoch"] == best["epoch"] and metrics["final"]["test_acc"] == best["test_acc"]
    assert "keeping the best epoch" in result.stdout
    # the bundle holds that epoch's weights: scoring the test split again gives its test accuracy
    report = json.loads(invoke("evaluate", out, data, "--json", "--out", tmp_path / "eval").stdout)
    assert report["accuracy"] == pytest.approx(best["test_acc"])
    with open(out / "history.csv") as f:
        assert next(csv.reader(f))[:8] == ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "valid_loss",
                                           "valid_acc", "seconds"]


def test_without_a_validation_split_the_last_epoch_is_kept_and_the_run_says_why(trained_run):
    out, result = trained_run  # the cifar recipe: a train and a test split only
    assert "keeping the last epoch (no validation split" in result.stdout and "overstate" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["kept_epoch"] == 2
    assert 'keep = "last"' in (out / "recipe.toml").read_text()  # the resolved recipe says what happened


def test_patience_stops_the_schedule_and_says_so(tmp_path):
    data = make_class_folders(tmp_path / "photos", per_class=10)
    out = tmp_path / "run"
    # lp-ft: auto's run on a validation split (lp-ft --wise auto) would stop after a probe no epoch could beat here
    result = invoke("train", data, *TINY, "--strategy", "lp-ft", "--epochs", "12", "--holdout", "0.25", "--patience",
                    "1", "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    ran = len(metrics["epochs"])
    assert ran < 12 and f"skipping epochs {ran + 1}-12" in result.stdout and "stopped_early" in metrics
    assert metrics["epochs"][metrics["kept_epoch"] - 1]["valid_acc"] == max(e["valid_acc"] for e in metrics["epochs"])
    assert (out / "model.json").is_file() and not (out / checkpoint.CHECKPOINT).exists()


@pytest.mark.parametrize("value", ["-1", "-2"])
def test_patience_below_zero_is_an_error(value, dataset, tmp_path):  # 0: never, the default
    result = fastft("train", dataset, *TINY, "--patience", value, "--out", tmp_path / "run")
    assert result.returncode == 2 and "--patience" in result.stderr and not (tmp_path / "run").exists()
    assert len(result.stderr.strip().splitlines()) == 1


def _start(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(FASTFT), *map(str, args)], stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _kill_after_checkpoint(proc, run: Path, epochs_done: int, timeout: float = 300) -> None:
    """SIGKILL the run as soon as the checkpoint of epoch `epochs_done` is in place: in the next epoch."""
    deadline = time.monotonic() + timeout
    history, saved = run / "history.csv", run / checkpoint.CHECKPOINT
    while time.monotonic() < deadline and proc.poll() is None:
        rows = len(history.read_text().splitlines()) - 1 if history.exists() else 0
        if rows == epochs_done and saved.exists() and saved.stat().st_mtime_ns >= history.stat().st_mtime_ns:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"the run did not reach epoch {epochs_done} in time (exit {proc.poll()})")


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory):
    """Enough images that an epoch takes a moment: room to kill a run inside one."""
    return make_split_dataset(tmp_path_factory.mktemp("slow") / "photos", per_class=24)


@pytest.mark.parametrize("extra", [[], ["--wise", "0.5"], ["--ema", "0.9"]], ids=["lp-ft", "wise", "ema"])
def test_a_run_killed_in_epoch_3_of_4_resumes_to_the_same_weights(extra, slow_data, tmp_path):
    # lp-ft: epoch 1 is the probe, epochs 2-4 one fine-tuning phase; random crops draw from Python's generator.
    # --wise: the probe epoch's weights, averaged in at the end, come back from the checkpoint
    # --ema: the average and the weights training goes on from are both in it, and differ
    args = ["train", slow_data, *TINY, "--size", "48", "--epochs", "4", "--strategy", "lp-ft", *extra]
    whole = fastft(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    proc = _start([*args, "--out", cut], tmp_path / "cut.log")
    _kill_after_checkpoint(proc, cut, epochs_done=2)
    assert torch.load(cut / checkpoint.CHECKPOINT, weights_only=True)["epoch"] == 2
    assert not (cut / "model.safetensors").exists()
    resumed = fastft("resume", cut)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 2 of 4" in resumed.stdout
    assert weights_digest(cut) == weights_digest(tmp_path / "whole")
    strip = lambda run: [{k: v for k, v in e.items() if k != "seconds"} for e in json.loads((run / "metrics.json").read_text())["epochs"]]
    assert strip(cut) == strip(tmp_path / "whole")
    assert not (cut / checkpoint.CHECKPOINT).exists()  # finished: nothing left to resume


def _every_file_is_whole(run: Path) -> None:
    from PIL import Image
    from safetensors.torch import load_file

    for path in run.iterdir():
        if path.name.startswith("."):  # a killed write's temporary file: never one of the run's files
            assert ".partial" in path.name
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            rows = list(csv.DictReader(path.open()))
            assert all(row["seconds"] for row in rows)
        elif path.suffix == ".png":
            with Image.open(path) as im:
                im.verify()
        elif path.suffix == ".toml":
            tomllib.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.name == checkpoint.CHECKPOINT:
            checkpoint.load(run)


def test_files_are_whole_whenever_a_run_is_killed_and_it_resumes_each_time(dataset, tmp_path):
    run = tmp_path / "run"
    args = ["train", dataset, *TINY, "--epochs", "6", "--strategy", "lp-ft", "--log", "tensorboard"]
    proc = _start([*args, "--out", run], tmp_path / "log")
    for epochs_done, delay in ((1, 0.0), (3, 0.15), (5, 0.3)):
        if epochs_done > 1:
            proc = _start(["resume", run], tmp_path / "log")
        _kill_after_checkpoint(proc, run, epochs_done)
        time.sleep(delay)
        _every_file_is_whole(run)
    final = fastft("resume", run)
    assert final.returncode == 0, final.stderr
    _every_file_is_whole(run)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # resuming cleared the temporary files
    assert len(json.loads((run / "metrics.json").read_text())["epochs"]) == 6


def test_resume_refuses_what_it_cannot_continue_and_changes_nothing(trained_run, slow_data, tmp_path):
    finished = fastft("resume", trained_run[0])
    assert finished.returncode == 2 and "finished" in finished.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fastft("resume", empty).returncode == 2
    assert "does not exist" in fastft("resume", tmp_path / "nowhere").stderr
    cut = tmp_path / "cut"
    proc = _start(["train", slow_data, *TINY, "--epochs", "3", "--strategy", "lp-ft", "--out", cut], tmp_path / "log")
    _kill_after_checkpoint(proc, cut, epochs_done=1)
    saved = cut / checkpoint.CHECKPOINT
    good = saved.read_bytes()
    saved.write_bytes(good[: len(good) // 2])
    before = {p.name: p.read_bytes() for p in cut.iterdir() if p.is_file()}
    truncated = fastft("resume", cut)
    assert truncated.returncode == 2 and "truncated or corrupt" in truncated.stderr and "Traceback" not in truncated.stderr
    assert {p.name: p.read_bytes() for p in cut.iterdir() if p.is_file()} == before
    state = torch.load(__import__("io").BytesIO(good), weights_only=True)
    state["recipe"] = state["recipe"].replace("seed = 42", "seed = 42\nbatch_norm = 3")  # a key fastft no longer knows
    torch.save(state, saved)
    invalid = fastft("resume", cut)
    assert invalid.returncode == 2 and "batch_norm" in invalid.stderr and "no longer validates" in invalid.stderr
    assert fastft("train", slow_data, "--resume", cut, "--epochs", "2").returncode == 2  # --resume takes no other option


def test_tensorboard_logs_losses_rates_figures_and_images(tmp_path, dataset):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = invoke("train", dataset, *TINY, "--epochs", "2", "--strategy", "lp-ft", "--log", "tensorboard", "--out", out)
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/batch_loss", "lr/group0", "acc/test", "loss/train", "acc/train"} <= scalars
    assert [e.step for e in events.Scalars("acc/test")] == [1, 2]
    batches = events.Scalars("train/batch_loss")
    assert len(batches) == 4 and [e.step for e in batches] == [1, 2, 3, 4]  # 16 images, batch 4; epoch 1 is the probe
    assert "train/augmented" in events.Tags()["images"]


def test_a_full_disk_while_saving_leaves_the_earlier_files_whole(dataset, tmp_path, monkeypatch):
    import errno

    flush = os.fsync

    def disk_full_for_the_bundle(fd):  # the disk fills up as the bundle's weights are written
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name  # the bundle's temporary file, .model.PID.partial.safetensors
        if name.startswith(".model.") and name.endswith(".safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return flush(fd)
    monkeypatch.setattr(os, "fsync", disk_full_for_the_bundle)
    out = tmp_path / "run"
    result = invoke("train", dataset, *TINY, "--epochs", "1", "--strategy", "lp-ft", "--out", out)
    assert result.exit_code == 2 and "no space left" in result.output.lower(), result.output
    _every_file_is_whole(out)
    assert not (out / "model.safetensors").exists() and (out / checkpoint.CHECKPOINT).exists()  # resumable later


def test_compare_takes_patience_and_shows_the_epoch_each_run_kept(tmp_path):
    data = make_class_folders(tmp_path / "photos", per_class=10)
    out = tmp_path / "cmp"
    result = invoke("compare", "train", "--data", data, *TINY, "--epochs", "8", "--holdout", "0.25", "--patience", "1",
                    "--strategy", "fine-tune,lp-ft", "--out", out)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())
    for row in rows:
        metrics = json.loads((out / row["setting"] / "metrics.json").read_text())
        assert row["kept_epoch"] == metrics["kept_epoch"] and row["epochs_run"] == len(metrics["epochs"]) < 8
    assert "kept epoch" in result.stdout.splitlines()[-3]


KILLED_IN_FIRST_CHECKPOINT = """
import os, signal, sys
from fastft.train import checkpoint

def write_half_and_die(path, data):  # the process is killed -9 half-way through the first checkpoint's write
    with open(path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}"), "wb") as f:
        f.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.write_bytes = write_half_and_die
sys.argv = ["fastft", *sys.argv[1:]]
from fastft.cli import main
main()
"""


def test_a_run_killed_while_writing_its_first_checkpoint_resumes_from_its_start(dataset, tmp_path):
    args = ["train", dataset, *TINY, "--epochs", "2", "--strategy", "lp-ft"]  # one run: --strategy auto's trial is another
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_FIRST_CHECKPOINT, *map(str, args), "--out", str(cut)],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(json.loads((cut / "metrics.json").read_text())["epochs"]) == 1  # epoch 1 ran; its checkpoint did not land
    assert not (cut / checkpoint.CHECKPOINT).exists() and list(cut.glob(".checkpoint.*.partial.pt"))
    resumed = fastft("resume", cut)
    assert resumed.returncode == 0, resumed.stderr
    assert "stopped before its first checkpoint was written" in resumed.stderr
    assert not [p for p in cut.iterdir() if p.name.startswith(".")]
    whole = fastft(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    assert weights_digest(cut) == weights_digest(tmp_path / "whole")  # the same run as one never stopped


def test_a_failed_checkpoint_stops_the_run_before_another_epoch_and_resume_starts_over(dataset, tmp_path, monkeypatch):
    import errno

    def disk_full(run, state):
        raise OSError(errno.ENOSPC, "No space left on device", str(run.checkpoint))
    monkeypatch.setattr(checkpoint, "save", disk_full)
    out = tmp_path / "run"
    result = invoke("train", dataset, *TINY, "--epochs", "4", "--strategy", "lp-ft", "--out", out)
    assert result.exit_code == 2 and "no space left" in result.output.lower() and "checkpoint.pt" in result.output
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 1  # not another epoch trained first
    monkeypatch.undo()
    resumed = fastft("resume", out)
    assert resumed.returncode == 0 and "from the start" in resumed.stderr, resumed.stderr
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 4


def test_two_runs_started_together_never_share_a_folder(dataset, tmp_path):
    same = tmp_path / "same"
    runs = [subprocess.Popen([str(FASTFT), "train", str(dataset), *map(str, TINY), "--epochs", "1", "--out", str(same)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=600), *run.communicate()) for run in runs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert ("another run" in loser or "not empty" in loser) and "Traceback" not in loser
    assert tomllib.loads((same / "recipe.toml").read_text())["epochs"] == 1 and (same / "model.json").is_file()


def _claim_in_a_process(parent: str):
    from fastft.run_folder import claim_run_folder

    return str(claim_run_folder(None, "d1", Path(parent)))


def test_runs_named_in_the_same_second_get_their_own_folders(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    from fastft.run_folder import claimant

    with ProcessPoolExecutor(6) as pool:
        folders = list(pool.map(_claim_in_a_process, [str(tmp_path)] * 12))
    assert len(set(folders)) == 12 and all(Path(f).is_dir() for f in folders)
    assert len({claimant(Path(f)) for f in folders}) >= 2  # claimed by the processes that named them
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "recipe.toml").write_text(f"# claimed by a fastft run that has not written its recipe yet; process {os.getpid()}\n")
    from fastft.errors import UsageError
    from fastft.run_folder import claim_run_folder

    with pytest.raises(UsageError, match="being written by another run"):
        claim_run_folder(taken, "x")
    (taken / "recipe.toml").write_text("# claimed by a fastft run that has not written its recipe yet; process 999999999\n")
    assert claim_run_folder(taken, "x") == taken and claimant(taken) == os.getpid()  # a dead run's claim is taken over


def test_a_run_killed_before_its_recipe_is_started_again_in_its_folder_as_resume_says(dataset, tmp_path):
    """A run writes its lists (test_files.txt, skipped_images.txt, a backbone's selection) before its recipe: killed
    in between, `fastft resume` says to start it again with the same --out, and that must work."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.toml").write_text("# claimed by a fastft run that has not written its recipe yet; process 999999999\n")
    for name in ("test_files.txt", "skipped_images.txt", "selection.csv", ".selection.999999999.partial.png"):
        (out / name).write_text("what the killed run wrote\n")
    resumed = invoke("resume", out)
    assert resumed.exit_code == 2 and f"start the run again with --out {out}" in resumed.output, resumed.output
    again = invoke("train", dataset, *TINY, "--epochs", "1", "--strategy", "probe", "--out", out)
    assert again.exit_code == 0, again.output
    assert (out / "model.json").is_file() and "selection.csv" not in {p.name for p in out.iterdir()}
    assert not list(out.glob(".*partial*"))
    assert (out / "test_files.txt").read_text() != "what the killed run wrote\n"  # the new run's list
    # a folder with anything the killed run did not write is still never overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "recipe.toml").write_text("# claimed by a fastft run that has not written its recipe yet; process 999999999\n")
    (other / "my_notes.txt").write_text("mine\n")
    refused = invoke("train", dataset, *TINY, "--epochs", "1", "--strategy", "probe", "--out", other)
    assert refused.exit_code == 2 and "not empty" in refused.output and (other / "my_notes.txt").read_text() == "mine\n"


def test_a_loss_that_becomes_nan_stops_the_run_with_a_clear_error(dataset, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", dataset, *TINY, "--epochs", "3", "--strategy", "fine-tune", "--lr", "1e30", "--out", out)
    assert result.exit_code == 2 and "training loss became" in result.output and "--lr" in result.output, result.output
    assert not (out / "model.json").exists()  # no NaN model is saved as if it were trained


def _on_a_terminal(args, cwd=None) -> tuple[int, str]:
    """Run the installed `fastft` with its output on a pseudo-terminal, as a user at a terminal sees it."""
    import pty
    import select

    controller, terminal = pty.openpty()
    proc = subprocess.Popen([str(FASTFT), *map(str, args)], stdout=terminal, stderr=terminal, cwd=cwd)
    os.close(terminal)
    shown = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed: the process has ended
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(controller)
    return proc.wait(), shown.decode(errors="replace")


def test_a_terminal_shows_bars_counting_the_runs_epochs_and_the_probe_moving(dataset, tmp_path):
    # --no-cache: the probe computes its features here (read back from the cache, they would need no bar)
    code, shown = _on_a_terminal(["train", dataset, *TINY, "--epochs", "3", "--strategy", "lp-ft", "--no-cache",
                                  "--out", tmp_path / "run"])
    assert code == 0, shown
    assert "epoch 2/3 train" in shown and "epoch 3/3 test" in shown  # lp-ft: a probe epoch, then a phase of 2
    assert "Epoch " not in shown  # fastai's bar, which counts a phase's epochs apart ("Epoch 1/2")
    assert "epoch 1/3 train" not in shown  # the probe epoch trains no batch, so opens no training bar ...
    assert re.search(r"\[(\d+)/\1 [^\]]*probe: features", shown)  # ... and its own bar runs to its end
