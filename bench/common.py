"""What every bench script shares: where things are, and how results are saved."""
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # real data and weights on the project's build machines


def write_results(path: Path, settings: dict, rows: list[dict]) -> None:
    """bench/results/*.json: the date, the settings as given, and the measured rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d"), "settings": {k: str(v) for k, v in settings.items()}, "results": rows}
    path.write_text(json.dumps(record, indent=2) + "\n")
