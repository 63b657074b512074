"""Any valid image mode becomes 8-bit RGB; unreadable files are recognised, not crashed on."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastft.data.images import open_rgb, split_readable, unreadable_reason


def _saved(tmp_path, im, name):
    path = tmp_path / name
    im.save(path)
    return path


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)  # 0 .. 65535
    path = _saved(tmp_path, Image.fromarray(ramp), "deep.png")
    rgb = np.asarray(open_rgb(path))
    assert rgb.shape == (16, 16, 3)
    gray = rgb[..., 0].ravel()
    assert gray.min() == 0 and gray.max() == 255 and np.all(np.diff(gray.astype(int)) >= 0)
    assert len(np.unique(gray)) > 200  # fastai's convert("RGB") would leave ~1 value: all white


def test_transparency_becomes_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent black
    rgb = np.asarray(open_rgb(_saved(tmp_path, Image.fromarray(rgba, "RGBA"), "alpha.png")))
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[7, 7]) == (255, 255, 255)


@pytest.mark.parametrize("mode,name", [("L", "g.png"), ("P", "p.png"), ("CMYK", "c.jpg"), ("1", "b.png"),
                                       ("LA", "la.png"), ("I", "i.tif"), ("I;16", "i16.png"), ("RGB", "tiny.bmp")])
def test_every_mode_opens_as_rgb(tmp_path, mode, name):
    size = (1, 1) if name == "tiny.bmp" else (12, 10)
    im = Image.new("RGB", size, (90, 140, 200)).convert(mode)
    out = open_rgb(_saved(tmp_path, im, name))
    assert out.mode == "RGB" and out.size == size


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (6, 6), 0)
    im.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    im.paste(1, (0, 0, 3, 6))
    im.info["transparency"] = 0
    rgb = np.asarray(open_rgb(_saved(tmp_path, im, "pt.png")))
    assert tuple(rgb[0, 0]) == (10, 200, 10) and tuple(rgb[0, 5]) == (255, 255, 255)


def test_unreadable_files_are_told_apart(tmp_path):
    good = _saved(tmp_path, Image.new("RGB", (64, 64), "red"), "good.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert unreadable_reason(good) is None
    for bad in (truncated, empty, text):
        assert unreadable_reason(bad)
    ok, skipped = split_readable([good, truncated, empty, text])
    assert ok == [good] and [p for p, _ in skipped] == [truncated, empty, text]


def test_importing_fastft_keeps_pils_decompression_bomb_guard():
    """A program that imports fastft to predict (a web service, say) keeps PIL's guard for the images it is sent."""
    def limit(code):
        return subprocess.run([sys.executable, "-c", f"{code}; import PIL.Image; print(PIL.Image.MAX_IMAGE_PIXELS)"],
                              capture_output=True, text=True, check=True).stdout.split()[-1]
    assert limit("import fastft, fastft.cli, fastft.train.run, fastft.deploy.serve") == limit("pass") != "None"


def test_training_reads_photos_over_the_guard_and_puts_it_back(tmp_path, monkeypatch):
    from PIL import Image

    from conftest import TINY, invoke, make_split_dataset

    data = make_split_dataset(tmp_path / "data")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # every 40x32 picture is now over twice PIL's limit
    result = invoke("cifar", "--data", data, *TINY, "--epochs", "1", "--out", tmp_path / "run")
    assert result.exit_code == 0 and "warning" not in result.output.lower(), result.output
    assert "16 train / 8 test" in result.stdout
    assert Image.MAX_IMAGE_PIXELS == 500  # the guard is back once the run is over


KILLED_WHILE_DECODING = """
import sys, time
from pathlib import Path
import fastft.data.images as images

real = images.fixed_size_pixels
def slow(path, size, crop_pct):  # a slow disk: the run is killed while its workers are busy
    time.sleep(0.05)
    return real(path, size, crop_pct)
images.fixed_size_pixels = slow
images.read_pictures(sorted(Path(sys.argv[1]).glob("*.png")), 16, 1.0)
"""


def _children(pid: int) -> list[int]:
    found = []
    for stat in __import__("pathlib").Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux") or (__import__("os").cpu_count() or 1) < 2,
                    reason="decode processes are forked on Linux with 2 cores or more")
def test_decode_workers_die_when_their_run_is_killed(tmp_path):
    import os
    import signal
    import time

    from fastft.atomic import process_alive
    from fastft.data.images import PROCESSES_FROM

    one = tmp_path / "one.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(one)
    (tmp_path / "many").mkdir()
    for i in range(PROCESSES_FROM):  # enough files for a process pool
        (tmp_path / "many" / f"{i:05d}.png").symlink_to(one)
    run = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_DECODING, str(tmp_path / "many")])
    workers = []
    for _ in range(600):
        workers = [pid for pid in _children(run.pid) if process_alive(pid)]
        if workers or run.poll() is not None:
            break
        time.sleep(0.1)
    assert workers, "the decode never started its workers"
    run.send_signal(signal.SIGKILL)
    run.wait()
    for _ in range(300):
        if not any(process_alive(pid) for pid in workers):
            break
        time.sleep(0.1)
    alive = [pid for pid in workers if process_alive(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)  # leave no orphan behind even when the test fails
    assert not alive, f"decode workers {alive} outlived their killed run"


def test_a_killed_runs_half_written_cache_entry_is_removed_by_the_next_run(tmp_path, monkeypatch):
    import os

    from fastft.data import cache

    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    abandoned = tmp_path / "cache" / ".0123abc.999999999.partial.npy"  # its writer was killed -9
    in_progress = tmp_path / "cache" / f".4567def.{os.getpid()}.partial.npy"  # another live run is writing it
    abandoned.write_bytes(b"half")
    in_progress.write_bytes(b"half")
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    good, pixels, bad = cache.decode([image], 8, 1.0)
    cache.finish_writes()
    assert good == [image] and tuple(pixels.shape) == (1, 3, 8, 8) and not bad
    assert not abandoned.exists() and in_progress.exists()
