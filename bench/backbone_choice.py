"""Does the backbone choice pick the backbone that is best on the test split? `--arch a,b,c` on real photos.

    python bench/backbone_choice.py                      # cat_breeds, flowers, hotdog (+ 10 a class); lite0/1/2; seeds 0,1,2

For each set (bench/transfer.py's splits), its few-shot copy (10 training images a class, seeded; the same test
split) and seed: the backbone among tf_efficientnet_lite0, lite1 and lite2 (real ImageNet weights from ../shared/weights)
that each rule picks from probes on the training images alone, then the test accuracy of the probe on that backbone's
features fitted on all the training images (`fit_linear_head`, the `probe` strategy's head). The rules:
- new rule: `backbone_choice.choose`, exactly what `fastft train DIR --arch ...` runs: paired per-image differences
  beyond 2 standard errors, the stronger ImageNet model among the rest; the folds dealt 3 times under 500 images;
- today's rule (before issue 42): the best 5-fold accuracy (one dealing), within 2 images the lowest log-loss;
- prior's top: always lite2, the strongest ImageNet model of the three (no folds at all);
- oracle: the candidate whose probe is best on the test split, which no honest method can look at.
Nothing here was tuned on the test splits: the rule's 2 standard errors are the calibration guard's, and its prior is
timm's ImageNet top-1. Features are cached, so after the first seed a set takes seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, SHARED, write_results
from transfer import prepare

ARCHS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


def test_accuracies(split, recipe, found, seed: int) -> dict[str, float]:
    """Each candidate's probe, fitted on every training image, scored on the test split."""
    from fastft.data.loaders import training_targets
    from fastft.train.features import frozen_features
    from fastft.train.out_of_fold import frozen_learner
    from fastft.train.model import starting_weights
    from fastft.train.probe import fit_linear_head

    out = {}
    train = [[p, key] for p, key in split.items("train")]
    test = [[p, key] for p, key in split.items("test")]
    for c in found:
        candidate = recipe.replace(arch=c.arch, weights=c.weights)
        torch.manual_seed(seed)
        learn = frozen_learner(split, candidate, starting_weights(candidate), torch.device("cpu"))
        features, mirrors = frozen_features(learn, train, candidate)
        test_features, test_mirrors = frozen_features(learn, test, candidate)
        labels = training_targets(split, [k for _, k in train])
        with contextlib.redirect_stdout(io.StringIO()):
            head = fit_linear_head(torch.cat([features, mirrors]), torch.cat([labels, labels]), len(split.classes), seed)
        probs = ((test_features @ head["weight"].T + head["bias"]).softmax(1)
                 + (test_mirrors @ head["weight"].T + head["bias"]).softmax(1))
        out[c.arch] = (probs.argmax(1) == training_targets(split, [k for _, k in test])).float().mean().item()
    return out


def few_shot_split(split, shots: int, seed: int):
    """The same split with at most `shots` training images a class (seeded); the test split as it was."""
    import random

    rng = random.Random(seed)
    split.train = {label: rng.sample(files, min(shots, len(files))) for label, files in split.train.items()}
    split.pixels = {}  # the decoded pictures were of the whole split, in its order
    return split


def todays_rule(selection) -> str:
    """The rule before issue 42: the best fold accuracy; within TIE_IMAGES images of it, the lowest log-loss."""
    from fastft.train.tie import lowest_loss_among_the_best

    return lowest_loss_among_the_best({s.candidate.arch: (s.accuracy, s.log_loss) for s in selection.scores},
                                      selection.images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="cat_breeds,flowers,hotdog")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--shots", default="0,10", help="training images a class: 0 for all (a few-shot copy else)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fastft-bench-data",
                        help="where the split folders of symlinks go: a fixed place, so the feature cache finds them")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "backbone_choice.json")
    args = parser.parse_args()
    from fastft.data.augment import parse_aug
    from fastft.data.loaders import load_split
    from fastft.recipe import load_recipe
    from fastft.train import backbone_choice

    weights = ",".join(f"{a}={SHARED / 'weights' / f'{a}.in1k.safetensors'}" for a in ARCHS)
    rows = []
    for name in args.datasets.split(","):
        data = prepare(name, args.work) if not (args.work / name).is_dir() or name == "hotdog" else args.work / name
        for shots in map(int, args.shots.split(",")):
            for seed in map(int, args.seeds.split(",")):
                recipe = load_recipe("train").replace(data=str(data), arch=",".join(ARCHS), weights=weights,
                                                      size=args.size, seed=seed)
                split = load_split(data, recipe, parse_aug(recipe.aug), quiet=True)
                if shots:
                    split = few_shot_split(split, shots, seed)
                found = backbone_choice.candidates(recipe)
                with contextlib.redirect_stdout(io.StringIO()):
                    backbone_choice.choose(split, recipe, found, torch.device("cpu"))  # the features, cached
                    started = time.perf_counter()
                    chosen = backbone_choice.choose(split, recipe, found, torch.device("cpu"))
                    seconds = time.perf_counter() - started
                    below = backbone_choice.REPEATED_BELOW
                    backbone_choice.REPEATED_BELOW = 0  # today's rule dealt the folds once
                    once = backbone_choice.choose(split, recipe, found, torch.device("cpu"))
                    backbone_choice.REPEATED_BELOW = below
                tests = test_accuracies(split, recipe, found, seed)
                oracle = max(tests, key=tests.get)
                picks = {"new rule": chosen.chosen.arch, "today's rule": todays_rule(once),
                         "prior's top": ARCHS[-1], "oracle": oracle}
                rows.append({"dataset": name + (f" ({shots}/class)" if shots else ""), "seed": seed,
                             "train": chosen.images, "repeats": chosen.repeats, "seconds": round(seconds, 1),
                             "cv": {s.candidate.arch: round(s.accuracy, 4) for s in chosen.scores},
                             "reason": chosen.reason, "test": {a: round(v, 4) for a, v in tests.items()},
                             "picks": picks, "test_acc": {rule: tests[arch] for rule, arch in picks.items()}})
                print(rows[-1], flush=True)
    short = lambda arch: arch.replace("tf_efficientnet_", "")
    rules = ("new rule", "today's rule", "prior's top", "oracle")
    print(f"\nBackbone choice among {', '.join(map(short, ARCHS))} ({args.size} px, {time.strftime('%Y-%m-%d')}): test "
          "accuracy of the probe on the backbone each rule picks; median over seeds (each seed's pick and figure)")
    print("| dataset | train | " + " | ".join(rules) + " | new rule's reasons | new rule's seconds (features cached) |")
    print("|---|---|" + "---|" * len(rules) + "---|---|")
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        cells = [dataset, str(mine[0]["train"])]
        for rule in rules:
            accuracies = [r["test_acc"][rule] for r in mine]
            cells.append(f"{statistics.median(accuracies):.3f} ("
                         + ", ".join(f"{short(r['picks'][rule])} {r['test_acc'][rule]:.3f}" for r in mine) + ")")
        cells.append(", ".join("won" if r["reason"].startswith("won") else "tied" for r in mine))
        cells.append(", ".join(f"{r['seconds']:.1f}" for r in mine))
        print("| " + " | ".join(cells) + " |")
    write_results(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
