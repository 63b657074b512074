"""Fetch a recipe's dataset once into the data home, check it, unpack it, and reuse it next time.

The data home is fastai's data folder (~/.fastai/data, or FASTAI_HOME's) unless FASTFT_DATA_HOME
says otherwise; a recipe's `data_url` (CLI `--data-url`) overrides where the archive comes from.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
from pathlib import Path

from fastft.errors import UsageError


def data_home() -> Path:
    if os.environ.get("FASTFT_DATA_HOME"):
        return Path(os.environ["FASTFT_DATA_HOME"]).expanduser()
    from fastai.data.external import fastai_cfg

    return Path(fastai_cfg().data_path)


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_dataset(name: str, url: str, sha1: str = "", home: Path | None = None) -> Path:
    """The unpacked dataset folder home/name, downloading and unpacking `url` first if it is missing."""
    home = home or data_home()
    target = home / name
    if target.is_dir() and any(target.iterdir()):
        return target
    if not url:
        raise UsageError(f"no local copy of '{name}' in {home} and the recipe names no data_url; pass --data DIR")
    from fastdownload import download_url

    home.mkdir(parents=True, exist_ok=True)
    archive = home / Path(url.split("?")[0]).name
    print(f"downloading {name} from {url} to {archive}")
    try:
        download_url(url, archive, timeout=60)
    except (urllib.error.URLError, OSError) as e:
        if isinstance(e, urllib.error.HTTPError):
            reason = f"the server answered HTTP {e.code} {str(e.reason).splitlines()[0]}"
        else:
            reason = (str(getattr(e, "reason", None) or e).strip().splitlines() or [type(e).__name__])[0][:100]
            reason += "; offline?"
        raise UsageError(f"could not download {name} from {url} ({reason}); "
                         f"pass --data DIR with a local copy (DIR/train/<class>/*, DIR/test/<class>/*)") from None
    if sha1 and (got := sha1_of(archive)) != sha1:
        archive.unlink()
        raise UsageError(f"download of {url} is corrupt: SHA-1 {got}, expected {sha1}; "
                         "try again, or pass --data DIR with a local copy")
    unpack(archive, target)
    archive.unlink()
    return target


def unpack(archive: Path, target: Path) -> None:
    """Unpack into `target`; an archive holding one top folder (hotdog/, cifar10/) is unwrapped.
    Unpacks beside the target first, so an interrupted run never leaves a half dataset behind."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        # tar members may not escape the target ('data' filter); zipfile already strips such paths
        safety = {"filter": "data"} if tarfile.is_tarfile(archive) else {}
        shutil.unpack_archive(archive, partial, **safety)
    except (shutil.ReadError, ValueError, OSError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise UsageError(f"could not unpack {archive} ({e}); delete it and try again, or pass --data DIR") from None
    entries = [p for p in partial.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else partial
    shutil.rmtree(target, ignore_errors=True)  # only an empty folder can be here: see fetch_dataset
    root.rename(target)
    shutil.rmtree(partial, ignore_errors=True)
