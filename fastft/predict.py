"""Label images with a trained model (bundle, ONNX, or a trusted model.pkl), streaming the results."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

from fastft.errors import UsageError
from fastft.images import image_extensions, split_readable, warn_skipped


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


def readable_images(paths: list[Path]) -> list[Path]:
    """The readable images under `paths`; the rest reported in one warning."""
    files, bad = split_readable(collect_images(paths))
    warn_skipped(bad)
    if not files:
        raise UsageError("no readable images among the given paths")
    return files


def predict(model_path: Path, paths: list[Path], bs: int = 64, tta: bool | None = None, trust_pickle: bool = False,
            progress: bool = False) -> Iterator[dict]:
    """Yields {'path', 'label', 'probability', 'probabilities'} per readable image, batch by batch."""
    from fastft.bundle import load

    model = load(model_path, trust_pickle=trust_pickle)
    files = readable_images(paths)
    for done, result in enumerate(model.predict_batch(files, bs=bs, tta=tta), 1):
        if progress and (done % bs == 0 or done == len(files)):
            print(f"\rlabelled {done}/{len(files)}", end="\n" if done == len(files) else "", file=sys.stderr, flush=True)
        yield result


def top_k(result: dict, k: int) -> list[tuple[str, float]]:
    return sorted(result["probabilities"].items(), key=lambda kv: -kv[1])[:k]
