"""Calibration on real photos: the test split's expected calibration error (15 bins), NLL and Brier score of the
default recipe's model before and after its temperature, and its accuracy, per dataset and seed.

    python bench/calibration.py [--size 224] [--epochs 5] [--seeds 0,1,2] [--datasets cat_breeds,flowers,hotdog]

`fastft train DIR --holdout auto` (the `train` recipe otherwise) on bench/transfer.py's splits of the shared sets,
with tf_efficientnet_lite0's real ImageNet weights: the validation split the temperature is fitted on is a tenth of
the training images, and the test split is only measured. The temperature is kept only where it lowered the
validation NLL by more than its noise; "fitted T" columns show what the fitted one, kept or not, does on the test
split. `--holdout 0.2` measures with a larger validation split. Prints medians with every seed's figure.
"""
import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from common import ROOT, median_cell, write_results
from transfer import WEIGHTS, prepare


def one_run(data: Path, seed: int, args, out: Path) -> dict:
    from fastft.recipe import load_recipe
    from fastft.train.pipeline import train

    recipe = load_recipe("train").replace(data=str(data), arch="tf_efficientnet_lite0", weights=str(WEIGHTS),
                                          size=args.size, epochs=args.epochs, seed=seed,
                                          holdout=args.holdout)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = train(recipe, str(out))
    calibration = metrics["calibration"]
    test = calibration.get("test", {})
    test["fitted"] = test.get("if_fitted", test.get("after"))  # what the fitted temperature does, kept or not
    return {"seed": seed, "seconds": round(time.perf_counter() - started, 1), "test_acc": metrics["final"]["test_acc"],
            "calibrated": calibration["calibrated"], "temperature": calibration.get("temperature"),
            "fitted_temperature": calibration.get("fitted_temperature"), "fitted_on": calibration.get("fitted_on"),
            "validation_nll_saved": calibration.get("validation_nll_saved"),
            "validation_nll_noise": calibration.get("validation_nll_noise"),
            **{f"{k}_{when}": test[when][k] for when in ("before", "after", "fitted") for k in ("ece", "nll", "brier")
               if calibration["calibrated"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--datasets", default="cat_breeds,flowers,hotdog")
    parser.add_argument("--holdout", default="auto", help="the share held out to fit the temperature on (0: the train recipe's default, "
                        "uncalibrated: accuracy only)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "calibration.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            data = prepare(name, Path(tmp) / "data")
            for seed in map(int, args.seeds.split(",")):
                rows.append({"dataset": name, **one_run(data, seed, args, Path(tmp) / f"{name}-{seed}")})
                print(rows[-1], flush=True)
    print(f"\nCalibration of `fastft train DIR --holdout {args.holdout}` (lite0, {args.size} px, {args.epochs} epochs, "
          f"seeds {args.seeds}; {time.strftime('%Y-%m-%d')}): median, then each seed")
    print("| dataset | test acc | fitted T | kept T | ECE before | ECE after | ECE, fitted T | NLL before | NLL after | "
          "NLL, fitted T | Brier before | Brier after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        runs = [r for r in rows if r["dataset"] == name and r["calibrated"]]
        if not runs:
            print(f"| {name} | not calibrated | | | | | | | | | | |")
            continue

        def cell(key, digits=3):
            return median_cell([r[key] for r in runs], digits)
        print(f"| {name} | {cell('test_acc')} | {cell('fitted_temperature', 2)} | {cell('temperature', 2)} | "
              f"{cell('ece_before')} | {cell('ece_after')} | {cell('ece_fitted')} | {cell('nll_before')} | "
              f"{cell('nll_after')} | {cell('nll_fitted')} | {cell('brier_before')} | {cell('brier_after')} |")
    write_results(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
