"""What a run folder holds: every file name fastft writes there, with what it holds (`FILES`), the rule from a model
path to its run folder, and where a new output folder goes. Training (train/) writes these files and deployment
(deploy/) reads them: both name them through here, so adding an output file is one entry in FILES (and a row in the
README's table, which a test holds to FILES).
"""
from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fastft.atomic import process_alive, remove_partial_files
from fastft.errors import UsageError

@dataclass(frozen=True)
class RunFile:
    """One file (or folder) of a run folder: its name there, and what it holds and which runs write it."""
    name: str
    what: str


# Every file and folder a run folder holds: RunFolder's attribute -> the file.
FILES = {
    "recipe": RunFile("recipe.toml", "the resolved recipe: `fastft run` on it reproduces the run (same --seed, same "
                                     "numbers on the same machine)"),
    "metrics": RunFile("metrics.json", "final figures and every epoch's (written after each epoch, completed at the end)"),
    "history": RunFile("history.csv", "one row per epoch: the same figures as metrics.json's epochs"),
    "curves": RunFile("curves.png", "loss and accuracy per epoch, the kept epoch marked (runs of two epochs or more: "
                                    "one epoch, a probe's one pass, would be a single dot)"),
    "weights": RunFile("model.safetensors", "the network's weights: with model.json, the pickle-free bundle"),
    "meta": RunFile("model.json", "what inference needs besides the weights: arch, classes, input size, resize and "
                                  "crop, normalisation, temperature, versions"),
    "pickle": RunFile("model.pkl", "fastai's Learner.export, for fastai users (loaded only when trusted)"),
    "onnx": RunFile("model.onnx", "`fastft export --format onnx`: probabilities out, dynamic batch"),
    "checkpoint": RunFile("checkpoint.pt", "while the run is unfinished: what `fastft resume` continues from (removed "
                                           "when it finishes)"),
    "skipped": RunFile("skipped_images.txt", "files that did not decode, each with the reason"),
    "test_files": RunFile("test_files.txt", "the test images the run's test figures were measured on (after --limit), "
                                            "one per line with its label(s), tab-separated: `fastft evaluate RUN` "
                                            "scores these"),
    "lr_find": RunFile("lr_find.png", "the LR finder's curve and its suggestion (--lr auto, `fastft lr-find`)"),
    "reliability": RunFile("reliability.png", "a calibrated run: confidence against accuracy on the test split, before "
                                              "and after calibration"),
    "label_issues": RunFile("label_issues.csv", "--exclude-suspects or a backbone chosen: the training images whose "
                                                "labels look wrong, most suspect first"),
    "suspects": RunFile("label_issues.png", "the most suspect of those, as a contact sheet"),
    "selection": RunFile("selection.csv", "a backbone chosen (--arch a,b,c / auto): every candidate's cross-validated "
                                          "score and its standard error, its ImageNet prior and rank, the one chosen, "
                                          "and why"),
    "selection_chart": RunFile("selection.png", "the same scores drawn"),
    "strategy": RunFile("strategy.csv", "--strategy auto: the probe, lp-ft and WiSE-FT's mixes scored on held-out "
                                        "images, and the one chosen"),
    "strategy_chart": RunFile("strategy.png", "the same scores drawn"),
    "choice": RunFile("choice.json", "--strategy auto: what the command asked, and what was chosen on which figures, "
                                     "written when the run starts (`fastft resume` reports the same choice)"),
    "tensorboard": RunFile("tensorboard", "--log tensorboard: TensorBoard event files (a folder)"),
}
# the names other modules match a path against (a model file given on the command line, say)
RECIPE, WEIGHTS, META, PICKLE, ONNX, CHECKPOINT = (FILES[k].name for k in ("recipe", "weights", "meta", "pickle", "onnx",
                                                                        "checkpoint"))


@dataclass(frozen=True)
class RunFolder:
    """A run's folder; `folder.metrics`, `folder.weights` ... (every key of FILES) are the paths of what it holds."""
    path: Path

    def __getattr__(self, attribute: str) -> Path:
        if attribute not in FILES:
            raise AttributeError(f"a run folder holds no '{attribute}'; it holds {', '.join(FILES)}")
        return self.path / FILES[attribute].name

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


# A new run claims its folder by creating its recipe.toml exclusively, with this line (the run replaces it with the
# resolved recipe once its data is loaded): of two commands given the same folder, or named in the same second,
# exactly one gets it. A claim whose process is gone (killed before its recipe was written) can be taken over.
CLAIM = "# claimed by a fastft run that has not written its recipe yet; process "


def claimant(folder: Path) -> int | None:
    """The process id of a run that claimed `folder` and has not written its recipe yet, else None."""
    try:
        text = (Path(folder) / RECIPE).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text[len(CLAIM):].strip()) if text.startswith(CLAIM) and text[len(CLAIM):].strip().isdigit() else None


def _claim(folder: Path) -> bool:
    try:
        fd = os.open(folder / RECIPE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{CLAIM}{os.getpid()}\n")
    return True


def abandoned_claim(folder: Path) -> bool:
    """Whether `folder` was claimed by a run whose process is gone before it wrote its recipe: whatever it holds,
    that run wrote into a folder that was new or empty, and a new run may take it over."""
    pid = claimant(folder)
    return pid is not None and not process_alive(pid)


def check_new_out(out: str | Path | None) -> None:
    """An error now, before any work, when a run's `--out` is taken (its claim comes last)."""
    path = Path(out) if out else None
    if path and path.exists() and (not path.is_dir() or any(p.name != RECIPE for p in path.iterdir())) \
            and not abandoned_claim(path):
        raise UsageError(f"--out {path} already exists and is not empty; choose a new folder (nothing was overwritten)")


def clear_abandoned_claim(folder: Path) -> None:
    """Remove what an abandoned claim's run wrote before it was killed (its own files only: the tables and lists a
    run writes before its recipe, their half-written copies) and the claim itself."""
    remove_partial_files(folder)
    for run_file in FILES.values():
        if run_file.name != RECIPE and (folder / run_file.name).is_file():
            (folder / run_file.name).unlink()
    (folder / RECIPE).unlink(missing_ok=True)


def release_claim(folder: Path, created: bool) -> None:
    """Undo this process's claim_run_folder when its run failed before writing anything of its own: the claim, and
    the folder when the claim made it. A run that wrote its recipe (or another process's claim) is left as it is."""
    if claimant(folder) == os.getpid():
        (folder / RECIPE).unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):  # not empty after all: leave it
                folder.rmdir()


def claim_run_folder(out: str | Path | None, name: str, parent: Path = Path("runs")) -> Path:
    """Create and claim a new run's folder: `out` when it is new or an empty folder (never overwrite), else
    parent/<name>-<time>, numbered when taken. Two runs never share one: the loser of a race on the same `out`
    gets a one-line error, and an automatic name moves on to the next number."""
    if out:
        path = Path(out)
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            check_new_out(path)
        if not _claim(path):
            pid = claimant(path)
            if pid is None or process_alive(pid):
                raise UsageError(f"--out {path} is being written by another run"
                                 f"{f' (process {pid})' if pid else ''}; choose a new folder (nothing was overwritten)")
            clear_abandoned_claim(path)  # its run was killed before it wrote its recipe
            check_new_out(path)  # anything left is not that run's: never overwritten
            if not _claim(path):
                raise UsageError(f"--out {path} is being written by another run; choose a new folder")
        return path
    stem = parent / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for n in itertools.count(1):
        candidate = stem if n == 1 else stem.with_name(f"{stem.name}-{n}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        if _claim(candidate):
            return candidate

