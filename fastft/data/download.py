"""Fetch a recipe's dataset once into the data home, check it, unpack it, and reuse it next time.

The data home is fastai's data folder (`data` in ~/.fastai/config.ini, created on first use; FASTAI_HOME
moves it) unless FASTFT_DATA_HOME says otherwise. A recipe's `data_url` (CLI `--data-url`) says where the
archive comes from and `data_sha1` what it must hash to.

Nothing half-done is ever left behind: the archive downloads to a `.part` name (fastdownload's), is checked,
unpacked into a `.partial` folder beside the target and renamed into place only when complete; any failure
removes what it made. Archives are zip or tar (any compression), told apart by their content; members that
would land outside the target (absolute paths, `..`, links) refuse the whole archive.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import tarfile
import urllib.error
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from fastft.errors import UsageError

LOCAL_COPY = "try again, or pass --data DIR with a local copy of the dataset"


def data_home() -> Path:
    """$FASTFT_DATA_HOME, else fastai's data folder (fastai creates its config on first use)."""
    if os.environ.get("FASTFT_DATA_HOME"):
        return Path(os.environ["FASTFT_DATA_HOME"]).expanduser()
    from fastai.data.external import fastai_cfg

    return fastai_cfg().path("data")


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "reason", None) or e).strip()
    return text.splitlines()[0][:120] if text else type(e).__name__


def downloaded(name: str, home: Path | None = None) -> Path | None:
    """The dataset's folder in the data home when an earlier run unpacked it there, else None."""
    target = (home or data_home()) / name
    return target if target.is_dir() and any(target.iterdir()) else None


def fetch_dataset(name: str, url: str, sha1: str = "", home: Path | None = None) -> Path:
    """The unpacked dataset folder home/name, downloading, checking and unpacking `url` first if it is missing."""
    home = home or data_home()
    target = home / name
    if downloaded(name, home):
        return target
    local_copy = f"pass --data DIR with a local copy ({name}/train/<class>/*, {name}/test/<class>/*)"
    if not url:
        raise UsageError(f"no local copy of '{name}' in {home} and the recipe names no data_url; {local_copy}")
    home.mkdir(parents=True, exist_ok=True)
    archive = home / (PurePosixPath(url.split("?")[0]).name or f"{name}.archive")
    print(f"downloading {name} from {url} to {archive}", flush=True)
    download(url, archive, local_copy)
    try:
        if sha1 and (got := sha1_of(archive)) != sha1:
            raise UsageError(f"the download of {url} is corrupt or not the published file: SHA-1 {got}, expected "
                             f"{sha1}; try again, or {local_copy}")
        unpack(archive, target)
    finally:
        archive.unlink(missing_ok=True)
    return target


def download(url: str, archive: Path, local_copy: str) -> None:
    """fastdownload's download_url (to archive.part, renamed when complete), its errors as one line each."""

    from fastdownload import download_url

    partial = archive.with_name(archive.name + ".part")
    try:
        if os.isatty(1):
            download_url(url, archive, timeout=60, show_progress=True)
        else:  # fastdownload's download_url prints a bar glyph even with show_progress=False: a log would hold it
            from fastcore.net import urlsave

            urlsave(url, partial, timeout=60)
            partial.replace(archive)
    except urllib.error.HTTPError as e:
        raise UsageError(f"could not download {url}: the server answered HTTP {e.code} "
                         f"{str(e.reason).splitlines()[0] if e.reason else ''}".rstrip() + f"; {local_copy}") from None
    except (urllib.error.ContentTooShortError, http.client.IncompleteRead, NameError) as e:
        # fastcore.net.urlretrieve (2.2.x) raises ContentTooShortError without importing it: a short transfer
        # reaches us as a NameError naming it. Any other NameError is a bug and keeps its traceback.
        if isinstance(e, NameError) and "ContentTooShortError" not in str(e):
            raise
        raise UsageError(f"the download of {url} stopped before the end (the connection closed early); "
                         f"try again, or {local_copy}") from None
    except (urllib.error.URLError, socket.timeout, http.client.HTTPException, OSError) as e:
        raise UsageError(f"could not download {url} ({_first_line(e)}; offline?); {local_copy}") from None
    finally:
        partial.unlink(missing_ok=True)


def _unsafe_member(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")


def _extract(archive: Path, into: Path) -> None:
    """Extract a zip or tar archive into `into`, refusing any member that would land outside it."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            if bad := next((n for n in z.namelist() if _unsafe_member(n)), None):
                raise UsageError(f"{archive.name} holds a member outside its folder ('{bad}'); refusing to unpack it: "
                                 f"{LOCAL_COPY}")
            z.extractall(into)
        return
    try:
        opened = tarfile.open(archive)
    except tarfile.TarError:
        raise UsageError(f"{archive.name} is neither a zip nor a tar archive (truncated, or not an archive): "
                         f"{LOCAL_COPY}") from None
    with opened as t:
        members = t.getmembers()
        if bad := next((m.name for m in members if _unsafe_member(m.name)
                        or (m.issym() or m.islnk()) and _unsafe_member(m.linkname)), None):
            raise UsageError(f"{archive.name} holds a member outside its folder ('{bad}'); refusing to unpack it: "
                             f"{LOCAL_COPY}")
        # tarfile's 'data' filter (Python >= 3.10.12): no devices, no links out of the folder, sane modes
        t.extractall(into, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def unpack(archive: Path, target: Path) -> None:
    """Unpack into `target`; an archive holding one top folder (hotdog/, cifar10/) is unwrapped. Unpacks
    beside the target first, so an interrupted or failed unpack never leaves a half dataset behind."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _extract(archive, partial)
    except UsageError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise UsageError(f"could not unpack {archive.name} ({_first_line(e)}): the download is truncated or "
                         f"corrupt; {LOCAL_COPY}") from None
    except BaseException:  # Ctrl-C mid-unpack: leave nothing half-done
        shutil.rmtree(partial, ignore_errors=True)
        raise
    entries = [p for p in partial.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else partial
    shutil.rmtree(target, ignore_errors=True)  # only an empty folder can be here: see fetch_dataset
    root.rename(target)
    shutil.rmtree(partial, ignore_errors=True)
