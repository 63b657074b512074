"""The label check: `fastft inspect DATA --labels-check` and `fastft train --exclude-suspects N`, on tiny synthetic
colour images (a random-init ResNet-18 at 32 px: its pooled features still tell the colours apart)."""
import csv
import hashlib
import os
from pathlib import Path

import pytest
import torch

from conftest import COLOURS, TINY, fastft, invoke, make_split_dataset, write_image

BACKBONE = ["--arch", "resnet18", "--no-pretrained", "--size", "32"]


def mislabelled(root: Path) -> Path:
    """Three colour classes, 10 training images each, and a red square filed under blue."""
    make_split_dataset(root, classes=("blue", "red", "green"), per_class=10)
    write_image(root / "train" / "blue" / "wrong_red.png", COLOURS["red"], seed=99)
    return root


def snapshot(root: Path) -> dict:
    """Every file and folder under root: its content's digest (files), mode and modification time."""
    state = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        state[str(path.relative_to(root))] = (digest, stat.st_mode, stat.st_mtime_ns)
    return state


def suspects_of(table: Path) -> list[dict]:
    with open(table, newline="") as f:
        return list(csv.DictReader(f))


def test_labels_check_finds_the_red_square_labelled_blue_and_leaves_the_folder_unchanged(tmp_path):
    data = mislabelled(tmp_path / "colours")
    before = snapshot(data)
    result = fastft("inspect", data, "--labels-check", *BACKBONE, "--out", tmp_path / "report", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = suspects_of(tmp_path / "report" / "label_issues.csv")
    assert rows and Path(rows[0]["file"]).name == "wrong_red.png", rows
    assert (rows[0]["given_label"], rows[0]["suggested_label"]) == ("blue", "red")
    assert Path(rows[0]["file"]).is_absolute() and float(rows[0]["score"]) < 0.5
    assert "given blue, looks like red" in result.stdout
    assert (tmp_path / "report" / "label_issues.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert snapshot(data) == before  # byte for byte, and not even touched
    # the test split is not checked: a mislabelled test image is not the training labels' problem
    assert all("/test/" not in row["file"] for row in rows)


def test_labels_check_without_out_writes_to_a_new_report_folder_and_json_lists_the_suspects(tmp_path, monkeypatch):
    data = mislabelled(tmp_path / "colours")
    monkeypatch.chdir(tmp_path)
    result = invoke("inspect", data, "--labels-check", *BACKBONE, "--json")
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert [Path(s["file"]).name for s in report["label_issues"]][:1] == ["wrong_red.png"]
    written = list((tmp_path / "runs").glob("labels-check-*/label_issues.csv"))
    assert len(written) == 1, "the CSV goes to runs/labels-check-<time> when --out is not given"


def test_labels_check_on_a_folder_without_labels_is_a_one_line_error(tmp_path):
    flat = tmp_path / "photos"
    for i in range(4):
        write_image(flat / f"{i}.png", COLOURS["red"], seed=i)
    before = snapshot(flat)
    result = fastft("inspect", flat, "--labels-check", *BACKBONE, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and result.stderr.strip().count("\n") == 0, result.stderr
    assert "class" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(flat) == before and not (tmp_path / "runs").exists()


def test_a_class_smaller_than_the_folds_gets_fewer_folds_with_a_note(tmp_path):
    from fastft.train.out_of_fold import FOLDS, fold_count, stratified_folds

    keys = ["blue"] * 3 + ["red"] * 12
    k, notes = fold_count(keys, multi_label=False)
    assert k == 3 < FOLDS and "3 folds instead of 5" in notes[0] and "'blue'" in notes[0]
    folds = stratified_folds(keys, k, seed=0)
    for fold in range(k):  # every probe sees every class, and every image is held out once
        trained_on = {key for key, f in zip(keys, folds.tolist()) if f != fold}
        assert trained_on == {"blue", "red"}
    assert sorted(folds[:3].tolist()) == [0, 1, 2]
    assert torch.equal(folds, stratified_folds(keys, k, seed=0))  # seeded
    with pytest.raises(Exception, match="at least 2 training images per class"):
        fold_count(["blue"] + ["red"] * 5, multi_label=False)


def test_frozen_features_are_computed_once_and_read_back_from_the_cache(tmp_path):
    from fastft.data import cache

    files = [write_image(tmp_path / f"{i}.png", COLOURS["blue"], seed=i) for i in range(3)]
    calls = []

    def compute(rows):
        calls.append(list(rows))
        return {"features": torch.tensor([[float(r), 1.0] for r in rows]), "mirrors": torch.ones(len(rows), 2)}
    first = cache.features(files, 32, 0.875, "digest-a", compute)
    again = cache.features(files, 32, 0.875, "digest-a", compute)
    assert calls == [[0, 1, 2]] and torch.equal(again["features"], first["features"])
    cache.features(files, 32, 0.875, "digest-b", compute)  # another network's weights: computed again
    os.utime(files[0], ns=(1, 1))  # a changed file too, and only it
    cache.features(files, 32, 0.875, "digest-a", compute)
    assert calls == [[0, 1, 2], [0, 1, 2], [0]]


def test_features_are_kept_file_by_file_so_a_larger_set_computes_only_its_new_files(tmp_path):
    """The trial's four fifths, then the run's whole training split: the second pass is over the fifth it adds."""
    from fastft.data import cache

    files = [write_image(tmp_path / f"{i}.png", COLOURS["red"], seed=i) for i in range(5)]
    computed = []

    def compute_of(subset):
        def compute(rows):
            computed.extend(subset[r].name for r in rows)
            return {"features": torch.tensor([[float(subset[r].stem)] for r in rows])}
        return compute
    cache.features(files[:3], 32, 0.875, "digest", compute_of(files[:3]))
    everything = [files[4], files[0], files[3], files[2], files[1]]  # in another order too
    assert cache.features_missing(everything, 32, 0.875, "digest") == 2
    got = cache.features(everything, 32, 0.875, "digest", compute_of(everything))
    assert computed == ["0.png", "1.png", "2.png", "4.png", "3.png"]
    assert got["features"].flatten().tolist() == [4.0, 0.0, 3.0, 2.0, 1.0]  # each file's row, in the order asked
    assert cache.features_missing(everything, 32, 0.875, "digest") == 0


def test_a_multi_label_csv_is_checked_label_by_label(tmp_path):
    """Images of one or two colours, labelled by a CSV; a red one labelled blue is found."""
    import numpy as np
    from PIL import Image

    rows = []
    rng = np.random.default_rng(0)
    for i in range(36):
        labels = [("red",), ("blue",), ("red", "blue")][i % 3]
        pixels = np.zeros((32, 32, 3))
        pixels[:, :16] = COLOURS[labels[0]]
        pixels[:, 16:] = COLOURS[labels[-1]]
        pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        rows.append((f"{i}.png", ";".join(labels)))
    rows[0] = ("0.png", "blue")  # a red image
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "tags"), *rows])
    result = invoke("inspect", tmp_path / "labels.csv", "--labels-check", *BACKBONE, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    found = suspects_of(tmp_path / "report" / "label_issues.csv")
    assert found and Path(found[0]["file"]).name == "0.png", found
    assert found[0]["given_label"] == "blue" and "red" in found[0]["suggested_label"]


def test_train_exclude_suspects_leaves_the_top_suspect_out_and_says_so(tmp_path):
    data = mislabelled(tmp_path / "colours")
    before = snapshot(data)
    result = invoke("train", data, *TINY, "--epochs", "1", "--exclude-suspects", "5", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    # the last plan line: the run's (the default's strategy trial, on four fifths of the images, prints one first)
    plan = [line for line in result.stdout.splitlines() if " train " in line and " test " in line and "images," in line][-1]
    assert "30 train (left out: the 1 whose labels look most wrong, --exclude-suspects 5, no more look wrong" in plan
    rows = suspects_of(tmp_path / "run" / "label_issues.csv")
    assert [Path(r["file"]).name for r in rows] == ["wrong_red.png"]
    assert "exclude_suspects = 5" in (tmp_path / "run" / "recipe.toml").read_text()  # reproduced by `fastft run`
    assert snapshot(data) == before


def test_exclude_suspects_on_two_processes_leaves_out_what_one_process_does(tmp_path):
    from test_distributed import torchrun

    data = mislabelled(tmp_path / "colours")
    args = ["train", data, *TINY, "--epochs", "1", "--strategy", "probe", "--exclude-suspects", "1"]
    two = torchrun("-m", "fastft", *args, "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("left out: the 1 whose labels look most wrong") == 1  # rank 0 speaks for all
    assert [Path(r["file"]).name for r in suspects_of(tmp_path / "two" / "label_issues.csv")] == ["wrong_red.png"]
    import json

    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["final"]["test_acc"] == 1.0


def test_relabelling_an_image_keeps_its_cached_features(tmp_path, monkeypatch):
    """The check's features are cached by file, not by label: fixing a label in the CSV and checking again reads
    them back, each row still the features of its own file."""
    import fastft.train.features as features_module
    from fastft.data.augment import parse_aug
    from fastft.data.loaders import load_split
    from fastft.recipe import load_recipe
    from fastft.train import out_of_fold
    from fastft.train.model import starting_weights

    data = mislabelled(tmp_path / "colours")
    rows = [(str(p.relative_to(data)), p.parent.name, p.parts[-3]) for p in sorted(data.rglob("*.*"))]
    table = data / "labels.csv"

    def features(labels):
        with open(table, "w", newline="") as f:
            csv.writer(f).writerows([("image", "label", "split"), *labels])
        recipe = load_recipe("train").replace(data=str(data), labels=str(table), arch="resnet18", pretrained=False, size=32)
        split = load_split(data, recipe, parse_aug(recipe.aug))
        torch.manual_seed(0)  # the same random backbone both times
        learn = out_of_fold.frozen_learner(split, recipe, starting_weights(recipe), torch.device("cpu"))
        items = [[p, key] for p, key in split.items("train")]
        return {p.name: row for p, row in zip([p for p, _ in items], features_module.frozen_features(learn, items, recipe)[0])}
    first = features(rows)
    fixed = [(image, "red" if image.endswith("wrong_red.png") else label, part) for image, label, part in rows]

    def no_backbone_pass(*args, **kwargs):
        raise AssertionError("the features should have come from the cache")
    monkeypatch.setattr(features_module, "pooled_features", no_backbone_pass)
    again = features(fixed)
    assert again.keys() == first.keys()
    assert all(torch.equal(again[name], first[name]) for name in first)
