"""Transfer quality on real photos: fastft's default and every strategy, against plain fastai and a linear probe.

    python bench/transfer.py                                   # 3 datasets x every method x 3 seeds, 224 px, 5 epochs
    python bench/transfer.py --size 128 --epochs 3             # the 2-core CPU setting
    python bench/transfer.py --datasets flowers --methods default,plain-fastai,linear-probe --seeds 1

Datasets (each split by the bench: seeded, class-stratified, 80/20, the same split for every method and seed):
- cat_breeds: 5 cat breeds, about 200 full-size photos each (labels.csv maps images/<file> to a breed);
- flowers: 5 classes of 128 px photos, capped at 120 train / 60 test per class (a small-data problem);
- hotdog: the hotdog stand-in's own train/test split (64 px thumbnails).

Methods, all from the same ImageNet weights (../shared/weights/tf_efficientnet_lite0), at --size px for --epochs:
- default: `fastft train DIR` as shipped (recipes/train.toml), only --arch/--weights/--size/--epochs/--seed set;
- every --strategy of fastft, on the same recipe, and `auto` (the strategy chosen on held-out training images; the
  JSON records what it chose and each epoch's test accuracy);
- plain-fastai: ImageDataLoaders.from_folder + Resize + aug_transforms() + vision_learner (timm body, fastai
  head) + fine_tune(epochs - 1, freeze_epochs=1) at fastai's default lr, batch 64;
- linear-probe: logistic regression (scikit-learn, C chosen by 5-fold CV on the training images) on the
  frozen backbone's pooled features of the test transform (resize, centre crop).

Every cell is the median test accuracy over --seeds seeds; the JSON keeps every run's accuracy and wall time
(the whole method, data loading and start-up of the Learner included; Python's start-up and imports excluded).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, SHARED, write_results

WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"


def _link_split(root: Path, split: dict[str, dict[str, list[Path]]]) -> Path:
    for part, by_class in split.items():
        for label, files in by_class.items():
            folder = root / part / label
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                (folder / f.name).symlink_to(f.resolve())
    return root


def _stratified(by_class: dict[str, list[Path]], train_cap: int = 0, test_cap: int = 0) -> dict:
    """80/20 per class, seeded (0); caps applied after the split."""
    rng = random.Random(0)
    train, test = {}, {}
    for label, files in sorted(by_class.items()):
        files = sorted(files)
        rng.shuffle(files)
        n_test = round(len(files) * 0.2)
        test[label], train[label] = files[:n_test], files[n_test:]
        if train_cap:
            train[label], test[label] = train[label][:train_cap], test[label][:test_cap]
    return {"train": train, "test": test}


def prepare(name: str, work: Path) -> Path:
    """DIR/train/<class>/ and DIR/test/<class>/ of symlinks to the real photos."""
    source = SHARED / "data" / name
    if name == "hotdog":
        return source
    if name == "cat_breeds":
        by_class: dict[str, list[Path]] = {}
        with open(source / "labels.csv") as f:
            for row in csv.DictReader(f):
                by_class.setdefault(row["label"], []).append(source / "images" / row["image"])
        return _link_split(work / name, _stratified(by_class))
    by_class = {d.name: sorted(d.iterdir()) for d in sorted(source.iterdir()) if d.is_dir()}
    return _link_split(work / name, _stratified(by_class, train_cap=120, test_cap=60))


def few_shot(data: Path, shots: int, work: Path) -> Path:
    """The same set with at most `shots` training images per class (seeded), the test split as it was."""
    rng, split = random.Random(0), {"train": {}, "test": {}}
    for part in split:
        for folder in sorted(p for p in (data / part).iterdir() if p.is_dir()):
            files = sorted(f for f in folder.iterdir() if f.is_file() or f.is_symlink())
            if part == "train":
                rng.shuffle(files)
            split[part][folder.name] = files[:shots] if part == "train" else files
    return _link_split(work, split)


def run_fastft(data: Path, strategy: str | None, seed: int, args, out: Path) -> dict:
    from fastft.recipe import load_recipe
    from fastft.train.pipeline import train

    recipe = load_recipe("train").replace(data=str(data), arch=args.arch, weights=str(args.weights), size=args.size,
                                          epochs=args.epochs, seed=seed, strategy=strategy)
    if args.extra:  # key=value,... as TOML values
        import tomllib

        recipe = recipe.replace(source="--extra", **tomllib.loads("\n".join(args.extra.split(","))))
    log = io.StringIO()
    # each run meets the machine as a new user does: no features or decoded pictures cached by an earlier method
    os.environ["FASTFT_CACHE"] = str(out.parent.parent / "cache" / out.name)
    with contextlib.redirect_stdout(log):
        metrics = train(recipe, str(out))
    (out / "log.txt").write_text(log.getvalue())
    for model_file in ("model.pkl", "model.safetensors"):  # hundreds of runs: keep the figures, not the weights
        (out / model_file).unlink(missing_ok=True)
    choice = metrics.get("strategy_choice")  # --strategy auto: what it chose, and each epoch's test accuracy
    chosen_arch = load_recipe(str(out / "recipe.toml")).arch  # --arch a,b,c: the backbone the run chose
    return {"test_acc": metrics["final"]["test_acc"], "strategy": recipe.strategy,
            **({"arch": chosen_arch} if "," in args.arch else {}),
            **({"chose": choice["chosen"], "weight": choice["weight"], "held_out": choice["held_out_images"],
                "epoch_test_acc": [round(e["test_acc"], 4) for e in metrics["epochs"]],
                # the trial: its epochs on the held-out fifth, the candidates' scores, the whole command's estimates
                **({"trial": {k: choice["trial"].get(k) for k in ("epochs", "seconds", "estimate")},
                    "held_out_scores": json.loads((out / "choice.json").read_text())["scores"]}
                   if "trial" in choice else {})} if choice else {}),
            **({"test_acc_tta": metrics["final"]["test_acc_tta"]} if "test_acc_tta" in metrics["final"] else {})}


def run_plain_fastai(data: Path, seed: int, args) -> dict:
    """fastai's own defaults for a folder dataset, as a practitioner would write them."""
    from fastai.vision.all import (ImageDataLoaders, Resize, accuracy, aug_transforms, set_seed, vision_learner)

    set_seed(seed, reproducible=True)
    dls = ImageDataLoaders.from_folder(data, train="train", valid="test", item_tfms=Resize(args.size),
                                       batch_tfms=aug_transforms(), bs=64, num_workers=args.workers)
    learn = vision_learner(dls, args.arch, metrics=accuracy, pretrained_cfg_overlay=dict(file=str(args.weights)))
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(args.epochs - 1, freeze_epochs=1)
        return {"test_acc": float(learn.validate()[1])}


