"""Label images with a trained model: a run folder or an exported model.pkl."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from fastft.errors import UsageError
from fastft.images import describe_skipped, image_extensions, split_readable


def model_file(model: Path) -> Path:
    path = model / "model.pkl" if model.is_dir() else model
    if not path.is_file():
        raise UsageError(f"no trained model at {model}; pass a run folder (a run's --out) or its model.pkl")
    return path


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders recursed for image files, in a stable order."""
    extensions, found = image_extensions(), []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{path} does not exist; pass image files or folders of images")
    return found


def load_model(model: Path):
    from fastai.learner import load_learner

    path = model_file(model)
    try:
        with warnings.catch_warnings():  # fastai warns that pickles run code; fastft wrote this one
            warnings.simplefilter("ignore", UserWarning)
            return load_learner(path, cpu=True)
    except Exception as e:
        raise UsageError(f"could not load {path} ({type(e).__name__}: {str(e)[:120]}); is it a fastft model.pkl?") from None


def predict(model: Path, paths: list[Path], bs: int = 64) -> list[dict]:
    """[{'path', 'label', 'probability', 'probabilities'}] for every readable image under `paths`."""
    files = collect_images(paths)
    files, bad = split_readable(files)
    if bad:
        print(f"warning: {describe_skipped(bad)}", file=sys.stderr)
    if not files:
        raise UsageError("no readable images to label among the given paths")
    learn = load_model(model)
    vocab = list(learn.dls.vocab)
    dl = learn.dls.test_dl(files, bs=bs, num_workers=0)
    with learn.no_bar():
        probs, _ = learn.get_preds(dl=dl)
    results = []
    for path, row in zip(files, probs.tolist()):
        best = max(range(len(row)), key=row.__getitem__)
        results.append({"path": str(path), "label": vocab[best], "probability": row[best],
                        "probabilities": dict(zip(vocab, row))})
    return results
