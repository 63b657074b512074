"""What large uploads cost `fastft serve`: N concurrent uploads of one kind, then a normal photo, against a real
server on 127.0.0.1. Kinds: `16bit`, a 7999x7999 16-bit PNG (about 140 kB, 128 MB decoded); `palette`, an 8000x8000
palette PNG with a transparent colour (7.9 kB, 64 MB decoded, about 1 GB converted at full size); `bomb`, a PNG whose
header claims 100000x100000 pixels (a few kB). Reports the server's peak memory growth (VmHWM), what it still holds
after (VmRSS), the wall time of the N requests, and their answers; `--baseline REV` measures an earlier checkout side
by side (a git worktree), as the reference.

    python bench/serve_limits.py [--image palette] [--concurrent 4] [--baseline c0a0744]
    python bench/serve_limits.py --modes    # what to_rgb allocates per pixel, per image mode
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from common import ROOT, write_results


TINY_BUNDLE = """
import sys
from pathlib import Path
from fastft.deploy.bundle import write_bundle
from fastft.deploy.network import build_network
from fastft.run_folder import RunFolder
folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
write_bundle(build_network("resnet18", 2), RunFolder(folder), arch="resnet18", classes=["a", "b"], size=224,
             crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), head={})
"""


def tiny_bundle(folder: Path, tree: Path) -> Path:
    """A randomly initialised resnet18 bundle, written by `tree`'s own code (an older checkout may not read a newer
    model.json): what the server runs does not matter here, only what it decodes."""
    subprocess.run([sys.executable, "-c", TINY_BUNDLE, str(folder)], env={**os.environ, "PYTHONPATH": str(tree)},
                   check=True)
    return folder


def measure(tree: Path, model: Path, big: Path, photo: Path, concurrent: int) -> dict:
    import httpx

    model = tiny_bundle(model / tree.name, tree)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    server = subprocess.Popen([sys.executable, "-m", "fastft", "serve", str(model), "--port", str(port),
                               "--max-upload", "2"], env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def post(path: Path):
        return httpx.post(url + "/predict", files={"image": (path.name, path.read_bytes())}, headers={"X-Fastft": "1"},
                      timeout=300).status_code

    def status_mib(key: str) -> float:
        status = Path(f"/proc/{server.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith(key))) / 1024

    def high_water_mib() -> float:
        return status_mib("VmHWM")

    def resident_mib() -> float:
        return status_mib("VmRSS")
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert post(photo) == 200
        before, held_before, started = high_water_mib(), resident_mib(), time.perf_counter()
        with ThreadPoolExecutor(concurrent) as pool:
            answers = list(pool.map(post, [big] * concurrent))
        seconds = time.perf_counter() - started
        return {"peak_growth_mib": round(high_water_mib() - before), "held_after_mib": round(resident_mib() - held_before),
                "seconds": round(seconds, 2), "answers": answers, "then_a_photo": post(photo)}
    finally:
        server.terminate()
        server.wait()


def write_upload(kind: str, path: Path) -> None:
    if kind == "16bit":
        Image.fromarray(np.zeros((7999, 7999), np.uint16)).save(path, compress_level=1)
    elif kind == "palette":
        Image.new("P", (8000, 8000), 0).save(path, transparency=0)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import png_claiming

        path.write_bytes(png_claiming(100_000, 100_000))


MODES_PROBE = """
import sys
import numpy as np
from PIL import Image
from fastft.data.images import to_rgb
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
side, mode = 3000, sys.argv[1]
im = Image.new("P" if mode == "P+transparency" else mode, (side, side))
if mode == "P+transparency":
    im.info["transparency"] = 0
im.load()
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to what is resident now
before = status("VmRSS")
rgb = to_rgb(im)
print((status("VmHWM") - before) / side / side)
"""


def modes() -> None:
    """Per image mode: what to_rgb allocates per pixel at its peak, beside the decoded image, against the figure
    fastft/data/images.py bounds the server with."""
    from fastft.data.images import to_rgb_bytes_per_pixel

    print(f"to_rgb's peak allocation per pixel, 3000x3000 ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)")
    print("| mode | measured bytes/pixel | bound used |\n|---|---|---|")
    rows = []
    for mode in ("1", "L", "P", "P+transparency", "RGB", "RGBA", "LA", "PA", "I", "F", "CMYK", "YCbCr", "LAB", "HSV"):
        measured = float(subprocess.run([sys.executable, "-c", MODES_PROBE, mode], capture_output=True, text=True,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout)
        im = Image.new("P" if mode == "P+transparency" else mode, (1, 1))
        if mode == "P+transparency":
            im.info["transparency"] = 0
        rows.append({"mode": mode, "measured": round(measured, 2), "bound": to_rgb_bytes_per_pixel(im)})
        print(f"| {mode} | {rows[-1]['measured']} | {rows[-1]['bound']} |")
    write_results(ROOT / "bench" / "results" / "serve_modes.json", {}, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", choices=("16bit", "palette", "bomb"), default="16bit")
    parser.add_argument("--modes", action="store_true", help="measure to_rgb per image mode instead")
    parser.add_argument("--concurrent", type=int, default=3)
    parser.add_argument("--baseline", help="a git revision to measure side by side")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "serve_limits.json")
    args = parser.parse_args()
    if args.modes:
        return modes()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, big, photo = tmp / "models", tmp / f"{args.image}.png", tmp / "photo.jpg"
        write_upload(args.image, big)
        upload_bytes = big.stat().st_size
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)).save(photo)
        trees = {"this checkout": ROOT}
        if args.baseline:
            subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tmp / "baseline"), args.baseline], cwd=ROOT,
                           check=True)
            trees = {f"baseline {args.baseline}": tmp / "baseline", **trees}
        try:
            rows = [{"code": name, **measure(tree, model, big, photo, args.concurrent)} for name, tree in trees.items()]
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "baseline")], cwd=ROOT, check=True)
    reference = rows[0]
    print(f"{args.concurrent} concurrent {args.image} PNG uploads ({upload_bytes:,} bytes each), then a 640x480 "
          f"photo ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)")
    print(f"| code | server's peak memory growth | x {reference['code']} | held after | seconds | answers | then a photo |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = row["peak_growth_mib"] / max(reference["peak_growth_mib"], 1)
        print(f"| {row['code']} | {row['peak_growth_mib']} MiB | {ratio:.2f} | {row['held_after_mib']} MiB | "
              f"{row['seconds']} | {row['answers']} | {row['then_a_photo']} |")
    write_results(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
