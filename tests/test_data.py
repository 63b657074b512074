"""Folder datasets: layouts, seeded splits and samples, unreadable files, and what the batches hold."""
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import make_class_folders, make_split_dataset, write_image
from fastft.data.folders import find_images
from fastft.data.split import stratified_sample
from fastft.data.loaders import build_dataloaders, load_split
from fastft.errors import UsageError
from fastft.recipe import Recipe

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def test_train_and_test_folders(dataset):
    split = find_images(dataset, 0.2, 0)
    assert split.classes == ["blue", "red"]
    assert [len(split.train[c]) for c in split.classes] == [8, 8]
    assert [len(split.test[c]) for c in split.classes] == [4, 4]


def test_valid_folder_serves_as_test(tmp_path):
    make_class_folders(tmp_path / "train")
    make_class_folders(tmp_path / "valid", per_class=2)
    assert sum(map(len, find_images(tmp_path, 0.2, 0).test.values())) == 4


def test_class_folders_without_split_are_split_by_seed(tmp_path):
    make_class_folders(tmp_path, per_class=10)
    a, b, c = (find_images(tmp_path, 0.3, seed) for seed in (1, 1, 2))
    assert [len(a.test[k]) for k in a.classes] == [3, 3] and [len(a.train[k]) for k in a.classes] == [7, 7]
    assert a.test == b.test and a.test != c.test
    assert not set(a.test["red"]) & set(a.train["red"])


def test_val_and_valid_both_beside_train_is_an_error_in_train_and_inspect(tmp_path):
    """The user's validation images (valid/) silently became the test split beside val/: 185 train, 60 test, 153
    valid."""
    from conftest import TINY, invoke

    root = tmp_path / "data"
    for split in ("train", "val", "valid"):
        make_class_folders(root / split, per_class=4)
    for command in (["train", root, *TINY, "--out", tmp_path / "run"], ["inspect", root]):
        result = invoke(*command)
        assert result.exit_code == 2 and "has both val/ and valid/ beside train/" in result.output, result.output
        assert "rename the one that scores the model to test/" in result.output
    assert not (tmp_path / "run").exists()
    make_class_folders(root / "test", per_class=2)  # and with a test/ too, one of them was silently ignored
    assert invoke("inspect", root).exit_code == 2


@pytest.mark.parametrize("layout,message", [
    ("missing", "does not exist"),
    ("no_split", "no train/ and test/"),
    ("train_only", "no test/"),
    ("unknown_test_class", "lacks"),
])
def test_bad_layouts_are_clean_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "no_split":
        (root / "stuff").mkdir(parents=True)
        (root / "readme.txt").write_text("hi")
    elif layout == "train_only":
        make_class_folders(root / "train")
    elif layout == "unknown_test_class":
        make_class_folders(root / "train")
        make_class_folders(root / "test", classes=("green",))
    with pytest.raises(UsageError, match=message):
        find_images(root, 0.2, 0)


def test_unreadable_files_are_skipped_with_one_warning(tmp_path, capsys):
    root = make_split_dataset(tmp_path / "d")
    (root / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "test" / "blue" / "empty.png").write_bytes(b"")
    split = load_split(root, Recipe())
    warning = capsys.readouterr().err
    assert "broken.jpg" in warning and "empty.png" in warning and warning.count("\n") == 1
    assert len(split.train["red"]) == 8 and len(split.test["blue"]) == 4
    assert {p.name for p, _ in split.skipped} == {"broken.jpg", "empty.png"}


def test_an_image_whose_header_claims_too_many_pixels_is_skipped_in_training_not_decoded(tmp_path, capsys):
    """With PIL's guard lifted for the user's own photos, a 10 kB PNG claiming 100000x100000 pixels allocated 10 GB
    (MemoryError where that fails) before finding its data missing; 20000x20000 allocated 400 MB."""
    from conftest import png_claiming
    from fastft.data.images import MOST_PIXELS, large_images_allowed

    root = make_split_dataset(tmp_path / "d")
    for side in (100_000, 20_000):
        (root / "train" / "red" / f"bomb{side}.png").write_bytes(png_claiming(side, side))
    with large_images_allowed():
        split = load_split(root, Recipe())
    warning = capsys.readouterr().err
    assert {p.name for p, _ in split.skipped} == {"bomb100000.png", "bomb20000.png"} and len(split.train["red"]) == 8
    assert f"100000x100000 pixels, over the {MOST_PIXELS:,} fastft decodes" in warning, warning


