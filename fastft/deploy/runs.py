"""`fastft runs [FOLDER]`: the runs under a folder (default runs/), one row each: what it trained on and as what, its
test figures, and whether it finished (an unfinished one with the command that continues it).

It reads each run's recipe.toml and metrics.json as they are, without validating them: a run of an older fastft, or
one killed part-way, is still listed.
"""
from __future__ import annotations

import json
import tomllib
from datetime import datetime
from pathlib import Path

from fastft.errors import UsageError
from fastft.recipe import ASKED
from fastft.run_folder import RunFolder, claimant


def _read(path: Path, parse) -> dict:
    try:
        value = parse(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, tomllib.TOMLDecodeError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def describe_run(folder: RunFolder) -> dict:
    """One run's row: name, data, backbone, strategy (and what chose it), test accuracy (plain, flip TTA), whether
    calibrated, training seconds, when it started, and its state (finished, or the command that continues it)."""
    recipe, metrics = _read(folder.recipe, tomllib.loads), _read(folder.metrics, json.loads)
    asked, final = recipe.get(ASKED, {}), metrics.get("final", {})
    strategy = recipe.get("strategy", "")
    if asked.get("strategy") == "auto":
        strategy += " (auto)"
    epochs = [e for e in metrics.get("epochs", []) if isinstance(e, dict)]
    if folder.finished:
        state = "finished"
    elif claimant(folder.path) is not None:
        state = f"stopped before its recipe was written: start it again with --out {folder.path}"
    else:
        state = f"unfinished: fastft resume {folder.path}"
    return {
        "run": folder.path.name, "path": str(folder.path),
        "data": Path(recipe.get("labels") or recipe.get("data") or "").name,
        "backbone": recipe.get("arch", ""), "strategy": strategy,
        "test_acc": final.get("test_acc"), "test_acc_tta": final.get("test_acc_tta"),
        "calibrated": bool(metrics.get("calibration", {}).get("calibrated")),
        "seconds": round(sum(e.get("seconds", 0) for e in epochs), 1) if epochs else None,
        "started": datetime.fromtimestamp(folder.recipe.stat().st_mtime).strftime("%Y-%m-%d %H:%M"),
        "finished": folder.finished, "state": state,
    }


def list_runs(parent: Path) -> list[dict]:
    """Every run folder (one holding a recipe.toml) directly under `parent`, oldest first."""
    if not parent.is_dir():
        raise UsageError(f"{parent} is not a folder of runs; give the folder your runs went to (default runs/)")
    folders = [RunFolder(p) for p in parent.iterdir() if p.is_dir() and (p / "recipe.toml").is_file()]
    return sorted((describe_run(f) for f in folders), key=lambda row: (row["started"], row["run"]))


def _figure(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def as_table(rows: list[dict]) -> str:
    """Aligned columns, then each unfinished run's line."""
    header = ["run", "data", "backbone", "strategy", "test acc", "tta", "calibrated", "seconds", "started", "state"]
    body = [[r["run"], r["data"], r["backbone"], r["strategy"], _figure(r["test_acc"]), _figure(r["test_acc_tta"]),
             "yes" if r["calibrated"] else "no", "-" if r["seconds"] is None else f"{r['seconds']:.0f}", r["started"],
             "finished" if r["finished"] else "unfinished"] for r in rows]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *body]]
    lines += [f"{r['run']}: {r['state']}" for r in rows if not r["finished"]]
    return "\n".join(lines)
