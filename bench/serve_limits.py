"""What large uploads cost `fastft serve`: N concurrent 7999x7999 16-bit PNGs (about 140 kB each, 128 MB each
decoded) and then a normal photo, against a real server on 127.0.0.1. Reports the server's peak memory growth
(VmHWM), the wall time of the N requests, and their answers; `--baseline REV` measures an earlier checkout side by
side (a git worktree), as the reference.

    python bench/serve_limits.py [--concurrent 3] [--baseline c116a41]
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


def tiny_bundle(folder: Path) -> Path:
    """A randomly initialised resnet18 bundle: what the server runs does not matter here, only what it decodes."""
    from fastft.deploy.bundle import write_bundle
    from fastft.deploy.network import build_network
    from fastft.run_folder import RunFolder

    folder.mkdir(parents=True, exist_ok=True)
    write_bundle(build_network("resnet18", 2), RunFolder(folder), arch="resnet18", classes=["a", "b"], size=224,
                 crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), head={})
    return folder


def measure(tree: Path, model: Path, big: Path, photo: Path, concurrent: int) -> dict:
    import httpx

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

    def high_water_mib() -> float:
        status = Path(f"/proc/{server.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert post(photo) == 200
        before, started = high_water_mib(), time.perf_counter()
        with ThreadPoolExecutor(concurrent) as pool:
            answers = list(pool.map(post, [big] * concurrent))
        seconds = time.perf_counter() - started
        return {"peak_growth_mib": round(high_water_mib() - before), "seconds": round(seconds, 2),
                "answers": answers, "then_a_photo": post(photo)}
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent", type=int, default=3)
    parser.add_argument("--baseline", help="a git revision to measure side by side")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "serve_limits.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, big, photo = tiny_bundle(tmp / "model"), tmp / "big16.png", tmp / "photo.jpg"
        Image.fromarray(np.zeros((7999, 7999), np.uint16)).save(big, compress_level=1)
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
    print(f"{args.concurrent} concurrent 7999x7999 16-bit PNG uploads, then a 640x480 photo "
          f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)")
    print(f"| code | server's peak memory growth | x {reference['code']} | seconds | answers | then a photo |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ratio = row["peak_growth_mib"] / max(reference["peak_growth_mib"], 1)
        print(f"| {row['code']} | {row['peak_growth_mib']} MiB | {ratio:.2f} | {row['seconds']} | {row['answers']} | "
              f"{row['then_a_photo']} |")
    write_results(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
