"""The first run on a fresh machine, as a new user meets it: the installed `fastft` command, an empty home
folder, no --data, and the dataset archive served over HTTP by a real server on 127.0.0.1."""
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import make_split_dataset
from fastft.data.download import sha1_of

# What points fastft, fastai, matplotlib or the hub at a folder other than the home folder's defaults.
HOME_OVERRIDES = ("FASTFT_DATA_HOME", "FASTFT_CACHE", "FASTAI_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME",
                  "MPLCONFIGDIR", "TORCH_HOME", "HF_HOME")


def new_user(tmp_path: Path, archive_url: str, dataset: str, sha1: str = "") -> dict:
    """The environment of a user with an empty home folder and one recipe file, whose data_url is the archive."""
    home, recipes = tmp_path / "home", tmp_path / "recipes"
    home.mkdir()
    recipes.mkdir()
    (recipes / "first.toml").write_text(
        f'description = "first run"\ndataset = "{dataset}"\ndata_url = "{archive_url}"\ndata_sha1 = "{sha1}"\n'
        'arch = "resnet18"\npretrained = false\nsize = 32\nbs = 4\nepochs = 1\nworkers = 0\naug = "flip"\n')
    env = {k: v for k, v in os.environ.items() if k not in HOME_OVERRIDES}
    return {**env, "HOME": str(home), "FASTFT_RECIPE_PATH": str(recipes)}


def fastft_as(env: dict, *args, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fastft")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def data_home(env: dict) -> Path:
    return Path(env["HOME"]) / ".fastai" / "data"  # fastai's default data folder for that home


def publish(kind: str, dataset: str, served: Path, source: Path) -> str:
    """Archive `source` as d2l (hotdog.zip) or fastai (cifar10.tgz) publish theirs: one top folder."""
    make_split_dataset(source / dataset)
    if kind == "zip":
        shutil.make_archive(str(served / dataset), "zip", source, dataset)
        return f"{dataset}.zip"
    shutil.make_archive(str(served / dataset), "gztar", source, dataset)
    (served / f"{dataset}.tar.gz").rename(served / f"{dataset}.tgz")
    return f"{dataset}.tgz"


@pytest.mark.parametrize("kind,dataset", [("zip", "hotdog"), ("tgz", "cifar10")])
def test_first_run_downloads_checks_unpacks_trains_and_the_second_run_reuses_it(file_server, tmp_path, kind, dataset):
    url, served, requests = file_server
    name = publish(kind, dataset, served, tmp_path / "src")
    env = new_user(tmp_path, f"{url}/{name}", dataset, sha1_of(served / name))

    first = fastft_as(env, "first", "--out", tmp_path / "run1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert requests == {f"/{name}": 1}
    assert "\u2588" not in first.stdout + first.stderr  # a log (not a terminal) gets no progress-bar glyph
    unpacked = data_home(env) / dataset
    assert sorted(p.name for p in (unpacked / "train").iterdir()) == ["blue", "red"]
    assert sorted(p.name for p in data_home(env).iterdir()) == [dataset]  # no archive, .part or .partial left
    assert list((Path(env["HOME"]) / ".cache" / "fastft").glob("*.npy"))  # the decoded pictures, cached
    metrics = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and 0 <= metrics["final"]["test_acc"] <= 1

    second = fastft_as(env, "first", "--out", tmp_path / "run2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert requests == {f"/{name}": 1}  # reused: not fetched again
    assert "downloading" not in second.stdout
    assert (tmp_path / "run2" / "model.safetensors").is_file()


def _zip_with(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _tgz_with(members: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["404", "truncated zip", "truncated tgz", "connection dropped", "wrong checksum",
                                  "zip member ../", "tgz member ../", "offline"])
def test_a_failed_first_download_is_one_line_exit_2_and_leaves_nothing(file_server, tmp_path, case):
    url, served, requests = file_server
    good = publish("zip", "hotdog", served, tmp_path / "src")
    publish("tgz", "hotdog", served, tmp_path / "src2")
    sha1, path, fix = "", good, "--data"
    if case == "404":
        path = "moved.zip"
    elif case.startswith("truncated"):
        path = "half.zip" if "zip" in case else "half.tgz"
        source = served / (good if "zip" in case else "hotdog.tgz")
        (served / path).write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    elif case == "connection dropped":
        path = f"cut/{good}"
    elif case == "wrong checksum":
        sha1, fix = "0" * 40, "SHA-1"
    elif case.startswith("zip member"):
        path, fix = "evil.zip", "outside"
        (served / path).write_bytes(_zip_with({"hotdog/train/a/x.txt": b"x", "../evil.txt": b"gotcha"}))
    elif case.startswith("tgz member"):
        path, fix = "evil.tgz", "outside"
        (served / path).write_bytes(_tgz_with({"hotdog/train/a/x.txt": b"x", "../evil.txt": b"gotcha"}))
    archive_url = f"http://127.0.0.1:{_closed_port()}/hotdog.zip" if case == "offline" else f"{url}/{path}"
    env = new_user(tmp_path, archive_url, "hotdog", sha1)

    result = fastft_as(env, "first", "--out", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "\u2588" not in result.stdout + result.stderr  # no progress-bar glyph in output that is not a terminal
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and fix in errors[0] and "--data" in errors[0], result.stderr
    home = data_home(env)
    assert not home.exists() or list(home.iterdir()) == []  # no archive, no .part, no half-extracted folder
    assert not list(tmp_path.rglob("evil.txt")) and not (tmp_path / "run").exists()
    if case != "offline":
        assert requests.get(f"/{path}") == 1


def test_offline_hub_weights_fail_in_one_line_naming_the_weights_and_the_data(tmp_path):
    """A hub that never answers (a socket that accepts and stays silent), and HF_HUB_OFFLINE: a new user's first
    command stops at once with one line, before any download, instead of a minute of retries."""
    import threading

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections are accepted by the kernel; nothing is ever read or answered
    accepted = []
    threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
    env = new_user(tmp_path, "http://127.0.0.1:9/never.zip", "never")
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{silent.getsockname()[1]}"
    env.pop("HF_HUB_OFFLINE", None)  # a new user's machine does not say it is offline
    (Path(env["FASTFT_RECIPE_PATH"]) / "first.toml").write_text(
        'dataset = "never"\ndata_url = "http://127.0.0.1:9/never.zip"\narch = "resnet18"\nsize = 32\nepochs = 1\n')
    try:
        for extra_env in ({}, {"HF_HUB_OFFLINE": "1"}):
            result = fastft_as({**env, **extra_env}, "first", "--out", tmp_path / "run", cwd=tmp_path)
            errors = [line for line in result.stderr.splitlines() if line.strip()]
            assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
            assert "--weights FILE" in errors[0] and "--data DIR" in errors[0] and "never" in errors[0], errors[0]
            assert ("did not answer" if not extra_env else "HF_HUB_OFFLINE") in errors[0]
            assert "downloading" not in result.stdout and not (tmp_path / "run").exists()
        photos = make_split_dataset(tmp_path / "photos")
        given_data = fastft_as(env, "train", photos, "--size", "32", "--epochs", "1", "--out", tmp_path / "run",
                               cwd=tmp_path)
        assert given_data.returncode == 2 and "--weights FILE" in given_data.stderr and "--data" not in given_data.stderr
    finally:
        silent.close()
