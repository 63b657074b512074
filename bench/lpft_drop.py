"""Why do lp-ft's fine-tuning epochs end below the accuracy its probe epoch reached? Epoch by epoch, per variant.

    python bench/lpft_drop.py [--datasets cat_breeds,flowers] [--size 160] [--epochs 4] [--seeds 0]

`fastft train DIR --strategy lp-ft` (the train recipe) on bench/transfer.py's splits, lite0's real ImageNet weights,
with one change per row: the peak learning rate (1e-3 is lp-ft's default; the LP-FT paper fine-tunes at small
rates), the augmentation (the recipe's random resized crop against flips alone), and --ema (the moving average
of the fine-tuning steps' weights measured instead of the last step's). BatchNorm statistics are
already frozen in lp-ft. Each row prints the test accuracy after every epoch (epoch 1 is the probe): a drop from
epoch 1 to the last is what the issue reports. The test split is measured, never chosen on: this is a diagnosis, not
a setting picked for these sets.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from common import ROOT, write_results
from transfer import WEIGHTS, prepare

VARIANTS = {  # name (no commas: --variants lists them) -> the recipe's changes
    "default: lr 1e-3 crop+flip": {},
    "lr 1e-4": {"lr": 1e-4},
    "lr 3e-5": {"lr": 3e-5},
    "flip only": {"aug": "flip"},
    "lr 1e-4 flip only": {"lr": 1e-4, "aug": "flip"},
    "ema 0.999": {"ema": 0.999},  # --ema: the fine-tuning steps' moving average measured and kept
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="cat_breeds,flowers")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which rows, by their names above")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "lpft_drop.json")
    args = parser.parse_args()
    from fastft.recipe import load_recipe
    from fastft.train.pipeline import train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            data = prepare(name, Path(tmp) / "data")
            for seed in map(int, args.seeds.split(",")):
                for label in args.variants.split(","):
                    change = VARIANTS[label]
                    # the whole training split, the last epoch kept: the drop as a run without a validation split has it
                    recipe = load_recipe("train").replace(data=str(data), arch="tf_efficientnet_lite0",
                                                          weights=str(WEIGHTS), size=args.size, epochs=args.epochs,
                                                          seed=seed, strategy="lp-ft", keep="last", holdout=0.0, **change)
                    started = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()):
                        metrics = train(recipe, str(Path(tmp) / f"{name}-{len(rows)}"))
                    rows.append({"dataset": name, "variant": label, "seed": seed,
                                 "seconds": round(time.perf_counter() - started, 1),
                                 "test_acc_by_epoch": [round(e["test_acc"], 4) for e in metrics["epochs"]],
                                 "train_loss_by_epoch": [round(e["train_loss"], 4) for e in metrics["epochs"]]})
                    print(rows[-1], flush=True)
    print(f"\nlp-ft epoch by epoch (lite0, {args.size} px, {args.epochs} epochs, seeds {args.seeds}; "
          f"{time.strftime('%Y-%m-%d')}): test accuracy after each epoch (1: the probe)")
    print("| dataset | variant | seed | " + " | ".join(f"epoch {i + 1}" for i in range(args.epochs)) + " | last - probe |")
    print("|---|---|---|" + "---|" * (args.epochs + 1))
    for r in rows:
        accs = r["test_acc_by_epoch"]
        print(f"| {r['dataset']} | {r['variant']} | {r['seed']} | " + " | ".join(f"{a:.3f}" for a in accs)
              + f" | {accs[-1] - accs[0]:+.3f} |")
    write_results(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
