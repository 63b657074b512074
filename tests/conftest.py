"""Synthetic image folders in the real on-disk layouts, and one shared tiny training run."""
from __future__ import annotations

import atexit
import builtins
import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Tests never reach the internet: a hub lookup must fail at once, not after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Decoded-image caches go to a throwaway folder, not the user's ~/.cache/fastft.
os.environ["FASTFT_CACHE"] = tempfile.mkdtemp(prefix="fastft-test-cache-")
atexit.register(shutil.rmtree, os.environ["FASTFT_CACHE"], ignore_errors=True)

COLOURS = {"blue": (30, 60, 200), "red": (200, 40, 30), "green": (40, 180, 60)}


def write_image(path: Path, colour, size=(40, 32), seed=0, fmt=None) -> Path:
    """A noisy image of one dominant colour: easy to learn, different pixel by pixel."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few kB whose header claims width x height 8-bit grey pixels, followed by far too little data: a
    decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1_000_000), 9))
            + chunk(b"IEND", b""))


def make_class_folders(root: Path, classes=("blue", "red"), per_class=8, seed=0) -> Path:
    """root/<class>/*.png|jpg, odd sizes, PNG and JPEG mixed."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            ext = "png" if i % 2 else "jpg"
            size = (32 + 4 * (i % 3), 28 + 6 * (i % 4))
            write_image(root / name / f"{name}_{i}.{ext}", COLOURS[name], size, seed=seed * 1000 + c * 100 + i)
    return root


def make_split_dataset(root: Path, classes=("blue", "red"), per_class=8) -> Path:
    make_class_folders(root / "train", classes, per_class, seed=1)
    make_class_folders(root / "test", classes, per_class // 2, seed=2)
    return root


def make_unlearnable_split(root: Path, classes=("blue", "red", "green"), per_class=20) -> Path:
    """root/{train,test}/<class>/*.png whose class folders each hold every colour in turn: nothing in the pixels tells
    the classes apart, so no probe beats chance on held-out images and a strategy trial has fine-tuning to try (with
    enough held out that a probe at chance misses 6 or more: fastft/train/tie.py's `probe_out_of_reach`)."""
    colours = list(COLOURS.values())
    for part, count, seed in (("train", per_class, 1), ("test", per_class // 2, 2)):
        for c, name in enumerate(classes):
            for i in range(count):
                write_image(root / part / name / f"{name}_{i}.png", colours[(i + c) % len(colours)],
                            seed=seed * 1000 + c * 100 + i)
    return root


# The arguments that make any recipe command fast on synthetic data, on the CPU even where a GPU is.
TINY = ["--arch", "resnet18", "--no-pretrained", "--size", "32", "--bs", "4", "--workers", "0", "--device", "cpu"]


def fastft(*args, env=None, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed `fastft` command for real."""
    exe = Path(sys.executable).with_name("fastft")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kwargs)


@contextlib.contextmanager
def files_opened():
    """Every path `open` is called with inside the block: a spy on builtins.open, which PIL and fastai read through
    (a test that a step never reads the test split's images)."""
    opened, real_open = [], builtins.open

    def recording_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)
    builtins.open = recording_open
    try:
        yield opened
    finally:
        builtins.open = real_open


def invoke(*args):
    """Run the CLI in this process (one fastai import for the whole session)."""
    from typer.testing import CliRunner

    from fastft.cli import app

    return CliRunner().invoke(app, list(map(str, args)))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return make_split_dataset(tmp_path_factory.mktemp("data") / "colours")


@pytest.fixture(scope="session")
def trained_run(dataset, tmp_path_factory):
    """One real 2-epoch training of the cifar recipe on synthetic data: (run folder, CLI result)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = invoke("cifar", "--data", dataset, *TINY, "--epochs", "2", "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and counts GET requests per path. Paths under /cut/ announce the whole file's
    length but send only half of it, as a dropped connection does."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.server.requests[self.path] = self.server.requests.get(self.path, 0) + 1
        if not self.path.startswith("/cut/"):
            return super().do_GET()
        body = (Path(self.directory) / self.path[len("/cut/"):]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])


@pytest.fixture
def file_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/served: (base URL, folder, {path: GET count})."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(CountingHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.requests = {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, httpd.requests
    httpd.shutdown()
    httpd.server_close()


PLAIN_TIMM = """
import sys
sys.modules["fastft"] = None  # plain timm, no fastft
import json, numpy, timm, torch
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
with torch.no_grad():
    print(json.dumps(model(torch.from_numpy(numpy.load(sys.argv[2]))).softmax(1).tolist()))
"""


PLAIN_TIMM_FILES = """
import sys
sys.modules["fastft"] = None  # plain timm, no fastft
import json, timm, torch
from PIL import Image
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model, use_test_size=True))
with torch.no_grad():
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in sys.argv[2:]])
    print(json.dumps(model(batch).softmax(1).tolist()))
"""


def plain_timm_probabilities_of_files(hub: Path, files) -> list:
    """What plain timm gives for image files from a hub export, preprocessing them its own way (resolve_data_config
    + create_transform), in a process without fastft."""
    import json

    shown = subprocess.run([sys.executable, "-c", PLAIN_TIMM_FILES, str(hub), *map(str, files)], capture_output=True,
                           text=True)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def plain_timm_probabilities(hub: Path, batch, tmp_path: Path):
    """What plain timm, in a process without fastft, gives for `batch` from a hub export: its softmax."""
    import json

    import numpy as np

    np.save(tmp_path / "batch.npy", batch)
    shown = subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(hub), str(tmp_path / "batch.npy")],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def noisy_classes(root: Path, per_class: int = 24) -> Path:
    """Two classes of noise whose means differ a little: a model is right often, not always, and unsure."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, mean in (("darker", 118), ("lighter", 138)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.clip(rng.normal(mean, 50, (32, 32, 3)), 0, 255).astype(np.uint8)).save(root / label / f"{i}.png")
    return root


SELECTION_ARCHS = ("resnet18", "mobilenetv3_small_050")  # two tiny backbones to choose between


@pytest.fixture(scope="session")
def weights_folder(tmp_path_factory) -> Path:
    """ARCH.rand.safetensors for each of SELECTION_ARCHS: what a folder of downloaded weights looks like."""
    import timm
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    for arch in SELECTION_ARCHS:
        torch.manual_seed(0)
        state = timm.create_model(arch, pretrained=False).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"{arch}.rand.safetensors"))
    return folder


class TenSecondClock:
    """A clock that advances 10 s every time it is read: budgets tested without waiting or timing anything."""
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 10.0
        return self.now
