"""Every file fastft writes goes through here: written under a temporary name in the same folder, then renamed
into place. A crash, a Ctrl-C, a kill or a full disk mid-write leaves the previous complete file (or none),
never a truncated one; a reader never sees half a file. Files get the user's usual permissions (umask).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, with the same suffix (writers that pick a format by it still do), to
    write to; renamed onto `path` when the block ends without error, removed when it does not."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as e:
        if not e.filename:  # fsync and write errors carry no name; a full disk's message should name the file
            e.filename = str(path)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def remove_partial_files(folder: Path, only_abandoned: bool = False) -> None:
    """Temporary files a killed process left behind (a SIGKILL skips every cleanup): the finished files beside
    them are whole, and these are not. `only_abandoned`: only those whose writer is gone, in a folder other
    processes may be writing to at the same time (the decode cache)."""
    for leftover in Path(folder).glob(".*.partial*"):
        pid = leftover.name.split(".partial")[0].rsplit(".", 1)[-1]  # .NAME.PID.partial.SUFFIX
        if not only_abandoned or not (pid.isdigit() and process_alive(int(pid))):
            leftover.unlink(missing_ok=True)


def disk_full(error: BaseException) -> bool:
    """A full disk (or quota), however a library reports it: an OSError, or an error of a library's own type whose
    message carries the OS error (safetensors' writer: "code: 28, kind: StorageFull")."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def disk_full_error(path: Path) -> OSError:
    """The OSError the CLI reports as a full disk, naming the file that did not fit."""
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def usual_permissions(path: Path) -> None:
    """Read and write for the owner, and for others as the umask allows: what `open` gives, for files a library
    wrote more tightly (safetensors' writer makes them 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (a zombie counts as gone: it runs nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as temporary:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, value) -> None:

    write_text(path, json.dumps(value, indent=2) + "\n")


def subplots(*args, figsize: tuple[float, float], **kwargs):
    """(figure, axes): a matplotlib Figure and its `Figure.subplots`, made without pyplot, so importing or calling
    fastft never chooses a backend or grows pyplot's list of open figures: a program (a notebook, a web service)
    that uses fastft keeps its own. Every picture fastft draws starts here and ends in `save_figure`."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*args, **kwargs)


def save_figure(figure, path: Path) -> None:
    """A matplotlib figure as a PNG at 100 dpi (Agg, whatever backend pyplot has)."""
    with replacing(path) as temporary:
        figure.savefig(temporary, dpi=100)
