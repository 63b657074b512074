"""Decode once: a split's images as one uint8 tensor, in memory and on disk.

When no item transform is random (no `crop`, no `trivial`), every image becomes the same
size x size picture every epoch: resize, centre-crop, done. Decoding those JPEGs again each epoch
is wasted work (on 2 CPU cores it costs a third of the training time at 32 px), so fastft decodes
each file once, keeps the pictures as one (N, 3, size, size) uint8 tensor, and serves batches by
indexing it; flips and colour run on the batch afterwards, as before. All of CIFAR-10 is 184 MB
at 32 px, 288 MB at 40.

The decoded pictures are also saved under the cache folder ($FASTFT_CACHE, default
$XDG_CACHE_HOME/fastft or ~/.cache/fastft), keyed by every file's path, size and modification time
and by size/crop_pct: the next run over the same files skips decoding (and the readability scan)
entirely. A changed, added or removed file changes the key. Delete the folder to reclaim the space.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np

from fastft.atomic import remove_partial_files, replacing, write_json
from fastft.data.augment import AugPlan
from fastft.data.images import read_pictures

VERSION = 3  # bump when what is stored changes (2: channels first; 3: timm's exact resize and crop)
MAX_BYTES = 4 * 2**30  # larger datasets decode per batch as usual


def cache_folder() -> Path:
    """$FASTFT_CACHE, else fastft/ in the user's cache folder ($XDG_CACHE_HOME, default ~/.cache); the first time
    this process opens it, without the half-written entries of writers that were killed (kill -9 skips every cleanup:
    a decode's pixels, a backbone's features)."""
    if os.environ.get("FASTFT_CACHE"):
        folder = Path(os.environ["FASTFT_CACHE"]).expanduser()
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fastft"
    _without_abandoned_writes(folder)
    return folder


@functools.cache
def _without_abandoned_writes(folder: Path) -> None:
    if folder.is_dir():
        remove_partial_files(folder, only_abandoned=True)


def applies(plan: AugPlan, size: int, n_images: int) -> bool:
    """True when every item transform is deterministic (the presets say so) and the pictures fit in MAX_BYTES."""
    return not plan.random_per_item and n_images * size * size * 3 <= MAX_BYTES


def _key(files: list[Path], size: int, crop_pct: float) -> str:
    # abspath, not resolve: resolve costs a system call per folder of every file's path
    lines = [f"{VERSION} {size} {crop_pct}", *map(_file_key, files)]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()


def decode(files: list[Path], size: int, crop_pct: float):
    """(readable files, (N, 3, size, size) uint8 tensor of their pictures, [(unreadable file, reason)]),
    from the disk cache when these exact files were decoded before."""
    finish_writes()  # a save still in flight may be of these very files (fastft compare: one run after another)
    key = _key(files, size, crop_pct)
    stored, meta_file = cache_folder() / f"{key}.npy", cache_folder() / f"{key}.json"
    if stored.is_file() and meta_file.is_file():
        try:
            skipped = {Path(p): why for p, why in json.loads(meta_file.read_text())["skipped"]}
            pixels = np.load(stored)
            good = [p for p in files if p not in skipped]
            if pixels.shape == (len(good), 3, size, size):
                return good, _as_tensor(pixels), list(skipped.items())
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is decoded again and rewritten
    good, pixels, bad = read_pictures(files, size, crop_pct)
    # written while training starts (all of CIFAR-10 at 40 px: 288 MB, about half a second); a thread that is not
    # a daemon, so the process finishes the file before it exits
    writer = threading.Thread(target=_save, args=(stored, meta_file, pixels, bad), name="fastft-cache-writer")
    writer.start()
    _writers.append(writer)
    return good, _as_tensor(pixels), bad


_writers: list = []


def finish_writes() -> None:
    """Wait until every decoded dataset this process started saving is on disk."""
    while _writers:
        _writers.pop().join()


def _as_tensor(pixels: np.ndarray):
    """The (N, 3, H, W) uint8 array as a tensor sharing its memory: stored channels first, as batches are,
    so neither a first run nor a later one copies all the pictures to reorder them."""
    import torch

    return torch.from_numpy(pixels)


def _save(stored: Path, meta_file: Path, pixels: np.ndarray, bad) -> None:
    """Written atomically (fastft/atomic.py): a reader, or a second process, never sees half a file."""
    try:
        stored.parent.mkdir(parents=True, exist_ok=True)
        with replacing(stored) as temporary:
            np.save(temporary, pixels)
        write_json(meta_file, {"skipped": [[str(p), why] for p, why in bad]})
    except OSError:
        pass  # a read-only or full disk only costs the next run a decode


def _file_key(path: Path) -> str:
    """A file as the caches know it: its path, size and modification time (a changed file is a new one)."""
    stat = os.stat(path)
    return f"{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}"


def _features_group(size: int, crop_pct: float, backbone: str) -> str:
    return hashlib.sha1(f"{VERSION} {size} {crop_pct} {backbone}".encode()).hexdigest()


def _feature_rows(group: str) -> dict:
    """file key -> (stored file, row): every file whose features this network at this size has stored."""
    from safetensors import SafetensorError, safe_open

    rows = {}
    for stored in sorted(cache_folder().glob(f"{group}.*.features.safetensors")):
        try:
            with safe_open(str(stored), "pt") as f:
                keys = json.loads(f.metadata()["files"])
        except (OSError, SafetensorError, ValueError, KeyError, TypeError):
            continue  # damaged: its files are computed again
        for row, key in enumerate(keys):
            rows.setdefault(key, (stored, row))
    return rows


def features_missing(files: list[Path], size: int, crop_pct: float, backbone: str) -> int:
    """How many of `files` `features` would have to compute (the rest it reads back)."""
    stored = _feature_rows(_features_group(size, crop_pct, backbone))
    return sum(_file_key(f) not in stored for f in files)


def features(files: list[Path], size: int, crop_pct: float, backbone: str, compute) -> dict:
    """A frozen backbone's features of `files` (a dict of tensors, one row per file), remembered file by file in the
    cache folder under the picture size and `backbone` (a digest of its weights): `compute(indices)` runs only for the
    files not stored yet, and they are stored in turn. So one pass serves every step of a command that needs these
    features (the backbone choice's probes on four fifths of the training images, the label check and the final probe
    on all of them) and a second command on the same files."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    if not files:
        return compute([])
    group = _features_group(size, crop_pct, backbone)
    keys = [_file_key(f) for f in files]
    stored = _feature_rows(group)
    missing = [i for i, key in enumerate(keys) if key not in stored]
    computed = compute(missing) if missing else {}
    if missing:
        chunk = hashlib.sha1("\n".join(keys[i] for i in missing).encode()).hexdigest()
        try:
            cache_folder().mkdir(parents=True, exist_ok=True)
            with replacing(cache_folder() / f"{group}.{chunk}.features.safetensors") as temporary:
                save_file({name: t.contiguous() for name, t in computed.items()}, str(temporary),
                          metadata={"files": json.dumps([keys[i] for i in missing])})
        except OSError:
            pass  # a read-only or full disk only costs the next command the backbone's pass
    if len(missing) == len(files):  # none stored before: computed in the order asked
        return computed
    rows = {i: stored[key] for i, key in enumerate(keys) if key in stored}
    try:
        loaded = {path: load_file(path) for path in {path for path, _ in rows.values()}}
    except (OSError, SafetensorError):  # removed or damaged since it was listed: all computed after all
        return compute(list(range(len(files))))
    position = {i: n for n, i in enumerate(missing)}
    names = computed.keys() if computed else next(iter(loaded.values())).keys()
    return {name: torch.stack([loaded[rows[i][0]][name][rows[i][1]] if i in rows else computed[name][position[i]]
                               for i in range(len(files))]) for name in names}


def content_hashes(files: list[Path], digest) -> list[str]:
    """`digest(file)` of every file (the duplicate check's content hashes), remembered in the cache folder under
    the files' key: a run over unchanged files reads them back instead of hashing every file again."""
    stored = cache_folder() / f"{_key(files, 0, 0.0)}.hashes.json"
    try:
        hashes = json.loads(stored.read_text())
        if len(hashes) == len(files):
            return hashes
    except (OSError, ValueError):
        pass
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        hashes = list(pool.map(digest, files))
    try:
        stored.parent.mkdir(parents=True, exist_ok=True)
        write_json(stored, hashes)
    except OSError:
        pass  # a read-only or full disk only costs the next run the hashing
    return hashes
