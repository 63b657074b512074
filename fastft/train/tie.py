"""When two candidates are a tie: their accuracies on the same held-out images are TIE_IMAGES images apart or less, a
gap that noise makes (issue 28: defaults chosen on a gap of one or two test images lost on other photos). A tie is
settled by the lower loss. The strategy choice (WiSE-FT's weight) decides this way; the backbone choice compares by the
noise of paired differences instead (fastft/train/backbone_choice.py)."""
from __future__ import annotations

from typing import Hashable

TIE_IMAGES = 2


def within_tie(accuracy: float, best: float, images: int) -> bool:
    """Whether `accuracy` is within TIE_IMAGES of `best`, on `images` held-out images."""
    return accuracy >= best - TIE_IMAGES / images - 1e-9


def lowest_loss_among_the_best(scores: dict[Hashable, tuple[float, float]], images: int) -> Hashable:
    """The key of the lowest loss among those whose accuracy ties the best's, from (accuracy, loss) by key on the same
    `images` held-out images; the first such key where losses are equal too."""
    best = max(accuracy for accuracy, _ in scores.values())
    return min((key for key, (accuracy, _) in scores.items() if within_tie(accuracy, best, images)),
               key=lambda key: scores[key][1])


def unbeatable_probe(valid_acc: float, images: int) -> str:
    """Why no fine-tuning can be chosen over the probe, whose held-out accuracy is `valid_acc` on `images` images, or
    "": fine-tuning must beat it by more than TIE_IMAGES (wise.choose_weight), and it cannot where the probe misses no
    more than that. So a run choosing by `--wise auto` (--strategy auto's trial) fine-tunes nothing there."""
    missed = round((1 - valid_acc) * images)
    if missed > TIE_IMAGES:
        return ""
    return (f"the probe misses {missed} of the {images} held-out images: no fine-tuning can beat it there by more than "
            f"{TIE_IMAGES}, which choosing it takes")
