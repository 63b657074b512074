"""Opening image files: any valid mode becomes 8-bit RGB; unreadable files are found before training.

fastai's loader calls `convert("RGB")`, which turns 16-bit grayscale into white and transparent
pixels into whatever colour was stored under them. These helpers do what a person would expect.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


@contextlib.contextmanager
def large_images_allowed():
    """Lift PIL's decompression-bomb guard (about 179 Mpx) while a run reads the user's own training images (a huge
    photo is still a photo to train on), and put it back after: a process that imports fastft to predict, or a
    service embedding it, keeps the guard for every image that comes in. Usable as a decorator. PIL reads the limit
    from a module global, so this holds for the whole process (its forked decode workers too) while it lasts."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def image_extensions() -> set[str]:
    """File extensions PIL can open (lower case, with the dot)."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


HIGH_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # 16/32-bit modes, scaled to 8 bits through NumPy
WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def has_alpha(im: Image.Image) -> bool:
    return im.mode in WITH_ALPHA or (im.mode == "P" and "transparency" in im.info)


def to_rgb_bytes_per_pixel(im: Image.Image) -> int:
    """What to_rgb allocates per pixel of `im` besides `im` itself, at its peak: an EXIF-transposed copy; for
    transparency an RGBA copy, a white background and their composite; for 16/32-bit modes NumPy's float64 arrays.
    Measured on Pillow 13 (bench/serve_limits.py --modes), rounded up; a server bounds its memory with it."""
    if im.mode in HIGH_DEPTH:
        return 29
    if has_alpha(im):
        return 16
    return 4 if im.mode == "RGB" else 5 if im.mode in ("1", "L", "P") else 8


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16/32-bit scaled (not clipped), transparency composited on white,
    EXIF orientation applied, CMYK/palette/grayscale converted."""
    im = ImageOps.exif_transpose(im)
    if im.mode in HIGH_DEPTH:
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0  # 16-bit data often arrives as mode "I"
        if im.mode == "F" and values.max(initial=0) <= 1.0:
            top = 1.0
        im = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if has_alpha(im):  # a palette's transparent colour too: convert("RGBA") applies it
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB") if im.mode != "RGB" else im


def resize_side(size: int, crop_pct: float) -> int:
    """The shorter side an image is resized to before its centre size x size crop: floor(size / crop_pct), as timm's
    eval transform computes it (256 for 224 at 0.875)."""
    return math.floor(size / crop_pct)


def resize_center_crop(im: Image.Image, size: int, crop_pct: float = 1.0) -> Image.Image:
    """Resize the shorter side to resize_side(size, crop_pct), then take the centre size x size square: exactly
    timm's eval transform (torchvision's Resize(int) + CenterCrop, bilinear), as d2l and timm evaluate (224 px from
    256): the longer side truncated as torchvision does, the crop's offsets rounded as its CenterCrop rounds them, so
    that plain timm's preprocessing of a hub export gives the same pixels. Training's test transform and the
    pickle-free bundle's preprocessing both call this."""
    short = resize_side(size, crop_pct)
    w, h = im.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BILINEAR, reducing_gap=None)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


MOST_PIXELS = 256_000_000  # a training image's most (a 20000x12800 panorama), with PIL's own guard lifted


def opened(path) -> Image.Image:
    """Image.open, refusing an image whose header claims more pixels than fastft ever decodes: a 14 kB PNG can
    claim 100000x100000, and decoding it would allocate 10 GB before finding the data missing. Where PIL's own guard
    holds (predict, serve), it refuses even sooner."""
    im = Image.open(path)
    if im.size[0] * im.size[1] > MOST_PIXELS:
        im.close()
        raise ValueError(f"{im.size[0]}x{im.size[1]} pixels, over the {MOST_PIXELS:,} fastft decodes; shrink it")
    return im


