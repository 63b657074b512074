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


# What share of a probe's errors the trial lets fine-tuning be expected to fix: twice the largest share it fixed on the
# test split of any run recorded, rounded up. That was 0.237, of 86 pairs (hotdog, seed 1: a probe's 0.873 against
# fine-tuning's 0.903; `python bench/error_cut.py`); on the 10-a-class copies it fixed none (issue 41).
PLAUSIBLE_ERROR_CUT = 0.5


def probe_out_of_reach(valid_acc: float, images: int) -> str:
    """Why fine-tuning will not be chosen over the probe, whose held-out accuracy is `valid_acc` on `images` images, or
    "". Fine-tuning must beat it by more than TIE_IMAGES (wise.choose_weight): it cannot where the probe misses no
    more than that, and is not expected to where that takes fixing more than PLAUSIBLE_ERROR_CUT of the probe's misses
    (a small held-out split, or a strong probe). A run choosing by `--wise auto` (--strategy auto's trial) fine-tunes
    nothing there."""
    missed, needed = round((1 - valid_acc) * images), TIE_IMAGES + 1
    if missed < needed:
        return (f"the probe misses {missed} of the {images} held-out images: no fine-tuning can beat it there by more "
                f"than {TIE_IMAGES}, which choosing it takes")
    if needed > PLAUSIBLE_ERROR_CUT * missed:
        return (f"the probe misses {missed} of the {images} held-out images: to be chosen, fine-tuning would have to fix "
                f"{needed} of them ({needed / missed:.0%}), and on the test split of every run measured it fixed a "
                "quarter of a probe's errors at most (bench/README.md)")
    return ""
