"""What a run folder holds: every file name fastft writes there, the rule from a model path to its run folder,
and where a new output folder goes. Training (train/) writes these files and deployment (deploy/) reads them:
both name them through here, so adding an output file is one line in this module.

    recipe.toml          the resolved recipe: `fastft run` on it reproduces the run
    metrics.json         final figures and every epoch's (written after each epoch, completed at the end)
    history.csv          one row per epoch, curves.png the same figures drawn
    model.safetensors    the network's weights, and model.json what inference needs (the pickle-free bundle)
    model.pkl            fastai's export, for fastai users (loaded only when trusted)
    model.onnx           `fastft export --format onnx`
    checkpoint.pt        what a stopped run resumes from; removed when it finishes
    skipped_images.txt   files that did not decode
    lr_find.png          the LR finder's curve (--lr auto, fastft lr-find)
    tensorboard/         --log tensorboard
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fastft.errors import UsageError

# Every file and folder a run folder holds: RunFolder's attribute -> its name there.
FILES = {
    "recipe": "recipe.toml",
    "metrics": "metrics.json",
    "history": "history.csv",
    "curves": "curves.png",
    "weights": "model.safetensors",
    "meta": "model.json",
    "pickle": "model.pkl",
    "onnx": "model.onnx",
    "checkpoint": "checkpoint.pt",
    "skipped": "skipped_images.txt",
    "lr_find": "lr_find.png",
    "tensorboard": "tensorboard",
}
# the names other modules match a path against (a model file given on the command line, say)
RECIPE, WEIGHTS, META, PICKLE, ONNX, CHECKPOINT = (FILES[k] for k in ("recipe", "weights", "meta", "pickle", "onnx",
                                                                        "checkpoint"))


@dataclass(frozen=True)
class RunFolder:
    """A run's folder; `folder.metrics`, `folder.weights` ... (every key of FILES) are the paths of what it holds."""
    path: Path

    def __getattr__(self, attribute: str) -> Path:
        if attribute not in FILES:
            raise AttributeError(f"a run folder holds no '{attribute}'; it holds {', '.join(FILES)}")
        return self.path / FILES[attribute]

    def __str__(self) -> str:
        return str(self.path)

    @property
    def finished(self) -> bool:
        """The run saved its model (a bundle is the last thing a run writes)."""
        return self.meta.is_file()


def run_folder_of(model_path: str | Path) -> RunFolder:
    """The run folder a model path belongs to: the folder itself, or the folder a model file lies in."""
    model_path = Path(model_path)
    return RunFolder(model_path if model_path.is_dir() else model_path.parent)


def new_run_folder(out: str | Path | None, name: str, parent: Path = Path("runs")) -> Path:
    """Where a run (or report) goes: `out` if it is new or empty (never overwrite), else
    parent/<name>-<time>, numbered if that exists."""
    if out:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UsageError(f"--out {path} already exists and is not empty; choose a new folder (nothing was overwritten)")
        return path
    return numbered(parent / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def numbered(path: Path) -> Path:
    """`path`, or path-2, path-3 ... : the first that does not exist yet."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
