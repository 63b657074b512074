"""The label check on real photos with labels flipped on purpose: precision and recall of `--labels-check` at its
default threshold, and what training without the suspects gains.

    python bench/label_noise.py                                   # 5% and 10% noise, 3 seeds, 3 sets, 224 px
    python bench/label_noise.py --train --train-noise 0.1         # also: train on clean / noisy / noisy without suspects

Sets: bench/transfer.py's splits of cat_breeds, flowers and the hotdog stand-in. For each noise level and seed, a
seeded random share of the training images gets another class, drawn uniformly (the test split keeps its labels),
written as a labels CSV over the same files, so the frozen features are computed once per set and read back from
fastft's cache after that. The check is `fastft inspect DATA --labels-check` as shipped (the train recipe, 5 folds,
cleanlab's default threshold) on tf_efficientnet_lite0's real ImageNet weights.

- precision: the share of the flagged images whose label was flipped; recall: the share of flipped images flagged.
  At 0% noise every flagged image counts against precision (it may still be a real label error of the set).
  Precision of the top N: of the N most suspect images (N = how many were flipped), the share that were flipped.
- --train: test accuracy of `fastft train` (the train recipe, --size/--epochs) on the clean labels, on the noisy
  labels, and on the noisy labels with --exclude-suspects (N: as many as the check flags), seed by seed.
Medians over the seeds, with every seed's figure.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import random
import tempfile
import time
from pathlib import Path

from common import ROOT, median_cell, write_results
from transfer import WEIGHTS, prepare


def images_of(data: Path) -> list[tuple[Path, str, str]]:
    """(file, label, split) of every image of a train/<class>/, test/<class>/ tree."""
    return [(f, label.name, part) for part in ("train", "test") for label in sorted((data / part).iterdir())
            for f in sorted(label.iterdir())]


def noisy_labels(images, share: float, seed: int) -> tuple[list[tuple[Path, str, str]], set[Path]]:
    """`images` with `share` of the training images given another class at random; and the flipped files."""
    rng = random.Random(seed)
    classes = sorted({label for _, label, _ in images})
    train = [i for i, (_, _, part) in enumerate(images) if part == "train"]
    flipped = set(rng.sample(train, round(share * len(train))))
    out = [(f, rng.choice([c for c in classes if c != label]) if i in flipped else label, part)
           for i, (f, label, part) in enumerate(images)]
    return out, {images[i][0] for i in flipped}


def write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "split"])
        writer.writerows([str(file), label, part] for file, label, part in rows)
    return path


def recipe_for(table: Path, seed: int, args, **changes):
    from fastft.recipe import load_recipe

    return load_recipe("train").replace(data=str(table.parent), labels=str(table), arch="tf_efficientnet_lite0",
                                        weights=str(WEIGHTS), size=args.size, seed=seed, **changes)


def check(table: Path, seed: int, flipped: set[Path], args) -> dict:
    from fastft.train.label_issues import check_folder

    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = check_folder(recipe_for(table, seed, args))
    flagged = {s.file for s in result.suspects}
    hits = len(flagged & flipped)
    top = {s.file for s in result.suspects[:len(flipped)]}  # the ranking: as many as were flipped, most suspect first
    return {"flagged": len(flagged), "flipped": len(flipped), "hits": hits,
            "precision_at_flipped": len(top & flipped) / len(flipped) if flipped else None,
            "precision": hits / len(flagged) if flagged else (1.0 if not flipped else 0.0),
            "recall": hits / len(flipped) if flipped else None, "folds": result.folds,
            "seconds": round(time.perf_counter() - started, 1)}


def train_accuracy(table: Path, seed: int, args, out: Path, exclude: int = 0) -> float:
    from fastft.train.pipeline import train

    with contextlib.redirect_stdout(io.StringIO()):
        metrics = train(recipe_for(table, seed, args, epochs=args.epochs, exclude_suspects=exclude), str(out))
    return metrics["final"]["test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="cat_breeds,flowers,hotdog")
    parser.add_argument("--noise", default="0,0.05,0.1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--train", action="store_true", help="also train on clean, noisy, and noisy without suspects")
    parser.add_argument("--train-noise", type=float, default=0.1)
    parser.add_argument("--train-seeds", default="0", help="the seeds --train trains at (3 runs each)")
    parser.add_argument("--train-exclude", default="flagged",
                        help="the N values of --exclude-suspects N, comma-separated: numbers, or flagged (as many as the "
                             "check flags)")
    parser.add_argument("--train-datasets", default="", help="the sets --train trains on (default: all of --datasets)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "label_noise.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            images = images_of(prepare(name, Path(tmp) / "data"))
            folder = Path(tmp) / f"{name}-labels"
            folder.mkdir()
            for seed in map(int, args.seeds.split(",")):
                for share in map(float, args.noise.split(",")):
                    noisy, flipped = noisy_labels(images, share, seed)
                    table = write_csv(folder / f"noise{share}-seed{seed}.csv", noisy)
                    rows.append({"dataset": name, "noise": share, "seed": seed, **check(table, seed, flipped, args)})
                    print(rows[-1], flush=True)
                trains_here = name in (args.train_datasets or args.datasets).split(",")
                if args.train and trains_here and seed in map(int, args.train_seeds.split(",")):
                    noisy, flipped = noisy_labels(images, args.train_noise, seed)
                    table = write_csv(folder / f"train-seed{seed}.csv", noisy)
                    flagged = check(table, seed, flipped, args)["flagged"]
                    clean = write_csv(folder / f"clean-seed{seed}.csv", images)
                    runs = Path(tmp) / "runs" / f"{name}-{seed}"
                    clean_acc = train_accuracy(clean, seed, args, runs / "clean")
                    noisy_acc = train_accuracy(table, seed, args, runs / "noisy")
                    for n in args.train_exclude.split(","):
                        n = flagged if n == "flagged" else int(n)
                        rows.append({"dataset": name, "noise": args.train_noise, "seed": seed, "training": True,
                                     "excluded": n, "flagged": flagged, "clean": clean_acc, "noisy": noisy_acc,
                                     "without_suspects": train_accuracy(table, seed, args, runs / f"excluded{n}", n)})
                        print(rows[-1], flush=True)
    print(f"\nThe label check (`fastft inspect --labels-check`, lite0, {args.size} px, default threshold; seeds "
          f"{args.seeds}; {time.strftime('%Y-%m-%d')}): median, then each seed")
    print("| dataset | noise | flipped | flagged | precision | recall | precision of the top N=flipped | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        for share in map(float, args.noise.split(",")):
            runs = [r for r in rows if r["dataset"] == name and r["noise"] == share and "training" not in r]
            print(f"| {name} | {share:.0%} | {median_cell([r['flipped'] for r in runs], 0)} | {median_cell([r['flagged'] for r in runs], 0)} "
                  f"| {median_cell([r['precision'] for r in runs])} | {median_cell([r['recall'] for r in runs])} "
                  f"| {median_cell([r['precision_at_flipped'] for r in runs])} "
                  f"| {median_cell([r['seconds'] for r in runs], 1)} |")
    if args.train:
        print(f"\nTest accuracy of `fastft train` ({args.epochs} epochs) with {args.train_noise:.0%} of the training labels "
              "flipped: median, then each seed")
        print("| dataset | N (--exclude-suspects) | flagged | clean labels | noisy labels | noisy, without the N |")
        print("|---|---|---|---|---|---|")
        for name in (args.train_datasets or args.datasets).split(","):
            for n in sorted({r["excluded"] for r in rows if r["dataset"] == name and r.get("training")}):
                runs = [r for r in rows if r["dataset"] == name and r.get("training") and r["excluded"] == n]
                print(f"| {name} | {n} | {median_cell([r['flagged'] for r in runs], 0)} | "
                      f"{median_cell([r['clean'] for r in runs])} | {median_cell([r['noisy'] for r in runs])} | "
                      f"{median_cell([r['without_suspects'] for r in runs])} |")
    write_results(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
