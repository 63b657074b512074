"""What share of a probe's test errors fine-tuning fixed, in every run recorded in bench/results: the figure behind
the trial's rule (fastft/train/tie.py, PLAUSIBLE_ERROR_CUT; issue 41).

    python bench/error_cut.py [--json bench/results/error_cut.json]

Every transfer.py-style record (runs with a dataset, seed, method and test accuracy) is read; within one record, each
method that fine-tunes is paired with the probe of the same set and seed (fastft's `probe`, and the bench's own
scikit-learn `linear-probe`), and its cut is (probe's errors - its errors) / probe's errors on the test split:
1 fixes them all, 0 none, below 0 adds errors. A table of the largest, and how many pairs there were.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from common import ROOT, write_results

PROBES = ("probe", "linear-probe")
NOT_FINE_TUNING = (*PROBES, "plain-fastai")  # plain fastai fine-tunes too, but with its own recipe: kept apart


def pairs(record_file: Path) -> list[dict]:
    try:
        record = json.loads(record_file.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    results = record.get("results")
    runs = results.get("runs") if isinstance(results, dict) else None
    if not isinstance(runs, list):
        return []
    accuracy = collections.defaultdict(dict)
    for run in runs:
        if isinstance(run, dict) and {"dataset", "method", "test_acc"} <= set(run):
            accuracy[(run["dataset"], run.get("seed"))][run["method"]] = run["test_acc"]
    settings = record.get("settings", {})
    found = []
    for (dataset, seed), methods in accuracy.items():
        for probe in PROBES:
            if probe not in methods or methods[probe] >= 1:
                continue
            errors = 1 - methods[probe]
            for method, acc in methods.items():
                if method in NOT_FINE_TUNING:
                    continue
                found.append({"file": record_file.name, "dataset": dataset, "seed": seed, "shots": settings.get("shots", "0"),
                              "size": settings.get("size"), "method": method, "probe": probe,
                              "probe_acc": round(methods[probe], 4), "acc": round(acc, 4),
                              "cut": round((errors - (1 - acc)) / errors, 3)})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "error_cut.json")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    found = sorted((p for f in sorted((ROOT / "bench" / "results").glob("*.json")) if f != args.json for p in pairs(f)),
                   key=lambda p: -p["cut"])
    print(f"{len(found)} (fine-tuning method, probe) pairs on the same set and seed; the {args.top} largest cuts:")
    print("| cut | set | seed | shots | size | method | probe | probe acc | acc | file |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in found[:args.top]:
        print(f"| {p['cut']:.3f} | {p['dataset']} | {p['seed']} | {p['shots']} | {p['size']} | {p['method']} | "
              f"{p['probe']} | {p['probe_acc']:.3f} | {p['acc']:.3f} | {p['file']} |")
    write_results(args.json, vars(args), {"pairs": len(found), "largest": found[0]["cut"] if found else None,
                                          "all": found})


if __name__ == "__main__":
    main()
