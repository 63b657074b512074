"""Data beyond class folders: labels from a CSV, multi-label runs, imbalanced classes, `fastft inspect`."""
import json
import re
import shutil

import pytest

from conftest import COLOURS, TINY, fastft, invoke, make_split_dataset, write_image
from fastft.data.labels import choose_delimiter, read_labels
from fastft.errors import UsageError


def csv_dataset(root, rows, header="image,label"):
    """root/images/<name>.png for each (name, label[, split]) row, and root/labels.csv naming bare file names."""
    for i, (name, label, *_) in enumerate(rows):
        colours = [COLOURS[c] for c in ("blue", "red", "green") if c in label.split(";")] or [COLOURS["blue"]]
        mean = tuple(sum(c[k] for c in colours) // len(colours) for k in range(3))
        write_image(root / "images" / name, mean, seed=i)
    (root / "labels.csv").write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return root / "labels.csv"


def single(n=10):
    return [(f"{c}{i}.png", c) for c in ("blue", "red") for i in range(n)]


def test_a_csv_of_bare_file_names_beside_images_trains_and_evaluates(tmp_path):
    table = csv_dataset(tmp_path / "pets", single())
    out = tmp_path / "run"
    result = invoke("train", table, *TINY, "--epochs", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "16 train / 4 test images, 2 classes" in result.stdout
    saved = (out / "recipe.toml").read_text()
    assert f'labels = "{table}"' in saved and 'name = "pets"' in saved
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"balanced_accuracy", "macro_f1"} <= set(metrics["final"])
    report = json.loads(invoke("evaluate", out, table, "--json", "--out", tmp_path / "eval").stdout)
    assert report["images"] == 4 and "test_files.txt" in report["scored"]  # the run's own CSV: the rows it tested on
    assert report["accuracy"] == pytest.approx(metrics["final"]["test_acc"])
    assert report["balanced_accuracy"] == pytest.approx(metrics["final"]["balanced_accuracy"])


def test_a_split_column_decides_the_split(tmp_path):
    rows = [(n, c, "test" if i % 5 == 0 else "valid" if i % 5 == 1 else "train") for i, (n, c) in enumerate(single())]
    table = csv_dataset(tmp_path / "d", rows, "file,class,split")
    split = read_labels(table, None, "", "", "", 0.2, 0)
    assert [len(split.items(p)) for p in ("train", "test", "valid")] == [12, 4, 4]
    fastai_style = csv_dataset(tmp_path / "f", [(n, c, "True" if i % 4 == 0 else "False") for i, (n, c) in enumerate(single())],
                               "fname,label,is_valid")
    split = read_labels(fastai_style, None, "", "", "", 0.2, 0)
    assert len(split.items("test")) == 5 and not split.valid  # is_valid rows are the set the run is measured on


def test_rows_naming_missing_files_are_skipped_with_a_warning(tmp_path, capsys):
    table = csv_dataset(tmp_path / "d", single())
    table.write_text(table.read_text() + "gone1.png,red\ngone2.png,blue\n")
    split = read_labels(table, None, "", "", "", 0.2, 0)
    assert sum(len(split.items(p)) for p in split.parts) == 20
    warning = capsys.readouterr().err
    assert "2 file(s) that do not exist" in warning and "gone1.png" in warning
    table.write_text("image,label\ngone1.png,red\ngone2.png,blue\n")
    with pytest.raises(UsageError, match="none of the training images"):
        read_labels(table, None, "", "", "", 0.2, 0)


def test_rows_leaving_the_folder_and_repeated_or_conflicting_rows_are_warned_about(tmp_path, capsys):
    table = csv_dataset(tmp_path / "d", single())
    outside = tmp_path / "elsewhere" / "red9.png"
    write_image(outside, COLOURS["red"], seed=99)
    table.write_text(table.read_text() + f"{outside},red\n../elsewhere/red9.png,red\nblue0.png,blue\nred1.png,blue\n")
    split = read_labels(table, None, "", "", "", 0.2, 0)
    assert sum(len(split.items(p)) for p in split.parts) == 21  # the outside file once; the repeats not again
    warning = capsys.readouterr().err
    assert "1 file(s) outside its folder" in warning and str(outside) in warning
    assert "2 file(s) twice with the same label" in warning and "blue0.png (rows 2 and 24)" in warning
    assert "twice with different labels" in warning and "'red' and 'blue'" in warning
    assert warning.count("red9.png") == 2  # outside, then its second row (../) as a repeat


@pytest.mark.parametrize("case,message", [
    ("no header", "no header row"),
    ("unknown column", r"no column 'pic' \(its columns: image, label\).*--image-col"),
    ("empty label", "row 3: the label cell"),
    ("label only in test", "label\\(s\\) green appear in the test split but in no training row"),
])
def test_bad_csvs_are_one_line_errors_naming_the_row_or_column(tmp_path, case, message):
    table = csv_dataset(tmp_path / "d", single(4))
    lines = table.read_text().splitlines()
    image_col = ""
    if case == "no header":
        table.write_text("\n".join(lines[1:]) + "\n")
    elif case == "unknown column":
        image_col = "pic"
    elif case == "empty label":
        table.write_text("\n".join(lines[:2] + [lines[2].split(",")[0] + ","] + lines[3:]) + "\n")
    else:
        write_image(tmp_path / "d" / "images" / "g.png", COLOURS["green"])
        table.write_text("image,label,split\n" + "".join(f"{line},train\n" for line in lines[1:]) + "g.png,green,test\n")
    with pytest.raises(UsageError, match=message):
        read_labels(table, None, image_col, "", "", 0.2, 0)
    if case == "no header":
        result = fastft("train", table, *TINY, "--out", tmp_path / "run")
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_the_delimiter_is_what_the_labels_show():
    assert choose_delimiter(["cat;dog", "cat"], "") == ";"
    assert choose_delimiter(["cat dog", "cat", "dog"], "") == " "
    assert choose_delimiter(["American Bobtail", "Abyssinian"], "") == ""  # a label with a space in its name
    assert choose_delimiter(["cat dog", "cat"], "none") == "" and choose_delimiter(["a|b"], "|") == "|"


def multi_rows():
    rows = []
    for i in range(36):
        labels = ["red"] if i % 3 == 0 else ["blue"] if i % 3 == 1 else ["red", "blue"]
        rows.append((f"m{i}.png", ";".join(labels), "test" if i % 6 == 0 else "valid" if i % 6 == 1 else "train"))
    return rows


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    table = csv_dataset(root / "tags", multi_rows(), "image,tags,split")
    out = root / "run"
    result = invoke("train", table, *TINY, "--epochs", "2", "--out", out)
    assert result.exit_code == 0, result.output
    return table, out


def test_a_multi_label_run_reports_f1_map_and_a_threshold_chosen_on_validation(multi_run):
    _, out = multi_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"micro_f1", "macro_f1", "mAP", "threshold"} <= set(metrics["final"])
    assert set(metrics["test_scores"]["per_label"]) == {"blue", "red"}
    meta = json.loads((out / "model.json").read_text())
    assert meta["multi_label"] and meta["threshold"] == metrics["final"]["threshold"]


