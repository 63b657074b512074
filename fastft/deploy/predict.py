"""Label images with a trained model (bundle, ONNX, or a trusted model.pkl), streaming the results."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

from fastft.data.folders import collect_images, keep_readable
from fastft.errors import UsageError


def readable_images(paths: list[Path]) -> list[Path]:
    """The readable images under `paths`; the rest reported in one warning."""
    files, _ = keep_readable(collect_images(paths))
    if not files:
        raise UsageError("no readable images among the given paths")
    return files


UNCERTAIN = "uncertain"


def predict(model_path: Path, paths: list[Path], bs: int = 64, tta: bool | None = None, trust_pickle: bool = False,
            progress: bool = False, min_confidence: float | None = None) -> Iterator[dict]:
    """Yields {'path', 'label', 'probability', 'probabilities', 'calibrated'} per readable image, batch by batch. A
    single-label prediction whose top probability is below `min_confidence` gets the label 'uncertain', and its
    most likely class as 'guess'."""
    from fastft.deploy.bundle import load

    model = load(model_path, trust_pickle=trust_pickle)
    files = readable_images(paths)
    for done, result in enumerate(model.predict_batch(files, bs=bs, tta=tta), 1):
        if progress and (done % bs == 0 or done == len(files)):
            print(f"\rlabelled {done}/{len(files)}", end="\n" if done == len(files) else "", file=sys.stderr, flush=True)
        if min_confidence is not None and "labels" not in result and result["probability"] < min_confidence:
            result["label"], result["guess"] = UNCERTAIN, result["label"]  # the top guess stays in the answer
        yield result


def top_k(result: dict, k: int) -> list[tuple[str, float]]:
    return sorted(result["probabilities"].items(), key=lambda kv: -kv[1])[:k]


def shown_labels(result: dict, k: int | None) -> list[tuple[str, float]]:
    """(label, probability) pairs to show: the top k when asked; else the most likely label, or for a multi-label
    model every label at or above its threshold."""
    if k is None and "labels" in result:
        return [(label, result["probabilities"][label]) for label in result["labels"]]
    if k is None and result.get("label") == UNCERTAIN:
        return [(f"{UNCERTAIN} ({result['guess']} {result['probability']:.3f})", result["probability"])]
    return top_k(result, k or 1)
