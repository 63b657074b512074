"""The probe's L2 grid, before and after it went on past a best end (issue 43, item 14): penalty, test accuracy, ECE.

    python bench/probe_penalty.py                   # cat_breeds, flowers, hotdog + their 10-a-class copies; seeds 0,1,2

For each set (bench/transfer.py's splits) the frozen tf_efficientnet_lite0 features (224 px, real ImageNet weights
from ../shared/weights) of every training and test image, and of its mirror image, are computed once (fastft's
feature cache: a second run of this script reads them back). Then, per seed, the probe exactly as `--strategy probe`
fits it (`fit_linear_head`: the penalty chosen on a seeded fifth of the training images, then refitted on all), with
the grid of before (0.001-1, `LADDER` cut to `PENALTIES`) and with today's (0.001-1, then on past whichever end is
best, up to 1e-6 or 1000). The few-shot copies keep 10 training images a class (seeded); the test split is the same.
The test figures are the plain image's probabilities, as `final.test_acc` and the run's test ECE are: no temperature.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
from pathlib import Path

import torch

from common import ROOT, SHARED, median_cell, write_results
from transfer import WEIGHTS, prepare

SHOTS = 10


def features_of(data: Path, size: int, arch: str = "tf_efficientnet_lite0", weights: Path = WEIGHTS):
    """(split, train (features, mirrors, labels), test (features, mirrors, labels)) of `data`'s images, cached."""
    from fastft.data.augment import parse_aug
    from fastft.data.loaders import load_split, training_targets
    from fastft.recipe import load_recipe
    from fastft.train.model import starting_weights
    from fastft.train.features import frozen_features
    from fastft.train.out_of_fold import frozen_learner

    recipe = load_recipe("train").replace(data=str(data), arch=arch, weights=str(weights), size=size)
    split = load_split(data, recipe, parse_aug(recipe.aug), quiet=True)
    learn = frozen_learner(split, recipe, starting_weights(recipe), torch.device("cpu"))
    parts = []
    for part in ("train", "test"):
        items = [[p, key] for p, key in split.items(part)]
        parts.append((*frozen_features(learn, items, recipe), training_targets(split, [k for _, k in items])))
    return split, parts[0], parts[1]


def few_shot_rows(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices of at most `shots` images of each class, seeded."""
    generator = torch.Generator().manual_seed(seed)
    rows = [members[torch.randperm(len(members), generator=generator)[:shots]]
            for members in (torch.nonzero(labels == c).flatten() for c in labels.unique())]
    return torch.cat(rows).sort().values


def probe_figures(train, test, n_classes: int, seed: int) -> dict:
    """The probe fitted as `--strategy probe` fits it, scored on the test split."""
    from fastft.deploy.calibration import expected_calibration_error
    from fastft.train.probe import fit_linear_head

    features, mirrors, labels = train
    with contextlib.redirect_stdout(io.StringIO()):
        head = fit_linear_head(torch.cat([features, mirrors]), torch.cat([labels, labels]), n_classes, seed)
    logits = test[0] @ head["weight"].T + head["bias"]
    probs = logits.softmax(1)
    choice = head["penalty_choice"]
    temperature = out_of_fold_temperature(train, n_classes, seed)  # as a probe run without a validation split fits it
    calibrated = (logits / temperature.value).softmax(1)
    return {"penalty": choice.penalty, "at_edge": choice.at_edge, "fits": len(choice.losses),
            "test_acc": (probs.argmax(1) == test[2]).float().mean().item(),
            "ece": expected_calibration_error(probs.numpy(), test[2].numpy()),
            "nll": torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), test[2]).item(),
            "top_confidence": probs.max(1).values.mean().item(),
            "temperature": temperature.value, "fitted_temperature": temperature.fitted,
            "ece_calibrated": expected_calibration_error(calibrated.numpy(), test[2].numpy()),
            "nll_calibrated": torch.nn.functional.nll_loss(calibrated.clamp_min(1e-12).log(), test[2]).item()}


def out_of_fold_temperature(train, n_classes: int, seed: int):
    """The temperature fastft's probe run fits on its 5-fold out-of-fold logits (train/final.py, probe_out_of_fold)."""
    from fastft.deploy.calibration import choose_temperature
    from fastft.train.out_of_fold import fold_count, out_of_fold_logits, stratified_folds

    features, mirrors, labels = train
    keys = [str(v) for v in labels.tolist()]
    k, _ = fold_count(keys, False)
    logits = out_of_fold_logits(features, mirrors, labels, n_classes, stratified_folds(keys, k, seed), seed, False)
    return choose_temperature(logits.numpy(), labels.numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="cat_breeds,flowers,hotdog")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fastft-bench-data",
                        help="where the split folders of symlinks go: a fixed place, so the feature cache finds them")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "probe_penalty.json")
    args = parser.parse_args()
    from fastft.train import probe

    widened = probe.LADDER
    rows = []
    for name in args.datasets.split(","):
        data = prepare(name, args.work) if not (args.work / name).is_dir() or name == "hotdog" else args.work / name
        split, train, test = features_of(data, args.size)
        for seed in map(int, args.seeds.split(",")):
            for shots in (0, SHOTS):
                part = train if not shots else tuple(t[few_shot_rows(train[2], shots, seed)] for t in train)
                row = {"dataset": name + (f" ({shots}/class)" if shots else ""), "seed": seed, "train": len(part[2])}
                for grid, ladder in (("before", probe.PENALTIES), ("after", widened)):
                    probe.LADDER = ladder  # before: the grid stops at its ends
                    row[grid] = probe_figures(part, test, len(split.classes), seed)
                probe.LADDER = widened
                rows.append(row)
                print(row, flush=True)
    print(f"\nThe probe's L2 grid before (0.001-1) and after (widened past a best end); lite0, {args.size} px; medians "
          "over seeds (each seed's figure in brackets)")
    print("| dataset | train | penalty before | after | at the grid's end before | after | test acc before | after "
          "| ECE before | after | NLL before | after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == name]
        cells = [name, str(mine[0]["train"])]
        cells += [", ".join(f"{r[g]['penalty']:g}" for r in mine) for g in ("before", "after")]
        cells += [f"{sum(r[g]['penalty'] in (probe.PENALTIES[0], probe.PENALTIES[-1]) if g == 'before' else r[g]['at_edge'] for r in mine)}/{len(mine)}"
                  for g in ("before", "after")]
        for key in ("test_acc", "ece", "nll"):
            cells += [median_cell([r[g][key] for r in mine]) for g in ("before", "after")]
        print("| " + " | ".join(cells) + " |")
    print("\nA probe's temperature from its 5-fold out-of-fold logits (no image held out; kept only beyond 2 standard "
          "errors), on today's grid: test ECE and NLL before and after, medians over seeds (each seed's figure)")
    print("| dataset | temperature kept (fitted) | ECE before | ECE after | NLL before | NLL after |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r["after"] for r in rows if r["dataset"] == name]
        kept = ", ".join(f"{m['temperature']:.2f} ({m['fitted_temperature']:.2f})" for m in mine)
        print(f"| {name} | {kept} | {median_cell([m['ece'] for m in mine])} | "
              f"{median_cell([m['ece_calibrated'] for m in mine])} | {median_cell([m['nll'] for m in mine])} | "
              f"{median_cell([m['nll_calibrated'] for m in mine])} |")
    write_results(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