def test_multi_label_predict_evaluate_and_onnx(multi_run, tmp_path):
    table, out = multi_run
    image = table.parent / "images" / "m2.png"  # red and blue
    rows = json.loads(invoke("predict", out, image, "--json").stdout)
    threshold = json.loads((out / "model.json").read_text())["threshold"]
    assert rows[0]["labels"] == [c for c, p in sorted(rows[0]["probabilities"].items(), key=lambda kv: -kv[1]) if p >= threshold]
    assert [label for label, _ in rows[0]["top"]] == rows[0]["labels"]
    top = json.loads(invoke("predict", out, image, "--json", "--top-k", "2").stdout)[0]["top"]
    assert len(top) == 2 and abs(sum(p for _, p in top) - 1) > 1e-3  # sigmoid per label: no need to sum to 1
    report = json.loads(invoke("evaluate", out, table, "--json", "--out", tmp_path / "eval").stdout)
    assert set(report["per_label"]) == {"blue", "red"} and all("precision" in v and "recall" in v for v in report["per_label"].values())
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    exported = fastft("export", copy)
    assert exported.returncode == 0 and float(exported.stdout.split(": ")[-1]) <= 1e-4, exported.stderr


def test_balance_weights_the_loss_or_the_sampling_and_imbalance_is_noted(tmp_path):
    import torch

    from fastft.data.loaders import build_dataloaders, label_counts, load_split
    from fastft.recipe import Recipe
    from fastft.train.model import create_learner

    root = make_split_dataset(tmp_path / "d", per_class=8)
    for extra in range(17):  # red: 25 training images, blue 8: more than 3x
        write_image(root / "train" / "red" / f"more{extra}.png", COLOURS["red"], seed=100 + extra)
    base = Recipe(size=16, bs=4, workers=0, arch="resnet18", pretrained=False)
    for balance in ("weights", "sampler", "none"):
        recipe = base.replace(balance=balance)
        split = load_split(root, recipe)
        counts = label_counts(split)
        assert counts == {"blue": 8, "red": 25}
        dls = build_dataloaders(split, recipe, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
        learn, _ = create_learner(dls, recipe, class_counts=counts)
        weight = learn.loss_func.func.weight
        if balance == "weights":
            assert weight.tolist() == pytest.approx([33 / (2 * 8), 33 / (2 * 25)])
        else:
            assert weight is None
        if balance == "sampler":  # each class drawn about equally often
            assert dls.train.wgts[0] * 8 == pytest.approx(dls.train.wgts[-1] * 25)
            drawn = [dls.train_ds.items[i][1] for i in dls.train.get_idxs()]
            assert 0.35 < drawn.count("blue") / len(drawn) < 0.65
    noted = fastft("cifar", "--data", root, *TINY, "--epochs", "1", "--out", tmp_path / "run")
    assert noted.returncode == 0 and "imbalanced (training images: red 25, blue 8); --balance weights or" in noted.stderr
    run = tmp_path / "weighted"
    weighted = fastft("cifar", "--data", root, *TINY, "--epochs", "2", "--balance", "weights", "--out", run)
    assert weighted.returncode == 0, weighted.stderr
    assert "red 25, blue 8); --balance weights weighs them equally in the loss" in weighted.stderr  # what it did
    # the accuracy the run prints is its saved model's: `fastft evaluate` gives the same, with and without flip TTA
    printed, printed_tta = re.search(r"test acc (\d\.\d{3}) \((\d\.\d{3}) with flip TTA\)", weighted.stdout).groups()
    final = json.loads((run / "metrics.json").read_text())["final"]
    for tta, figure, key in (("--no-tta", printed, "test_acc"), ("--tta", printed_tta, "test_acc_tta")):
        report = json.loads(invoke("evaluate", run, root, "--json", tta, "--out", tmp_path / f"eval{tta}").stdout)
        assert f"{report['accuracy']:.3f}" == figure and report["accuracy"] == pytest.approx(final[key], abs=1e-9)


def test_inspect_reports_counts_duplicates_leakage_and_tiny_classes(tmp_path):
    root = make_split_dataset(tmp_path / "d", per_class=8)
    shutil.copy(root / "train" / "red" / "red_1.png", root / "test" / "red" / "leaked.png")
    shutil.copy(root / "train" / "blue" / "blue_2.jpg", root / "train" / "blue" / "again.jpg")
    (root / "train" / "red" / "broken.jpg").write_text("not an image")
    out = tmp_path / "report"
    shown = fastft("inspect", root, "--out", out)
    assert shown.returncode == 0, shown.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["images"]["train"] == {"blue": 9, "red": 9} and report["images"]["test"] == {"blue": 4, "red": 5}
    assert [p.split("/")[-1] for p in report["duplicates"]["across"][0]] == ["red_1.png", "leaked.png"]
    assert len(report["duplicates"]["within"]["train"]) == 1 and report["unreadable"][0][0].endswith("broken.jpg")
    assert report["tiny_classes"] == ["blue", "red"] and "fewer than 10 training images" in shown.stdout
    assert report["modes"] and (out / "samples.png").read_bytes()[:4] == b"\x89PNG"
    as_json = json.loads(fastft("inspect", root, "--json", "--out", tmp_path / "again").stdout)
    assert as_json["duplicates"] == report["duplicates"]
    warned = fastft("cifar", "--data", root, *TINY, "--epochs", "1", "--out", tmp_path / "run")
    assert warned.returncode == 0 and "1 test/validation image(s) are exact copies of training images" in warned.stderr


def test_inspect_reports_an_empty_class_and_writes_nothing_without_out(tmp_path):
    from conftest import make_class_folders

    def listing(folder):
        return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}

    flat = make_class_folders(tmp_path / "flat", per_class=6)
    split = make_split_dataset(tmp_path / "split", per_class=6)
    (flat / "green").mkdir()
    (split / "train" / "green").mkdir()
    (split / "test" / "green").mkdir()
    here = tmp_path / "here"
    here.mkdir()
    for data in (flat, split):
        before = listing(data)
        shown = fastft("inspect", data, cwd=here)
        assert shown.returncode == 0, shown.stderr
        assert "empty class folders (no images; training refuses them): green" in shown.stdout
        assert json.loads(fastft("inspect", data, "--json", cwd=here).stdout)["empty_classes"] == ["green"]
        assert listing(data) == before and not list(here.iterdir())  # nothing written: not beside it, not in DATA
    refused = fastft("train", flat, *TINY, "--out", tmp_path / "run")
    assert refused.returncode == 2 and "class folder 'green' has no images" in refused.stderr
    assert "--valid-pct" not in refused.stderr
