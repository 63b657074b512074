"""Dataset downloads in-process: where the data home is, and reuse. (tests/test_first_run.py runs the
installed command against a real server with an empty home folder, failures included.)"""
import json
import shutil

import pytest

from conftest import TINY, invoke, make_split_dataset
from fastft.data.download import data_home, fetch_dataset, sha1_of
from fastft.errors import UsageError


@pytest.fixture
def hotdog_zip(file_server, tmp_path):
    url, served, requests = file_server
    make_split_dataset(tmp_path / "src" / "hotdog")
    shutil.make_archive(served / "hotdog", "zip", tmp_path / "src", "hotdog")
    return f"{url}/hotdog.zip", sha1_of(served / "hotdog.zip"), requests


def test_the_data_home_is_fastais_data_folder_unless_fastft_data_home_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTFT_DATA_HOME", raising=False)
    monkeypatch.setenv("FASTAI_HOME", str(tmp_path / "fastai"))  # fastai's own way to move its folders
    assert data_home() == tmp_path / "fastai" / "data"
    assert (tmp_path / "fastai" / "config.ini").is_file()  # fastai wrote its config, as on a first run
    monkeypatch.setenv("FASTFT_DATA_HOME", str(tmp_path / "mine"))
    assert data_home() == tmp_path / "mine"


def test_a_download_is_reused_even_when_the_url_is_gone(hotdog_zip, tmp_path):
    url, sha1, requests = hotdog_zip
    home = tmp_path / "home"
    root = fetch_dataset("hotdog", url, sha1, home)
    assert root == home / "hotdog" and sorted(p.name for p in (root / "train").iterdir()) == ["blue", "red"]
    assert fetch_dataset("hotdog", "http://127.0.0.1:9/gone.zip", sha1, home) == root
    assert sum(requests.values()) == 1


def test_no_url_and_no_local_copy_names_the_data_option(tmp_path):
    with pytest.raises(UsageError, match="--data"):
        fetch_dataset("mine", "", "", tmp_path / "home")


def test_a_recipe_downloads_into_fastft_data_home(hotdog_zip, tmp_path, monkeypatch):
    url, sha1, _ = hotdog_zip
    monkeypatch.setenv("FASTFT_DATA_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    result = invoke("cifar", "--data-url", url, *TINY, "--epochs", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "cifar10" / "train").is_dir()  # the recipe's dataset name, from the URL given
    assert json.loads((out / "metrics.json").read_text())["final"]["test_acc"] >= 0