def open_rgb(path) -> Image.Image:
    with opened(path) as im:
        im.load()
        return to_rgb(im)


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0][:120] if str(e).strip() else type(e).__name__


def _check_decodes(path: Path) -> None:
    """Raise unless `path` decodes as an image. Decodes the whole file (a truncated JPEG opens fine and
    fails only when read), at reduced resolution where the format allows."""
    with opened(path) as im:
        im.draft("RGB", (64, 64))  # JPEG: decode at 1/2..1/8 scale, still reading every byte
        im.load()


def unreadable_reason(path: Path) -> str | None:
    """None if `path` decodes as an image, else a short reason."""
    bad = read_all([path], _check_decodes, threads=1)[2]
    return bad[0][1] if bad else None


PROCESSES_FROM = 2000  # files; fewer go to threads: a process pool's start costs more than it saves


def _attempt(read, path: Path):
    try:
        if path.stat().st_size == 0:
            return None, "empty file"
        return read(path), None
    except Exception as e:  # PIL raises many types for bad files; all mean "skip this one"
        return None, _reason(e)


def _attempt_all(read, paths: list[Path]) -> tuple:
    """A process's chunk: (values, reasons). Values that are arrays of one shape travel back as one stacked array:
    a single copy through the pipe instead of thousands of small pickles."""
    results = [_attempt(read, p) for p in paths]
    values = [value for value, why in results if why is None]
    if values and all(isinstance(v, np.ndarray) and v.shape == values[0].shape for v in values):
        values = np.stack(values)
    return values, [why for _, why in results]


def _unpack(chunk: tuple) -> list:
    values, reasons = chunk
    good = iter(values)  # a stacked array iterates as views of its rows
    return [(next(good), None) if why is None else (None, why) for why in reasons]


def _decode_processes(n_files: int, threads: int | None) -> int:
    """Processes to read `n_files` with: one per core for many files; 0 (threads instead) for few files, one core, or
    an explicit `threads` count."""
    cores = os.cpu_count() or 1
    return cores if threads is None and cores > 1 and n_files >= PROCESSES_FROM else 0


FORKS = sys.platform.startswith("linux")


def _die_with(parent: int, initializer=None, *initargs) -> None:
    """A decode worker's first step: on Linux, ask the kernel to kill it when the process that forked it dies (a
    kill -9 of a run skips every cleanup, and a worker blocked on its task queue would otherwise live on, holding
    its memory); and if that parent is already gone, exit now."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    if initializer is not None:
        initializer(*initargs)


def _process_pool(processes: int, initializer=None, initargs=()):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork on Linux: the workers start at once and need nothing re-imported; they only run PIL and NumPy.
    # Elsewhere the platform's default (spawn): macOS system libraries are not safe to fork.
    context = multiprocessing.get_context("fork" if FORKS else None)
    return ProcessPoolExecutor(processes, mp_context=context, initializer=_die_with,
                               initargs=(os.getpid(), initializer, *initargs))


def _chunks(paths: list, processes: int) -> list[tuple[int, list]]:
    """(first index, paths): a few chunks per process, for even loads and little pickling."""
    size = -(-len(paths) // (processes * 8))
    return [(i, paths[i:i + size]) for i in range(0, len(paths), size)]


def read_all(paths: list[Path], read, threads: int | None = None) -> tuple[list[Path], list, list[tuple[Path, str]]]:
    """Apply `read` (picklable: a module-level function or a functools.partial of one) to every path: (paths it
    read, in order, what it returned for each, [(path it raised on, reason)]). Many files go to a process per
    core in chunks: opening, converting and resizing with PIL is mostly Python work, which threads cannot run
    side by side. Few files, one core, or an explicit `threads` count use threads."""
    if processes := _decode_processes(len(paths), threads):
        with _process_pool(processes) as pool:
            chunks = [chunk for _, chunk in _chunks(paths, processes)]
            results = [r for chunk in pool.map(functools.partial(_attempt_all, read), chunks) for r in _unpack(chunk)]
    else:
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(functools.partial(_attempt, read), paths, chunksize=64))
    good = [(p, value) for p, (value, why) in zip(paths, results) if why is None]
    bad = [(p, why) for p, (_, why) in zip(paths, results) if why is not None]
    return [p for p, _ in good], [value for _, value in good], bad


def split_readable(paths: list[Path], threads: int | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(readable paths in order, [(unreadable path, reason)])."""
    good, _, bad = read_all(paths, _check_decodes, threads)
    return good, bad


