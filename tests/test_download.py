"""Dataset downloads, checksums and unpacking, against a real HTTP server on 127.0.0.1."""
import functools
import http.server
import json
import shutil
import threading

import pytest

from conftest import TINY, invoke, make_split_dataset
from fastft.download import fetch_dataset, sha1_of
from fastft.errors import UsageError


@pytest.fixture
def archives(tmp_path):
    """hotdog.zip and cifar10.tgz laid out as d2l and fastai publish them (one top folder)."""
    make_split_dataset(tmp_path / "src" / "hotdog")
    served = tmp_path / "served"
    served.mkdir()
    shutil.make_archive(served / "hotdog", "zip", tmp_path / "src", "hotdog")
    shutil.make_archive(served / "cifar10", "gztar", tmp_path / "src", "hotdog")
    (served / "cifar10.tar.gz").rename(served / "cifar10.tgz")  # fastai's URLs.CIFAR name
    return served


@pytest.fixture
def server(archives):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archives))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_checks_unpacks_and_is_reused(server, archives, tmp_path):
    home = tmp_path / "home"
    sha1 = sha1_of(archives / "hotdog.zip")
    root = fetch_dataset("hotdog", f"{server}/hotdog.zip", sha1, home)
    assert root == home / "hotdog" and sorted(p.name for p in (root / "train").iterdir()) == ["blue", "red"]
    assert not list(home.glob("*.zip")) and not list(home.glob("*.partial"))
    # Reused next time: a dead URL does not matter once the data is there.
    assert fetch_dataset("hotdog", "http://127.0.0.1:9/gone.zip", sha1, home) == root


def test_tgz_archives_unpack_too(server, tmp_path):
    root = fetch_dataset("cifar10", f"{server}/cifar10.tgz", "", tmp_path / "home")
    assert (root / "test" / "red").is_dir()


def test_checksum_mismatch_leaves_nothing_behind(server, tmp_path):
    home = tmp_path / "home"
    with pytest.raises(UsageError, match="SHA-1"):
        fetch_dataset("hotdog", f"{server}/hotdog.zip", "0" * 40, home)
    assert list(home.iterdir()) == []


def test_offline_download_names_the_url_and_the_data_option(server, tmp_path):
    with pytest.raises(UsageError, match=r"http://127\.0\.0\.1:9/hotdog\.zip.*--data"):
        fetch_dataset("hotdog", "http://127.0.0.1:9/hotdog.zip", "", tmp_path / "home")
    with pytest.raises(UsageError, match=r"404.*--data") as missing:
        fetch_dataset("hotdog", f"{server}/moved.zip", "", tmp_path / "home")
    assert "\n" not in str(missing.value)


def test_a_recipe_downloads_into_the_data_home(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_DATA_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    result = invoke("cifar", "--data-url", f"{server}/cifar10.tgz", *TINY, "--epochs", "1", "--out", out)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "cifar10" / "train").is_dir()
    assert json.loads((out / "metrics.json").read_text())["final"]["test_acc"] >= 0