_FEATURES: dict = {}


def probe_features(data: Path, args):
    """Pooled features of the frozen backbone for the test transform of every train and test image (cached
    per dataset: the same for every seed)."""
    if data in _FEATURES:
        return _FEATURES[data]
    import numpy as np
    import timm
    import torch

    from fastft.data.folders import find_images
    from fastft.data.images import open_rgb, resize_center_crop

    model = timm.create_model(args.arch, pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(args.weights))).eval()
    cfg = model.pretrained_cfg
    mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    split = find_images(data, 0.2, 0)
    result = []
    for part in (split.train, split.test):
        pairs = [(p, i) for i, c in enumerate(split.classes) for p in part.get(c, [])]
        features = []
        with torch.inference_mode():
            for start in range(0, len(pairs), 64):
                pictures = [np.asarray(resize_center_crop(open_rgb(p), args.size, 0.875)) for p, _ in pairs[start:start + 64]]
                x = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255
                features.append(model((x - mean) / std).numpy())
        result.append((np.concatenate(features), np.array([i for _, i in pairs])))
    _FEATURES[data] = result
    return result


def run_linear_probe(data: Path, seed: int, args) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x_train, y_train), (x_test, y_test) = probe_features(data, args)
    probe = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
                         {"logisticregression__C": [0.01, 0.03, 0.1, 0.3, 1.0]},
                         cv=StratifiedKFold(5, shuffle=True, random_state=seed))
    probe.fit(x_train, y_train)
    return {"test_acc": float((probe.predict(x_test) == y_test).mean()),
            "C": probe.best_params_["logisticregression__C"]}


SETTINGS_THAT_MATTER = ("arch", "weights", "size", "epochs", "workers", "extra")