def fixed_size_pixels(path: Path, size: int, crop_pct: float) -> np.ndarray:
    """(3, size, size) uint8, channels first as batches are, and laid out so in memory: the file as RGB after the
    test transform (`resize_center_crop`). A transposed view would make np.stack keep the channels-last layout,
    and a convolution over channels-last batches rounds differently from one over the same values laid out
    channels first: a run decoding its pictures would then differ from one reading them from the cache."""
    return np.ascontiguousarray(np.asarray(resize_center_crop(open_rgb(path), size, crop_pct)).transpose(2, 0, 1))


_pictures = None  # a forked worker's view of the shared array read_pictures fills


def _share(pictures: np.ndarray) -> None:
    global _pictures
    _pictures = pictures


def _fill(read, first: int, paths: list[Path]) -> list:
    """A worker's chunk: each picture written into its row of the shared array; the reasons (None: read)."""
    reasons = []
    for i, path in enumerate(paths, first):
        value, why = _attempt(read, path)
        if why is None:
            _pictures[i] = value
        reasons.append(why)
    return reasons


def read_pictures(paths: list[Path], size: int, crop_pct: float,
                  threads: int | None = None) -> tuple[list[Path], np.ndarray, list[tuple[Path, str]]]:
    """(paths read, in order, an (N, 3, size, size) uint8 array of their `fixed_size_pixels`, [(unreadable path,
    reason)]). On Linux, many files go to forked processes that write straight into one array in memory they share
    with this process: no picture is pickled, sent through a pipe or stacked afterwards (all of CIFAR-10, listed
    and decoded cold: bench/README.md). Elsewhere, `read_all` and a stack."""
    read = functools.partial(fixed_size_pixels, size=size, crop_pct=crop_pct)
    processes = _decode_processes(len(paths), threads)
    if not (processes and FORKS):
        good, values, bad = read_all(paths, read, threads)
        return good, np.stack(values) if values else np.zeros((0, 3, size, size), np.uint8), bad
    import mmap

    shape = (len(paths), 3, size, size)
    # an anonymous shared mapping: forked workers write into the very pages this process reads
    pictures = np.frombuffer(mmap.mmap(-1, int(np.prod(shape))), np.uint8).reshape(shape)
    with _process_pool(processes, _share, (pictures,)) as pool:
        chunks = _chunks(paths, processes)
        reasons = [why for part in pool.map(functools.partial(_fill, read), *zip(*chunks)) for why in part]
    bad = [(p, why) for p, why in zip(paths, reasons) if why is not None]
    if bad:  # rare: the unreadable files' rows are dropped (a copy)
        keep = [why is None for why in reasons]
        paths, pictures = [p for p, kept in zip(paths, keep) if kept], pictures[np.array(keep)]
    return paths, pictures, bad


def warn_skipped(bad: list[tuple[Path, str]]) -> None:
    """One warning line on stderr listing the files that were skipped, if any."""
    if bad:
        print(f"warning: {describe_skipped(bad)}", file=sys.stderr)


def describe_skipped(bad: list[tuple[Path, str]], most: int = 10) -> str:
    shown = "; ".join(f"{p} ({reason})" for p, reason in bad[:most])
    more = f"; and {len(bad) - most} more" if len(bad) > most else ""
    return f"skipped {len(bad)} unreadable image file(s): {shown}{more}"
