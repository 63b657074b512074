"""Inference speed: the pickle-free bundle in PyTorch vs ONNX Runtime vs fastai's load_learner + predict.

    python bench/inference.py        # trains a small hotdog model (tf_efficientnet_lite0, 128 px) first

Single-image latency: one image path to label and probabilities (decode, resize, forward), median of
--calls calls. Batch throughput: --images images through each runtime's batched path (bundle and ONNX:
predict_batch; fastai: test_dl + get_preds), images/s. Each figure is the median of --repeats interleaved
repeats (bundle, ONNX, fastai, bundle, ...). Writes JSON to --json.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, SHARED, write_results


def median_seconds(function, calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "hotdog")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "inference.json")
    args = parser.parse_args()

    import warnings

    import torch
    from fastai.learner import load_learner

    import fastft
    from fastft.deploy.export import export_onnx
    from fastft.recipe import load_recipe
    from fastft.train.pipeline import train

    run = Path(tempfile.mkdtemp()) / "run"
    recipe = load_recipe("hotdog").replace(data=str(args.data), arch="tf_efficientnet_lite0", weights=str(args.weights),
                                           size=args.size, epochs=1, limit=200, workers=0)
    with contextlib.redirect_stdout(io.StringIO()):
        train(recipe, str(run))
    export_onnx(run)
    images = sorted((args.data / "test").rglob("*.jpg"))[: args.images]
    bundle, onnx = fastft.load(run), fastft.load(run / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn = load_learner(run / "model.pkl", cpu=True)

    def fastai_batch():
        with learn.no_bar():
            learn.get_preds(dl=learn.dls.test_dl(images, bs=args.bs, num_workers=0))

    def fastai_single():
        with learn.no_bar():
            learn.predict(images[0])

    runtimes = {
        "bundle (PyTorch)": (lambda: bundle.predict(images[0]), lambda: list(bundle.predict_batch(images, bs=args.bs))),
        "ONNX Runtime": (lambda: onnx.predict(images[0]), lambda: list(onnx.predict_batch(images, bs=args.bs))),
        "fastai load_learner": (fastai_single, fastai_batch),
    }
    latency = {name: [] for name in runtimes}
    throughput = {name: [] for name in runtimes}
    for name, (single, batch) in runtimes.items():  # warm-up
        single(), batch()
    for _ in range(args.repeats):
        for name, (single, batch) in runtimes.items():
            latency[name].append(median_seconds(single, args.calls) * 1000)
            throughput[name].append(len(images) / median_seconds(batch, 1))

    reference = "fastai load_learner"
    rows = [{"runtime": name, "latency_ms": statistics.median(latency[name]),
             "images_per_s": statistics.median(throughput[name])} for name in runtimes]
    for row in rows:
        row["latency_vs_fastai"] = row["latency_ms"] / statistics.median(latency[reference])
        row["throughput_vs_fastai"] = row["images_per_s"] / statistics.median(throughput[reference])
    print(f"\ntf_efficientnet_lite0 at {args.size} px, CPU ({torch.get_num_threads()} threads); median of "
          f"{args.repeats} interleaved repeats")
    print(f"{'runtime':<20} {'1-image ms':>10} {'vs fastai':>9} {'batch img/s':>11} {'vs fastai':>9}")
    for r in rows:
        print(f"{r['runtime']:<20} {r['latency_ms']:>10.1f} {r['latency_vs_fastai']:>9.2f} "
              f"{r['images_per_s']:>11.1f} {r['throughput_vs_fastai']:>9.2f}")
    write_results(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
