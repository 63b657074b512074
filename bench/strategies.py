"""Fine-tuning strategies on real data, side by side with plain fastai, in one run.

    python bench/strategies.py                      # hotdog stand-in, tf_efficientnet_lite0, 128 px, 4 epochs
    python bench/strategies.py --seeds 1 --strategies fine-tune,scratch

The default strategy (fine-tune), scratch and the reference run --seeds seeds (3); the other
strategies --other-seeds (1), to keep the run near 40 minutes on 2 CPU cores.

Every strategy and the reference (plain fastai: ImageDataLoaders + vision_learner + fine_tune, same
total epochs, same weights) trains once per seed with the same data; the table shows the median over
seeds of d2l's figures and test accuracy as a ratio of the reference's. Writes JSON to --json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, SHARED, write_results


def plain_fastai(data: Path, arch: str, weights: Path, size: int, epochs: int, bs: int, seed: int) -> dict:
    """The reference: fastai's own defaults for a folder dataset."""
    from fastai.vision.all import ImageDataLoaders, Resize, accuracy, set_seed, vision_learner

    set_seed(seed, reproducible=True)
    dls = ImageDataLoaders.from_folder(data, train="train", valid="test", item_tfms=Resize(size), bs=bs)
    learn = vision_learner(dls, arch, metrics=accuracy, pretrained_cfg_overlay=dict(file=str(weights)))
    started = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(epochs - 1, freeze_epochs=1)
    loss, acc = learn.validate()
    return {"test_acc": float(acc), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "hotdog")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors")
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--bs", type=int, default=None, help="default: the hotdog recipe's")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--other-seeds", type=int, default=1)
    parser.add_argument("--strategies", default="fine-tune,d2l,keras,gradual,scratch")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fastft-bench-strategies"))
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "strategies.json")
    args = parser.parse_args()

    import contextlib
    import io
    import shutil

    from fastft.recipe import load_recipe
    from fastft.train.pipeline import train

    shutil.rmtree(args.out, ignore_errors=True)
    base = load_recipe("hotdog").replace(data=str(args.data), arch=args.arch, weights=str(args.weights),
                                          size=args.size, epochs=args.epochs, bs=args.bs)
    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for name in ["plain fastai", *args.strategies.split(",")]:
            if seed >= args.other_seeds and name not in ("plain fastai", "fine-tune", "scratch"):
                continue
            if name == "plain fastai":
                row = plain_fastai(args.data, args.arch, args.weights, args.size, args.epochs, base.bs, seed)
            else:
                with contextlib.redirect_stdout(io.StringIO()):  # keep the table readable
                    # scratch means random init: same recipe, without the weights file
                    weights = "" if name == "scratch" else base.weights
                    metrics = train(base.replace(strategy=name, seed=seed, weights=weights),
                                    str(args.out / f"{name}-seed{seed}"))
                row = {**metrics["final"], "seconds": sum(e["seconds"] for e in metrics["epochs"])}
            results.setdefault(name, []).append(row)
            print(f"seed {seed} {name:<13} test acc {row['test_acc']:.3f}  {row['seconds']:.0f} s", file=sys.stderr)

    reference = statistics.median(r["test_acc"] for r in results["plain fastai"])
    table = []
    for name, rows in results.items():
        accs = [r["test_acc"] for r in rows]
        table.append({"setting": name, "test_acc_median": statistics.median(accs), "test_acc_runs": accs,
                      "vs_plain_fastai": statistics.median(accs) / reference,
                      "train_acc_median": statistics.median(r.get("train_acc", float("nan")) for r in rows),
                      "examples_per_sec_median": statistics.median(r.get("examples_per_sec", float("nan")) for r in rows),
                      "seconds_median": statistics.median(r["seconds"] for r in rows)})
    print(f"\n{args.data.name}, {args.arch}, {args.size} px, {args.epochs} epochs, batch {base.bs}; "
          f"median over seeds (runs listed)")
    print(f"{'setting':<13} {'test acc':>8} {'vs fastai':>9} {'train acc':>9} {'ex/sec':>7} {'seconds':>7}  runs")
    for t in table:
        runs = " ".join(f"{a:.3f}" for a in t["test_acc_runs"])
        print(f"{t['setting']:<13} {t['test_acc_median']:>8.3f} {t['vs_plain_fastai']:>9.2f} {t['train_acc_median']:>9.3f} "
              f"{t['examples_per_sec_median']:>7.1f} {t['seconds_median']:>7.0f}  {runs}")
    write_results(args.json, vars(args), table)


if __name__ == "__main__":
    main()
