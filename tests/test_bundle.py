"""The pickle-free bundle, ONNX export, predict options, evaluate and the Python API."""
import csv
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import fastft
from conftest import fastft as run_fastft, invoke
from fastft.errors import UsageError


def _images(dataset):
    return sorted((dataset / "test").rglob("*.*"))


def test_bundle_has_what_inference_needs(trained_run):
    out = trained_run[0]
    meta = json.loads((out / "model.json").read_text())
    assert meta["arch"] == "resnet18" and meta["classes"] == ["blue", "red"]
    assert (meta["input_size"], meta["resize"]) == (32, 32) and len(meta["mean"]) == 3
    assert set(meta["versions"]) == {"fastft", "timm", "torch"}


def test_bundle_loads_without_pickle_or_fastai_and_matches_the_learner(trained_run, dataset):
    import subprocess
    import sys

    # in a fresh interpreter where fastai cannot be imported and every way to unpickle is booby-trapped
    code = f"""
import sys
sys.modules["fastai"] = None
import pickle, torch, timm, safetensors.torch
def refuse(*a, **k): raise AssertionError("unpickled")
pickle.load = pickle.loads = torch.load = refuse
import fastft
m = fastft.load({str(trained_run[0])!r})
label, probs = m.predict({str(_images(dataset)[0])!r})
print(label, round(sum(probs.values()), 5))
"""
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split()[0] in ("blue", "red") and shown.stdout.split()[1] == "1.0"
    # same top-1 and probabilities (1e-3) as fastai's own Learner from model.pkl
    bundle = fastft.load(trained_run[0])
    learner = fastft.load(trained_run[0] / "model.pkl", trust_pickle=True)
    images = _images(dataset)
    for a, b in zip(bundle.predict_batch(images), learner.predict_batch(images)):
        assert a["label"] == b["label"]
        assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) < 1e-3


def test_python_api_predicts_paths_and_pil_images(trained_run, dataset):
    from PIL import Image

    m = fastft.load(trained_run[0] / "model.json")
    path = _images(dataset)[0]
    label, probs = m.predict(path)
    same_label, same_probs = m.predict(Image.open(path))
    assert label == same_label and probs == pytest.approx(same_probs)
    results = list(m.predict_batch(_images(dataset), bs=3))
    assert len(results) == len(_images(dataset)) and {r["label"] for r in results} <= {"blue", "red"}


def test_onnx_export_matches_pytorch(trained_run, dataset, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    result = run_fastft("export", run, "--format", "onnx")
    assert result.returncode == 0, result.stderr
    difference = float(result.stdout.split("PyTorch on ")[1].split(": ")[1])
    assert difference <= 1e-4 and "real images" in result.stdout
    onnx_model, bundle = fastft.load(run / "model.onnx"), fastft.load(run)
    images = _images(dataset)
    for a, b in zip(onnx_model.predict_batch(images, bs=5), bundle.predict_batch(images, bs=8)):  # dynamic batch
        assert a["label"] == b["label"]
        assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) < 1e-4


def test_predict_options(trained_run, dataset):
    out = trained_run[0]
    two = invoke("predict", out, dataset / "test", "--top-k", "2", "--csv")
    assert two.exit_code == 0, two.output
    rows = list(csv.reader(io.StringIO(two.stdout)))
    assert rows[0] == ["path", "label1", "probability1", "label2", "probability2"] and len(rows) == 9
    assert all(float(r[2]) >= float(r[4]) and {r[1], r[3]} == {"blue", "red"} for r in rows[1:])
    tta = json.loads(invoke("predict", out, dataset / "test", "--tta", "--json").stdout)
    plain = json.loads(invoke("predict", out, dataset / "test", "--no-tta", "--json").stdout)
    assert len(tta) == len(plain) == 8 and any(abs(a["probability"] - b["probability"]) > 1e-6 for a, b in zip(tta, plain))
    as_trained = json.loads(invoke("predict", out, dataset / "test", "--json").stdout)  # the cifar recipe has tta
    assert as_trained == tta
    pickle_tta = json.loads(invoke("predict", out / "model.pkl", dataset / "test", "--tta", "--trust-pickle", "--json").stdout)
    for a, b in zip(pickle_tta, tta):
        assert a["label"] == b["label"] and a["probability"] == pytest.approx(b["probability"], abs=1e-4)
    refused = invoke("predict", out / "model.pkl", dataset / "test")
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output
    trusted = invoke("predict", out / "model.pkl", dataset / "test", "--trust-pickle")
    assert trusted.exit_code == 0 and len(trusted.stdout.strip().splitlines()) == 8