def earlier_runs(args) -> list[dict]:
    """The runs --json holds, when it was written with the same settings (else none)."""
    import json

    if not args.json.is_file():
        return []
    record = json.loads(args.json.read_text())
    if any(record["settings"].get(key) != str(getattr(args, key)) for key in SETTINGS_THAT_MATTER):
        print(f"--resume: {args.json} was written with other settings; starting afresh", file=sys.stderr)
        return []
    return record["results"]["runs"]


def main() -> None:
    from fastft.schedules import STRATEGIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="cat_breeds,flowers,hotdog")
    parser.add_argument("--methods", default=",".join(["default", *STRATEGIES, "auto", "plain-fastai", "linear-probe"]))
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, default=0, help="at most this many training images per class (a few-shot "
                        "set, seeded; the test split unchanged); 0: all")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for plain fastai (fastft: its recipe's)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (logs, figures) in the temporary folder")
    parser.add_argument("--extra", default="", help="recipe changes for every fastft method, e.g. 'lr=3e-4,label_smoothing=0.1'")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "transfer.json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs --json already holds from the same settings (an interrupted bench) and do the rest")
    args = parser.parse_args()

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fastft-transfer-"))
    datasets = {name: prepare(name, work / "data") for name in args.datasets.split(",")}
    if args.shots:
        datasets = {name: few_shot(data, args.shots, work / "few-shot" / name) for name, data in datasets.items()}
    methods = args.methods.split(",")
    from fastft.recipe import load_recipe

    default_strategy = load_recipe("train").strategy
    if "default" in methods and default_strategy in methods:  # the same runs twice: measure them once
        methods.remove(default_strategy)
        print(f"{default_strategy} is the default: measured once, as 'default'", file=sys.stderr)
    runs = earlier_runs(args) if args.resume else []
    for seed in range(args.seeds):
        for name, data in datasets.items():
            for method in methods:
                if any((r["dataset"], r["method"], r["seed"]) == (name, method, seed) for r in runs):
                    continue
                t0 = time.perf_counter()
                if method == "plain-fastai":
                    row = run_plain_fastai(data, seed, args)
                elif method == "linear-probe":
                    row = run_linear_probe(data, seed, args)
                else:
                    row = run_fastft(data, None if method == "default" else method, seed, args,
                                     work / "runs" / f"{name}-{method}-{seed}")
                row = {"dataset": name, "method": method, "seed": seed, "seconds": time.perf_counter() - t0, **row}
                runs.append(row)
                print(f"{name:<10} {method:<13} seed {seed}: test acc {row['test_acc']:.3f} in {row['seconds']:.0f} s",
                      file=sys.stderr, flush=True)
                write_results(args.json, {**vars(args), "partial": True}, {"runs": runs})

    table = []
    for name in datasets:
        cells = {}
        for method in methods:
            mine = [r for r in runs if r["dataset"] == name and r["method"] == method]
            cells[method] = {"median": statistics.median(r["test_acc"] for r in mine),
                             "runs": [round(r["test_acc"], 4) for r in mine],
                             "seconds_median": statistics.median(r["seconds"] for r in mine)}
        table.append({"dataset": name, **cells})
    wall = time.perf_counter() - started
    if args.resume:  # the command's own time does not cover the runs kept from before: count every run instead
        wall = sum(r["seconds"] for r in runs)
    default = next((r["strategy"] for r in runs if r["method"] == "default"), "")
    print(f"\n{args.arch}, {args.size} px, {args.epochs} epochs, median of {args.seeds} seed(s); "
          f"default = the train recipe ({default}); {'all runs' if args.resume else 'whole command'} {wall:.0f} s")
    width = max(12, *(len(m) for m in methods))
    print(f"{'dataset':<11}" + "".join(f"{m:>{width + 1}}" for m in methods))
    for row in table:
        print(f"{row['dataset']:<11}" + "".join(f"{row[m]['median']:>{width + 1}.3f}" for m in methods))
    print(f"{'seconds':<11}" + "".join(
        f"{statistics.median(row[m]['seconds_median'] for row in table):>{width + 1}.0f}" for m in methods))
    write_results(args.json, {**vars(args), "wall_seconds": round(wall)}, {"table": table, "runs": runs})
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"run folders kept in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