def test_a_class_with_no_readable_images_is_an_error(tmp_path):
    root = make_split_dataset(tmp_path / "d")
    shutil.rmtree(root / "train" / "red")
    (root / "train" / "red").mkdir()
    (root / "train" / "red" / "x.jpg").write_text("nope")
    with pytest.raises(UsageError, match="'red'.*no readable images"):
        load_split(root, Recipe())


def test_limit_is_a_seeded_stratified_sample(tmp_path):
    by_class = {"a": [tmp_path / f"a{i}" for i in range(30)], "b": [tmp_path / f"b{i}" for i in range(20)],
                "c": [tmp_path / f"c{i}" for i in range(10)]}
    sample = stratified_sample(by_class, 12, seed=0)
    assert {c: len(f) for c, f in sample.items()} == {"a": 6, "b": 4, "c": 2}
    assert sample == stratified_sample(by_class, 12, seed=0) != stratified_sample(by_class, 12, seed=1)
    assert all(set(sample[c]) <= set(by_class[c]) for c in by_class)
    assert stratified_sample(by_class, 0, 0) is by_class


def test_batches_are_normalised_rgb_at_size_and_test_batches_never_change(tmp_path):
    root = make_split_dataset(tmp_path / "d")
    write_image(root / "test" / "red" / "gray.png", (128, 128, 128), size=(50, 20))  # odd shape, then grayscale
    from PIL import Image
    Image.open(root / "test" / "red" / "gray.png").convert("L").save(root / "test" / "red" / "gray.png")
    recipe = Recipe(size=24, bs=4, workers=0, aug="crop+flip")
    dls = build_dataloaders(load_split(root, recipe), recipe, MEAN, STD, torch.device("cpu"))
    assert list(dls.vocab) == ["blue", "red"]
    x, y = dls.one_batch()
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0
    first = [b[0].clone() for b in dls.valid]
    second = [b[0].clone() for b in dls.valid]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert sum(len(b) for b in first) == 9


def _batches(split, recipe, seed):
    """Every batch of one epoch; the seed fixes the DataLoader's shuffling and the augmentation."""
    from fastai.vision.all import set_seed

    set_seed(seed)
    dls = build_dataloaders(split, recipe, MEAN, STD, torch.device("cpu"))
    train = [(x.clone(), y.clone()) for x, y in dls.train]
    return train, [(x.clone(), y.clone()) for x, y in dls.valid]


def test_decode_once_cache_gives_the_same_batches_as_decoding_every_epoch(tmp_path):
    root = make_split_dataset(tmp_path / "d", classes=("blue", "red", "green"), per_class=10)
    (root / "train" / "red" / "broken.jpg").write_bytes(b"not an image")
    recipe = Recipe(size=24, crop_pct=0.8, bs=4, workers=0, aug="flip+color")
    cached_split, plain_split = load_split(root, recipe), load_split(root, recipe.replace(cache=False))
    assert cached_split.pixels["train"].shape == (30, 3, 24, 24) and not plain_split.pixels
    assert cached_split.skipped == plain_split.skipped and len(cached_split.skipped) == 1
    for (a, b) in zip(_batches(cached_split, recipe, 3), _batches(plain_split, recipe, 3)):
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-6)


