"""What every bench script shares: where things are, how results are saved, and how long reading a dataset takes."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # real data and weights on the project's build machines


def write_results(path: Path, settings: dict, rows: list[dict]) -> None:
    """bench/results/*.json: the date, the settings as given, and the measured rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d"), "settings": {k: str(v) for k, v in settings.items()}, "results": rows}
    path.write_text(json.dumps(record, indent=2) + "\n")


def median_cell(values, digits: int = 3) -> str:
    """A table cell: the median, then every figure it is the median of ('-' when there are none)."""
    import statistics

    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f} ({', '.join(f'{v:.{digits}f}' for v in values)})"


# fastft.data.loaders since the package was grouped into folders; fastft.data before (a --baseline checkout).
# torch is imported before the clock starts, as it is in every fastft run by the time the data is read (the
# decoders import it lazily; until 2026-11-25 the figures included that import, about 1.3 s on 2 cores).
LOAD_SECONDS = """
import sys, time
from pathlib import Path
import torch
try:
    from fastft.data.loaders import load_split
except ImportError:
    from fastft.data import load_split
from fastft.recipe import load_recipe
recipe = load_recipe("cifar").replace(data=sys.argv[1], cache=sys.argv[2] == "1")
started = time.perf_counter()
load_split(Path(sys.argv[1]), recipe, quiet=True)
print(time.perf_counter() - started)
"""


def load_seconds(data: Path, cached: bool, cache: str, tree: Path | None = None) -> float:
    """Seconds for fastft to find and check (or decode, `cached`) every image of `data` for the cifar recipe, in a
    fresh process with its decode cache in `cache`; `tree`: run that fastft checkout instead of this one."""
    env = {**os.environ, "FASTFT_CACHE": cache}
    if tree:
        env["PYTHONPATH"] = str(tree)
    out = subprocess.run([sys.executable, "-c", LOAD_SECONDS, str(data), "1" if cached else "0"], capture_output=True,
                         text=True, check=True, env=env, cwd=tree)
    return float(out.stdout.split()[-1])
