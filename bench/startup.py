"""Where the time of a one-photo `fastft predict` goes, in fresh processes: the whole command for the PyTorch bundle
and for the ONNX model, beside `python -c "import torch, timm"` (the reference: what any PyTorch tool on timm pays),
and the bundle's phases (imports, building the network, loading the weights, one prediction).

    python bench/startup.py [--repeats 5] [--arch resnet18] [--size 224]

Every figure is the median of --repeats runs, interleaved. The model is a randomly initialised bundle of --arch (what
is measured is start-up, not accuracy), exported to ONNX with `fastft export`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import ROOT, write_results

FASTFT = [sys.executable, "-m", "fastft"]
PHASES = """
import json, sys, time
started = time.perf_counter()
import torch, timm
from fastft.deploy.bundle import BundleModel
imported = time.perf_counter()
from fastft.deploy.network import build_network
meta = json.load(open(sys.argv[1] + "/model.json"))
network = build_network(meta["arch"], len(meta["classes"]), meta.get("head"))
built = time.perf_counter()
from safetensors.torch import load_file
network.load_state_dict(load_file(sys.argv[1] + "/model.safetensors"))
loaded = time.perf_counter()
model = BundleModel.__new__(BundleModel)
model.meta, model.classes, model.network, model._torch = meta, meta["classes"], network.eval(), torch
model.predict(sys.argv[2])
predicted = time.perf_counter()
print(json.dumps({"imports (torch, timm, fastft's bundle)": imported - started, "building the network": built - imported,
                  "loading the weights": loaded - built, "one prediction": predicted - loaded}))
"""


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    args = parser.parse_args()
    from fastft.deploy.bundle import write_bundle
    from fastft.deploy.network import build_network
    from fastft.run_folder import RunFolder

    with tempfile.TemporaryDirectory() as tmp:
        run, photo = Path(tmp) / "run", Path(tmp) / "photo.jpg"
        run.mkdir()
        write_bundle(build_network(args.arch, 2), RunFolder(run), arch=args.arch, classes=["a", "b"], size=args.size,
                     crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), head={})
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)).save(photo)
        subprocess.run([*FASTFT, "export", str(run), "--format", "onnx"], check=True, capture_output=True, cwd=ROOT)
        commands = {
            'python -c "import torch, timm" (reference)': [sys.executable, "-c", "import torch, timm"],
            "python -c pass": [sys.executable, "-c", "pass"],
            "fastft --help": [*FASTFT, "--help"],
            "fastft predict RUN photo.jpg (bundle, PyTorch)": [*FASTFT, "predict", str(run), str(photo)],
            "fastft predict RUN/model.onnx photo.jpg (ONNX Runtime)": [*FASTFT, "predict", str(run / "model.onnx"), str(photo)],
        }
        times = {name: [] for name in commands}
        phases = []
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(seconds(command))
            out = subprocess.run([sys.executable, "-c", PHASES, str(run), str(photo)], check=True, capture_output=True,
                                 text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            phases.append(json.loads(out.stdout))
    reference = statistics.median(times['python -c "import torch, timm" (reference)'])
    rows = [{"what": name, "seconds": round(statistics.median(t), 3), "x reference": round(statistics.median(t) / reference, 2),
             "each": [round(x, 3) for x in t]} for name, t in times.items()]
    rows += [{"what": f"bundle phase: {phase}", "seconds": round(statistics.median(p[phase] for p in phases), 3),
              "x reference": round(statistics.median(p[phase] for p in phases) / reference, 2),
              "each": [round(p[phase], 3) for p in phases]} for phase in phases[0]]
    print(f"start-up of a one-photo predict, median of {args.repeats} ({args.arch}, {args.size} px; "
          f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)")
    print("| what | seconds | x reference | each run |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['what']} | {row['seconds']} | {row['x reference']} | {', '.join(map(str, row['each']))} |")
    write_results(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