def test_evaluate_writes_report_and_pictures_and_never_overwrites(trained_run, dataset, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    first = invoke("evaluate", run, dataset, "--json")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    final = json.loads((run / "metrics.json").read_text())["final"]
    # as trained: the cifar recipe measures its final test accuracy with flip TTA, and so does evaluate
    assert report["tta"] and report["accuracy"] == pytest.approx(final["test_acc_tta"]) and report["images"] == 8
    plain = json.loads(invoke("evaluate", run, dataset, "--no-tta", "--json", "--out", tmp_path / "plain").stdout)
    assert not plain["tta"] and plain["accuracy"] == pytest.approx(final["test_acc"])
    assert sum(map(sum, report["confusion"]["matrix"])) == 8
    assert set(report["per_class"]) == {"blue", "red"} and all(0 <= v["recall"] <= 1 for v in report["per_class"].values())
    folder = run / f"eval-{dataset.name}"
    for name in ("confusion.png", "top_losses.png", "evaluation.json"):
        assert (folder / name).is_file()
    again = invoke("evaluate", run, dataset)
    assert again.exit_code == 0 and (run / f"eval-{dataset.name}-2" / "confusion.png").is_file()
    bare = tmp_path / "bare"  # a bundle moved on its own: no recipe.toml to name its data
    bare.mkdir()
    for name in ("model.json", "model.safetensors"):
        shutil.copy(run / name, bare / name)
    lost = invoke("evaluate", bare)
    assert lost.exit_code == 2 and "no recipe.toml naming the data it was trained on" in lost.output, lost.output
    assert "give DATA" in lost.output and not (bare / "eval-bare").exists()


def test_broken_models_are_clean_errors(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    weights = run / "model.safetensors"
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "classes": ["a", "b", "c"]}))  # disagrees with the weights
    with pytest.raises(UsageError, match="disagree"):
        fastft.load(run)
    (run / "model.json").write_text(json.dumps({**meta, "arch": "resnet34"}))
    with pytest.raises(UsageError, match="was trained as 'resnet18'"):
        fastft.load(run)
    (run / "model.json").write_text(json.dumps(meta))
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(UsageError, match="corrupt or truncated"):
        fastft.load(run)
    (run / "model.json").write_text("{ not json")
    with pytest.raises(UsageError, match="model.json"):
        fastft.load(run)
    with pytest.raises(UsageError, match="no trained model"):
        fastft.load(tmp_path / "missing")
    result = run_fastft("predict", run, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_export_of_an_unexportable_model_is_a_clean_error(tmp_path, monkeypatch):
    from fastft.deploy.bundle import write_bundle
    from fastft.deploy.export import export_onnx
    from fastft.deploy.network import build_network
    from fastft.run_folder import RunFolder

    write_bundle(build_network("resnet18", 2), RunFolder(tmp_path), arch="resnet18", classes=["a", "b"], size=32,
                 crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3, head={})

    def unsupported(*args, **kwargs):
        raise torch.onnx.errors.UnsupportedOperatorError("aten::fancy_op", 17, 18)

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(UsageError, match="cannot be exported to ONNX"):
        export_onnx(tmp_path)
    assert not (tmp_path / "model.onnx").exists()


# A hand-edited model.json: each bad value is a one-line error naming its key, before anything is built or fetched.
BAD_META = [
    ("arch", "no_such_net"), ("arch", "hf-hub:timm/resnet18.a1_in1k"), ("arch", "local-dir:/etc"), ("arch", 18),
    ("crop_pct", 0), ("crop_pct", "0.9"), ("head.mystery", 1), ("head.hidden", -5), ("head.dropout", 1.5),
    ("input_size", 0), ("input_size", -32), ("input_size", "224"), ("input_size", 60000), ("input_size", True),
    ("mean", "0.5"), ("mean", [0.5]), ("std", [0.2, 0.0, 0.2]), ("std", [0.2, float("nan"), 0.2]),
    ("threshold", "0.5"), ("threshold", 2), ("classes", "abc"), ("classes", []), ("classes", ["a", "a"]),
    ("tta", "no"), ("multi_label", 1), ("format", "fastft-bundle/9"), ("calibrate", True),
    # values that pass a "positive" check and turn every probability into NaN
    ("temperature", 1e-40), ("temperature", 1e300), ("std", [0.2, 1e-300, 0.2]), ("mean", [0.5, 1e300, 0.5]),
    ("files", {"model.safetensors": "abc"}), ("files", {"../x": "0" * 64}),
]


@pytest.mark.parametrize("key,value", BAD_META, ids=[f"{k}={v!r}" for k, v in BAD_META])
def test_a_hand_edited_model_json_is_checked_on_load(trained_run, tmp_path, key, value, monkeypatch):
    import shutil
    import socket

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    meta = json.loads((run / "model.json").read_text())
    table, name = (meta["head"], key.split(".")[1]) if key.startswith("head.") else (meta, key)
    table[name] = value
    (run / "model.json").write_text(json.dumps(meta))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("loading a bundle used the network"))
    with pytest.raises(UsageError, match=f"'{key}'" if key != "format" else "format") as error:
        fastft.load(run)
    assert "\n" not in str(error.value)