def test_decoded_pictures_are_reused_from_disk_until_a_file_changes(tmp_path, monkeypatch):
    from fastft.data import cache

    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    root = make_split_dataset(tmp_path / "d")
    recipe = Recipe(size=16, crop_pct=1.0, aug="flip")
    first = load_split(root, recipe).pixels["train"]
    cache.finish_writes()  # saved in the background while training starts
    assert list((tmp_path / "cache").glob("*.npy"))

    def no_decoding(*args):
        raise AssertionError("decoded a file the cache holds")

    monkeypatch.setattr(cache, "read_pictures", no_decoding)
    assert torch.equal(load_split(root, recipe).pixels["train"], first)
    monkeypatch.undo()
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    changed = root / "train" / "blue" / "blue_0.jpg"
    write_image(changed, (250, 250, 250), size=(40, 32))
    os.utime(changed, ns=(1, 1))  # a new mtime even on coarse-clock file systems
    again = load_split(root, recipe).pixels["train"]
    assert not torch.equal(again, first) and again[0].float().mean() > 200


def test_a_run_that_decodes_and_one_that_reads_the_cache_train_bit_identical_weights(tmp_path, monkeypatch):
    """Resuming (or any second run) reads the cache; it must give what a cold run gives, to the bit."""
    from conftest import TINY, invoke
    from safetensors.torch import load_file

    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    root = make_split_dataset(tmp_path / "d")
    cold = load_split(root, Recipe(size=32, aug="flip")).pixels["train"]
    assert cold.is_contiguous()  # laid out channels first, as the cache stores and reloads it
    weights = []
    for name in ("cold", "warm"):
        if name == "cold":
            from fastft.data import cache

            cache.finish_writes()
            shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        result = invoke("train", root, *TINY, "--epochs", "2", "--aug", "flip", "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        weights.append(load_file(str(tmp_path / name / "model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_loader_starts_no_more_workers_than_it_has_batches(tmp_path):
    """fastai starts every worker at every pass over the data: a worker with no batch would only cost its start."""
    root = make_split_dataset(tmp_path / "d")
    recipe = Recipe(size=16, bs=4, workers=8, aug="crop+flip")
    dls = build_dataloaders(load_split(root, recipe), recipe, MEAN, STD, torch.device("cpu"))
    assert all(0 < len(dl) < 8 for dl in dls.loaders)
    assert [dl.fake_l.num_workers for dl in dls.loaders] == [len(dl) for dl in dls.loaders]  # see set_workers
    cached = Recipe(size=16, bs=4, workers=8, aug="flip")
    dls = build_dataloaders(load_split(root, cached), cached, MEAN, STD, torch.device("cpu"))
    assert dls.train.pixels is not None and all(dl.fake_l.num_workers == 0 for dl in dls.loaders)


def test_auto_workers_none_on_a_cpu_and_one_per_four_batches_on_a_gpu(monkeypatch):
    from fastft.data import loaders

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # only the device's type is read
    monkeypatch.setattr("fastcore.parallel.num_cpus", lambda: 16)
    assert loaders.worker_count("auto", cpu, 1000) == 0
    assert [loaders.worker_count("auto", cuda, n) for n in (3, 8, 20, 1000)] == [0, 2, 5, 8]
    assert loaders.worker_count("auto", cuda, 1000, processes=4) == 4  # four training processes share 16 cores
    assert loaders.worker_count(3, cpu, 1000) == 3 and loaders.worker_count(3, cuda, 2) == 2


def test_random_item_transforms_and_no_cache_decode_per_batch(tmp_path):
    root = make_split_dataset(tmp_path / "d")
    assert not load_split(root, Recipe(size=16, aug="crop+flip")).pixels
    assert not load_split(root, Recipe(size=16, aug="trivial")).pixels
    assert not load_split(root, Recipe(size=16, aug="flip", cache=False)).pixels


def test_many_files_decode_in_processes_with_the_same_results_as_threads(tmp_path, monkeypatch):
    """Large datasets are decoded by a process pool (fastft/data/images.py), the pictures written by the workers
    into memory they share with the parent on Linux: same pictures, same order, same unreadable files as the
    thread pool that small ones use."""
    import functools

    from fastft.data import images

    root = make_class_folders(tmp_path / "d", per_class=12)
    files = sorted(root.rglob("*.*"))
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "blue" / "empty.png").write_bytes(b"")
    files.insert(3, root / "red" / "broken.jpg")
    files.append(root / "blue" / "empty.png")
    read = functools.partial(images.fixed_size_pixels, size=16, crop_pct=1.0)
    by_threads = images.read_all(files, read, threads=2)
    pictures_by_threads = images.read_pictures(files, 16, 1.0, threads=2)
    monkeypatch.setattr(images, "PROCESSES_FROM", 1)
    monkeypatch.setattr(images.os, "cpu_count", lambda: 2)  # processes even on a one-core machine
    by_processes = images.read_all(files, read)
    pictures_by_processes = images.read_pictures(files, 16, 1.0)
    assert by_processes[0] == by_threads[0] == pictures_by_processes[0] == pictures_by_threads[0]
    assert len(by_processes[0]) == 24
    assert all((a == b).all() for a, b in zip(by_processes[1], by_threads[1]))
    assert pictures_by_processes[1].shape == (24, 3, 16, 16)
    assert (pictures_by_processes[1] == np.stack(by_threads[1])).all()
    assert (pictures_by_threads[1] == pictures_by_processes[1]).all()
    for result in (by_threads, by_processes, pictures_by_threads, pictures_by_processes):
        assert [p.name for p, _ in result[2]] == ["broken.jpg", "empty.png"]
    every_file_readable = [f for f in files if f.name not in ("broken.jpg", "empty.png")]
    good, pictures, bad = images.read_pictures(every_file_readable, 16, 1.0)
    assert good == every_file_readable and not bad and (pictures == pictures_by_processes[1]).all()


