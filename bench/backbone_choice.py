"""Does the backbone choice pick the backbone that is best on the test split? `--arch a,b,c` on real photos.

    python bench/backbone_choice.py                      # cat_breeds, flowers, hotdog; lite0/1/2; seeds 0,1,2; 224 px

For each set (bench/transfer.py's splits) and seed: fastft's choice among tf_efficientnet_lite0, lite1 and lite2
(real ImageNet weights from ../shared/weights) by 5-fold probes on the training images alone (`backbone_choice.choose`,
exactly what `fastft train DIR --arch ...` runs), then, for every candidate, the test accuracy of the probe fitted on
all the training images (`fit_linear_head`, the `probe` strategy's head). The oracle is the candidate whose probe is
best on the test split, which no honest method can look at; regret is the oracle's test accuracy minus the chosen
one's (0 when the choice is the oracle or ties it). Features are cached, so after the first seed this is seconds.
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
    from fastft.train.out_of_fold import frozen_features, frozen_learner
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="cat_breeds,flowers,hotdog")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "backbone_choice.json")
    args = parser.parse_args()
    from fastft.data.augment import parse_aug
    from fastft.data.loaders import load_split
    from fastft.recipe import load_recipe
    from fastft.train import backbone_choice

    weights = ",".join(f"{a}={SHARED / 'weights' / f'{a}.in1k.safetensors'}" for a in ARCHS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            data = prepare(name, Path(tmp) / "data")
            for seed in map(int, args.seeds.split(",")):
                recipe = load_recipe("train").replace(data=str(data), arch=",".join(ARCHS), weights=weights,
                                                      size=args.size, seed=seed)
                split = load_split(data, recipe, parse_aug(recipe.aug), quiet=True)
                found = backbone_choice.candidates(recipe)
                started = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    chosen = backbone_choice.choose(split, recipe, found, torch.device("cpu"))
                seconds = time.perf_counter() - started
                tests = test_accuracies(split, recipe, found, seed)
                oracle = max(tests, key=tests.get)
                rows.append({"dataset": name, "seed": seed, "seconds": round(seconds, 1),
                             "cv": {s.candidate.arch: round(s.accuracy, 4) for s in chosen.scores},
                             "test": {a: round(v, 4) for a, v in tests.items()}, "chosen": chosen.chosen.arch,
                             "oracle": oracle, "regret": round(tests[oracle] - tests[chosen.chosen.arch], 4)})
                print(rows[-1], flush=True)
    short = lambda arch: arch.replace("tf_efficientnet_", "")
    print(f"\nBackbone choice by 5-fold probes on the training images ({', '.join(map(short, ARCHS))}; {args.size} px; "
          f"{time.strftime('%Y-%m-%d')}): cross-validated accuracy / test accuracy of each candidate's probe")
    print("| dataset | seed | " + " | ".join(short(a) for a in ARCHS) + " | chosen | oracle | regret | seconds |")
    print("|---|---|" + "---|" * len(ARCHS) + "---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['seed']} | " + " | ".join(f"{r['cv'][a]:.3f} / {r['test'][a]:.3f}" for a in ARCHS)
              + f" | {short(r['chosen'])} | {short(r['oracle'])} | {r['regret']:.3f} | {r['seconds']:.1f} |")
    for name in args.datasets.split(","):
        regrets = [r["regret"] for r in rows if r["dataset"] == name]
        print(f"{name}: median regret {statistics.median(regrets):.3f} ({', '.join(f'{v:.3f}' for v in regrets)})")
    write_results(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