def test_a_bad_model_json_is_one_line_from_every_command(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "std": [0.2, 0, 0.2]}))
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    for command in (["predict", run, image], ["export", run, "--format", "onnx"], ["serve", run, "--port", "1"]):
        result = run_fastft(*command)
        assert result.returncode == 2 and "'std'" in result.stderr and "Traceback" not in result.stderr, command
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_full_disk_during_export_is_reported_as_one_naming_the_file(trained_run, tmp_path, monkeypatch):
    import errno
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch.onnx, "export", disk_full)
    onnx = invoke("export", run, "--format", "onnx")
    assert onnx.exit_code == 2 and "no space left" in onnx.output and "model.onnx" in onnx.output, onnx.output
    assert "cannot be exported" not in onnx.output and not (run / "model.onnx").exists()


def test_non_regular_files_given_to_predict_are_named_as_such(trained_run, tmp_path):
    import os

    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")
    for path in (fifo, zero):
        result = run_fastft("predict", trained_run[0], path)
        assert result.returncode == 2 and "is not a regular file" in result.stderr, result.stderr


ONNX_PREDICT_IMPORTS = """
import sys
sys.argv = ["fastft", "predict", sys.argv[1], sys.argv[2]]
from fastft.cli import main
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(sorted(m for m in ("torch", "timm", "fastai", "torchvision") if m in sys.modules))
"""