def test_a_class_without_test_images_is_trained_on_and_left_out_of_the_test_figures(tmp_path, capsys):
    """Few-shot sets often have a class with no test image: a warning, not an error; a class without training
    images is still an error, and so is a test split with no image at all."""
    root = make_split_dataset(tmp_path / "d", classes=("blue", "red", "green"))
    shutil.rmtree(root / "test" / "green")
    (root / "test" / "green").mkdir()
    split = load_split(root, Recipe())
    assert "class 'green' has no images in the test split" in capsys.readouterr().err
    assert split.classes == ["blue", "green", "red"] and len(split.train["green"]) == 8 and "green" not in split.test
    for name in ("blue", "red"):
        shutil.rmtree(root / "test" / name)
        (root / "test" / name).mkdir()
    with pytest.raises(UsageError, match="the test split has no readable images"):
        load_split(root, Recipe())


def test_a_killed_writers_half_written_cache_entries_go_when_a_default_run_opens_the_cache(tmp_path):
    """An abandoned .features.PID.partial file survived default runs: only the pixel cache cleaned up after dead
    writers. A live writer's file is left alone."""
    import subprocess

    from conftest import TINY, fastft

    cache = tmp_path / "cache"
    cache.mkdir()
    dead = cache / ".0123abcd.features.999999999.partial.safetensors"  # no process has that id
    alive = cache / f".4567cdef.features.{os.getpid()}.partial.safetensors"  # this test's: still writing
    for leftover in (dead, alive):
        leftover.write_bytes(b"half a file")
    root = make_split_dataset(tmp_path / "d")
    result = fastft("train", root, *TINY, "--epochs", "1", "--strategy", "probe", "--out", tmp_path / "run",
                    env={**os.environ, "FASTFT_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert not dead.exists() and alive.exists()


def test_limit_bounds_the_validation_split_too_held_out_of_the_limited_training_images(tmp_path):
    """`--limit 700 --holdout auto` gave 700 train / 700 test, 346 validation images: the validation split came out
    of every training image before the limit."""
    from fastft.data.folders import split_files
    from fastft.recipe import Recipe

    root = tmp_path / "d"
    for split, count in (("train", 500), ("test", 400)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                (root / split / label / f"{i}.png").write_bytes(b"")  # listed only, never decoded here
    split = split_files(root, Recipe().replace(limit=600, holdout="auto"))
    train, valid, test = (sum(map(len, part.values())) for part in (split.train, split.valid, split.test))
    assert train + valid == 600 and valid == 60 and test == 600
