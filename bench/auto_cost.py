"""What `--strategy auto` costs against `--strategy probe` and plain fastai, before and after a change, and how close
its whole-command estimate came: a table from bench/transfer.py's JSON files (issue 41).

    # the runs: a checkout of the earlier commit, then this one, each alone on the machine
    (cd ../before && python bench/transfer.py --methods auto --shots 10 --seeds 1 --json /tmp/before.json)
    python bench/transfer.py --methods auto,probe,plain-fastai --shots 10 --seeds 1 --json /tmp/after.json
    python bench/auto_cost.py --before /tmp/before.json --after /tmp/after.json --json bench/results/auto_cost.json

A row per set and seed: test accuracy and seconds of `auto` before and after, `probe` and plain fastai (after's
run), the ratios the issue sets targets on (auto / probe where auto chose the probe, auto / plain fastai), what the
trial did (its epochs; what it chose), and the whole-command estimate: the figure said up front for what the run
then trained (the probe's end of the range or fine-tuning's) and after the trial, each as a ratio of the actual.
Then, where a set ran with several seeds, a row per set: the median over its seeds, and every seed's figure.
`--before` may be left out (no earlier commit's runs).

    python bench/transfer.py --methods auto,probe --shots 10 --seeds 3 --json /tmp/s3.json
    python bench/auto_cost.py --after /tmp/s3.json --json bench/results/auto_cost_seeds3.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, median_cell, write_results


def runs(path: Path) -> dict:
    """(dataset, seed, method) -> run, from a transfer.py JSON."""
    data = json.loads(path.read_text())
    shots = data["settings"].get("shots", "0")
    named = "{}" if shots == "0" else f"{{}} ({shots} a class)"  # a few-shot copy is a set of its own
    return {(named.format(r["dataset"]), r["seed"], r["method"]): r for r in data["results"]["runs"]}


def row(name: str, seed: int, before: dict, after: dict) -> dict:
    auto, old = after.get((name, seed, "auto")), before.get((name, seed, "auto"))
    probe, plain = after.get((name, seed, "probe")), after.get((name, seed, "plain-fastai"))
    out = {"dataset": name, "seed": seed}
    for label, run in (("auto_before", old), ("auto", auto), ("probe", probe), ("plain_fastai", plain)):
        if run:
            out[label] = {"test_acc": round(run["test_acc"], 4), "seconds": round(run["seconds"], 1)}
    if auto and probe:
        out["auto_over_probe"] = round(auto["seconds"] / probe["seconds"], 2)
    if auto and plain:
        out["auto_over_plain_fastai"] = round(auto["seconds"] / plain["seconds"], 2)
    if auto and old:
        out["after_over_before"] = round(auto["seconds"] / old["seconds"], 2)
    trial = (auto or {}).get("trial") or {}
    if trial:
        out["trial_epochs"], out["chose"] = len(trial["epochs"]), auto["chose"]
        estimate = trial.get("estimate") or {}
        if "up_front" in estimate:  # the figure said up front for the way the choice then went
            least, most = estimate["up_front"]
            said = least if auto["weight"] == 0 else most  # before the trial could end after its probe
            if by_outcome := estimate.get("up_front_by_outcome"):
                said = by_outcome["fine_tuning" if auto["weight"] > 0 else "probe_out_of_reach"
                                  if len(trial["epochs"]) == 1 else "probe_after_fine_tuning"]
            out["estimate_up_front_over_actual"] = round(said / auto["seconds"], 2)
        if "after_trial" in estimate:
            out["estimate_after_trial_over_actual"] = round(estimate["after_trial"][0] / auto["seconds"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, action="append", default=[], help="transfer.py JSON (repeatable)")
    parser.add_argument("--after", type=Path, action="append", required=True, help="transfer.py JSON (repeatable)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "auto_cost.json")
    args = parser.parse_args()
    before = {k: v for path in args.before for k, v in runs(path).items()}
    after = {k: v for path in args.after for k, v in runs(path).items()}
    keys = sorted({(name, seed) for name, seed, method in after if method == "auto"})
    rows = [row(name, seed, before, after) for name, seed in keys]

    def cell(r, key):
        return f"{r[key]['test_acc']:.3f} / {r[key]['seconds']:.0f} s" if key in r else "-"
    print("| set | seed | auto before | auto after | probe | plain fastai | after/before | auto/probe | "
          "auto/plain fastai | trial epochs | chose | estimate up front / actual | after the trial / actual |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['seed']} | {cell(r, 'auto_before')} | {cell(r, 'auto')} | {cell(r, 'probe')} | "
              f"{cell(r, 'plain_fastai')} | {r.get('after_over_before', '-')} | {r.get('auto_over_probe', '-')} | "
              f"{r.get('auto_over_plain_fastai', '-')} | {r.get('trial_epochs', '-')} | {r.get('chose', '-')} | "
              f"{r.get('estimate_up_front_over_actual', '-')} | {r.get('estimate_after_trial_over_actual', '-')} |")
    summary = [by_set(name, [r for r in rows if r["dataset"] == name]) for name in dict.fromkeys(r["dataset"] for r in rows)]
    summary = [one for one in summary if len(one["seeds"]) > 1]
    if summary:
        print("\n| set | seeds | auto: acc | probe: acc | auto: s | probe: s | auto/probe | auto/probe where auto chose "
              "the probe | estimate up front / actual | after the trial / actual | chose |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for one in summary:
            print(f"| {one['dataset']} | {len(one['seeds'])} | " + " | ".join(one["cells"]) +
                  f" | {'; '.join(one['chose'])} |")
    write_results(args.json, vars(args), {"rows": rows, "by_set": [{k: v for k, v in one.items() if k != "cells"}
                                                                   for one in summary]})


def by_set(name: str, rows: list[dict]) -> dict:
    """A set's seeds: the median of each figure and every seed's figure (common.median_cell), what each seed chose."""
    def figures(path):
        values = []
        for r in rows:
            value = r
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            values.append(value)
        return values
    probe_won = [r.get("auto_over_probe") if r.get("chose") == "the probe" else None for r in rows]
    columns = {"auto_acc": (figures(("auto", "test_acc")), 3), "probe_acc": (figures(("probe", "test_acc")), 3),
               "auto_seconds": (figures(("auto", "seconds")), 0), "probe_seconds": (figures(("probe", "seconds")), 0),
               "auto_over_probe": (figures(("auto_over_probe",)), 2), "auto_over_probe_where_it_chose_the_probe":
               (probe_won, 2), "estimate_up_front_over_actual": (figures(("estimate_up_front_over_actual",)), 2),
               "estimate_after_trial_over_actual": (figures(("estimate_after_trial_over_actual",)), 2)}
    return {"dataset": name, "seeds": [r["seed"] for r in rows], "chose": [str(r.get("chose", "-")) for r in rows],
            **{key: values for key, (values, _) in columns.items()},
            "cells": [median_cell(values, digits) for values, digits in columns.values()]}


if __name__ == "__main__":
    main()