def test_predicting_with_the_onnx_model_imports_no_torch_timm_or_fastai(trained_run, dataset, tmp_path):
    """ONNX Runtime alone: a one-photo predict starts in a fraction of PyTorch's import time (bench/startup.py)."""
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    assert run_fastft("export", run, "--format", "onnx").returncode == 0
    shown = subprocess.run([sys.executable, "-c", ONNX_PREDICT_IMPORTS, str(run / "model.onnx"), str(_images(dataset)[0])],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip().splitlines()[-1] == "[]"


def _copy(run, tmp_path, name="run"):
    import shutil

    return shutil.copytree(run, tmp_path / name)


def _resave(run, change) -> None:
    """Rewrite a run's weights with `change(state)` applied, as another model's weights, keeping model.json."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "model.safetensors"))
    change(state)
    save_file(state, str(run / "model.safetensors"), metadata={"fastft_arch": "resnet18"})


def _last_layer(state) -> str:
    """The name of the head's last linear layer's weight."""
    return max((k for k in state if k.startswith("1.") and k.endswith(".weight")), key=lambda k: int(k.split(".")[1]))


def test_weights_files_are_tied_to_their_model_json(trained_run, tmp_path):
    """A swapped model.safetensors, or a model.onnx copied from another run, would load and answer with the other
    model's weights: each is refused in one line naming both files."""
    from fastft.deploy.bundle import OnnxModel, record_file_hash

    swapped = _copy(trained_run[0], tmp_path, "swapped")
    _resave(swapped, lambda state: state[_last_layer(state)].mul_(-1))  # same arch, same classes, other weights
    result = run_fastft("predict", swapped, trained_run[0].parent)
    assert result.returncode == 2 and "model.safetensors is not the file written with" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout

    exported = _copy(trained_run[0], tmp_path, "exported")
    assert invoke("export", exported).exit_code == 0
    assert "model.onnx" in json.loads((exported / "model.json").read_text())["files"]
    assert fastft.load(exported / "model.onnx").predict(Image.new("RGB", (40, 30)))[0] in ("blue", "red")
    other = _copy(trained_run[0], tmp_path, "other")  # never exported: an ONNX copied in is not its own
    (other / "model.onnx").write_bytes((exported / "model.onnx").read_bytes())
    with pytest.raises(UsageError, match="model.onnx was not written with .*fastft export"):
        fastft.load(other / "model.onnx")
    # an ONNX of another input size, its hash recorded: one line instead of onnxruntime's traceback at predict time
    meta = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**meta, "input_size": 48, "resize": 48}))
    record_file_hash(other / "model.json", other / "model.onnx")
    with pytest.raises(UsageError, match=r"takes inputs of shape .*48x48"):
        OnnxModel(other / "model.onnx")


def test_an_architecture_with_the_same_tensors_is_refused(tmp_path):
    """efficientnet_lite0 has exactly tf_efficientnet_lite0's tensor names and shapes (only the padding differs):
    a model.json edited to name it loaded the weights silently and answered wrongly."""
    from fastft.deploy.bundle import write_bundle
    from fastft.deploy.network import build_network
    from fastft.run_folder import RunFolder

    write_bundle(build_network("tf_efficientnet_lite0", 2), RunFolder(tmp_path), arch="tf_efficientnet_lite0",
                 classes=["a", "b"], size=32, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3, head={})
    assert fastft.load(tmp_path).meta["arch"] == "tf_efficientnet_lite0"
    meta = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**meta, "arch": "efficientnet_lite0"}))
    with pytest.raises(UsageError, match="'arch' is 'efficientnet_lite0', but model.safetensors was trained as "
                                         "'tf_efficientnet_lite0'"):
        fastft.load(tmp_path)


def test_weights_that_give_no_finite_probability_are_refused_never_printed(trained_run, dataset, tmp_path):
    from fastft.deploy.bundle import record_file_hash

    broken = _copy(trained_run[0], tmp_path, "nan")
    _resave(broken, lambda state: state[_last_layer(state)].fill_(float("nan")))
    record_file_hash(broken / "model.json", broken / "model.safetensors")
    result = run_fastft("predict", broken, dataset / "test")
    assert result.returncode == 2 and "not finite numbers (NaN or inf" in result.stderr and not result.stdout

    huge = _copy(trained_run[0], tmp_path, "huge")  # finite weights whose logits overflow to inf: NaN softmax
    _resave(huge, lambda state: state[_last_layer(state)].mul_(3e38))
    record_file_hash(huge / "model.json", huge / "model.safetensors")
    for extra in ([], ["--json"]):
        result = run_fastft("predict", huge, dataset / "test", *extra)
        assert result.returncode == 2 and "not finite numbers" in result.stderr, result.stderr
        assert "nan" not in result.stdout.lower() and "Traceback" not in result.stderr


def test_a_model_json_nested_deep_is_one_line(trained_run, tmp_path):
    run = _copy(trained_run[0], tmp_path)
    (run / "model.json").write_text('{"arch": ' + "[" * 100_000 + "]" * 100_000 + "}")
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    result = run_fastft("predict", run, image)
    assert result.returncode == 2 and "nested too deeply" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_run_killed_before_its_model_json_points_to_resume(trained_run, tmp_path):
    """The bundle's model.json is the last file a run writes: killed just before it, the folder holds a model.pkl
    and a model.safetensors, and predict named the pickle instead of the unfinished run."""
    run = _copy(trained_run[0], tmp_path)
    (run / "model.json").unlink()
    for target in (run, run / "model.safetensors"):
        result = run_fastft("predict", target, tmp_path)
        assert result.returncode == 2 and "unfinished run" in result.stderr, result.stderr
        assert f"fastft resume {run}" in result.stderr and "pickle" not in result.stderr


def test_predict_skips_an_image_whose_header_claims_too_many_pixels_naming_the_limit(trained_run, dataset, tmp_path):
    from conftest import png_claiming

    folder = tmp_path / "photos"
    folder.mkdir()
    for side in (100_000, 20_000):
        (folder / f"bomb{side}.png").write_bytes(png_claiming(side, side))
    good = sorted((dataset / "test").rglob("*.png"))[0]
    (folder / "good.png").write_bytes(good.read_bytes())
    result = run_fastft("predict", trained_run[0], folder)
    assert result.returncode == 0 and len(result.stdout.strip().splitlines()) == 1, result.stderr
    assert "bomb100000.png" in result.stderr and "bomb20000.png" in result.stderr and "178956970" in result.stderr


def test_evaluate_of_a_limited_run_scores_the_images_the_run_printed_its_figure_on(tmp_path):
    """A --limit run printed `test acc 0.900` on 100 test images; `fastft evaluate RUN` scored the folder's 153."""
    from conftest import TINY, make_split_dataset

    data = make_split_dataset(tmp_path / "photos", per_class=12)  # 6 test images a class
    run = tmp_path / "run"
    trained = invoke("train", data, *TINY, "--epochs", "1", "--strategy", "fine-tune", "--limit", "4", "--out", run)
    assert trained.exit_code == 0, trained.output
    listed = (run / "test_files.txt").read_text().splitlines()
    assert len(listed) == 4 and all(Path(line.split("\t")[0]).is_file() for line in listed)
    final = json.loads((run / "metrics.json").read_text())["final"]
    for given in ([], [data]):  # the run's own data, named or not
        report = json.loads(invoke("evaluate", run, *given, "--json", "--out", tmp_path / f"eval{len(given)}").stdout)
        assert report["images"] == 4 and "test_files.txt" in report["scored"]
        assert report["accuracy"] == pytest.approx(final["test_acc_tta"] if report["tta"] else final["test_acc"])


def test_runs_lists_each_run_with_its_figures_and_how_to_finish_the_unfinished(trained_run, tmp_path):
    import os
    import shutil

    parent = tmp_path / "runs"
    done = shutil.copytree(trained_run[0], parent / "done")
    stopped = shutil.copytree(trained_run[0], parent / "stopped")
    (stopped / "model.json").unlink()  # killed before its model was saved
    (parent / "claimed").mkdir()
    (parent / "claimed" / "recipe.toml").write_text("# claimed by a fastft run that has not written its recipe yet; "
                                                     "process 999999999\n")
    (parent / "not-a-run").mkdir()
    os.utime(done / "recipe.toml", (1, 1))  # the oldest: listed first
    rows = json.loads(invoke("runs", parent, "--json").stdout)
    assert rows[0]["run"] == "done"
    by_name = {r["run"]: r for r in rows}
    final = json.loads((done / "metrics.json").read_text())["final"]
    assert set(by_name) == {"done", "stopped", "claimed"}
    assert by_name["done"]["finished"] and by_name["done"]["test_acc"] == final["test_acc"]
    assert by_name["done"]["test_acc_tta"] == final["test_acc_tta"] and by_name["done"]["backbone"] == "resnet18"
    import tomllib

    assert by_name["done"]["seconds"] > 0
    assert by_name["done"]["data"] == Path(tomllib.loads((done / "recipe.toml").read_text())["data"]).name
    assert by_name["stopped"]["state"] == f"unfinished: fastft resume {stopped}"
    assert "start it again with --out" in by_name["claimed"]["state"]
    shown = invoke("runs", parent).stdout
    assert shown.splitlines()[0].split()[:4] == ["run", "data", "backbone", "strategy"]
    assert f"stopped: unfinished: fastft resume {stopped}" in shown
    assert invoke("runs", tmp_path / "nowhere").exit_code == 2
