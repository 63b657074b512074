"""WiSE-FT (Wortsman et al., CVPR 2022): the kept network's weights averaged with the probe's, for `lp-ft`.

Fine-tuning moves a network away from the pretrained features, which helps on the training images and can hurt on
photos unlike them. The probe epoch of `lp-ft` ends with the pretrained backbone and a fitted linear head, the
fine-tuning epochs with other weights of the same shape; every weight interpolated between the two,
(1 - w) x probe + w x fine-tuned, is one network again (the bundle, ONNX and hub exports are unchanged), and
somewhere between them often beats both ends. BatchNorm statistics stay as loaded during `lp-ft`, so both ends share
them. `--wise auto` chooses w on the validation split (--holdout, or valid/; 0, the probe, unless fine-tuning beats it
there), else takes the paper's 0.5 and says so; `--wise W` fixes it; `off` keeps the fine-tuned weights.
"""
from __future__ import annotations

import torch

from fastft.train.distributed import unwrapped
from fastft.train.tie import lowest_loss_among_the_best, within_tie

WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))  # the mixing weights `auto` compares
NO_VALIDATION_WEIGHT = 0.5  # the paper's choice when nothing held out can choose


class ProbeWeights:
    """lp-ft's weights after its probe epoch (the epoch log captures them), which WiSE-FT averages the fine-tuned ones
    with at the end; a resumed run gets them back from the checkpoint (`state` / `restore`)."""

    def __init__(self):
        self.weights = None

    def state(self) -> dict | None:
        return self.weights

    def restore(self, state: dict | None) -> None:
        self.weights = state


def mixed(probe: dict, tuned: dict, weight: float) -> dict:
    """(1 - weight) x probe + weight x tuned, tensor by tensor (integer buffers, BatchNorm's counters: tuned's)."""
    return {k: torch.lerp(probe[k].to(v), v, weight) if v.is_floating_point() else v for k, v in tuned.items()}


def validation_scores(learn, dl, multi_label: bool) -> tuple[float, float]:
    """(accuracy, mean loss) of the Learner's network on a labelled loader."""
    from fastft.train.epochs import loss_and_correct

    losses, right, total = loss_and_correct(learn, dl, multi_label)
    return right / max(total, 1), losses / max(total, 1)


def choose_weight(scores: dict[float, tuple[float, float]], images: int) -> float:
    """The weight `auto` keeps, from (accuracy, loss) by weight on `images` held-out images: the probe's (0) unless a
    weight with fine-tuning in it beats the probe by more than TIE_IMAGES images (a fine-tuning that does not beat the
    probe loses: it cost more and can transfer worse); else the best, weights within TIE_IMAGES of it settled by the
    lower loss (fastft/train/tie.py)."""
    best = max(accuracy for accuracy, _ in scores.values())
    if within_tie(scores[0.0][0], best, images):
        return 0.0
    return lowest_loss_among_the_best(scores, images)


def apply(learn, context, probe: dict | None, last: dict | None, kept_epoch: int, why_untuned: str = "") -> dict:
    """Put the mixed weights in the Learner's network (it holds the kept weights); returns what metrics.json records
    under `wise`. `probe`: the weights after the probe epoch (epoch 1); `last`: the last epoch's, None when no
    fine-tuning epoch ran (`why_untuned` says why). The fine-tuned end is the kept epoch where it is a fine-tuned one,
    else the last fine-tuned epoch: a kept probe epoch would mix the probe with itself."""
    from fastft.data.loaders import validation_loader

    setting = context.recipe.wise
    if setting == "off":
        return {}
    if probe is None:
        return {"weight": 1.0, "why": "the run ended before its probe epoch finished"}
    network = unwrapped(learn.model)
    validation = validation_loader(learn.dls)
    if last is None:  # only the probe ran: nothing to mix, and nothing fine-tuned to score
        network.load_state_dict(probe)
        print("WiSE-FT: no fine-tuning epoch ran (see above), so there is nothing to mix: the probe's weights are the "
              "model", flush=True)
        scored = {0.0: validation_scores(learn, validation, context.multi_label)} if validation is not None else {}
        return {"weight": 0.0, "fine_tuned": False, "why": why_untuned or "the run ended after its probe epoch",
                **(by_weight(scored, len(validation.dataset)) if scored else {})}
    own = network.state_dict()
    tuned = ({k: v.detach().clone() for k, v in own.items()} if kept_epoch > 1 else
             {k: v.to(own[k]) for k, v in last.items()})
    if setting != "auto":
        weight, chosen_on, scores = float(setting), "given with --wise", {}
    elif validation is None:
        weight, chosen_on, scores = NO_VALIDATION_WEIGHT, "no validation split to choose on: WiSE-FT's usual 0.5", {}
    else:
        scores = {}
        for w in WEIGHTS:
            network.load_state_dict(mixed(probe, tuned, w))
            scores[w] = validation_scores(learn, validation, context.multi_label)
        weight = choose_weight(scores, len(validation.dataset))
        chosen_on = f"chosen on the validation split ({len(validation.dataset)} images)"
    network.load_state_dict(mixed(probe, tuned, weight))
    print(f"WiSE-FT: weights {1 - weight:.1f} x the probe's + {weight:.1f} x the fine-tuned ({chosen_on})",
          flush=True)
    return {"weight": weight, "chosen_on": chosen_on, "fine_tuned": True,
            "fine_tuned_epoch": kept_epoch if kept_epoch > 1 else "last",
            **(by_weight(scores, len(validation.dataset)) if scores else {})}


def by_weight(scores: dict[float, tuple[float, float]], images: int) -> dict:
    """metrics.json's held-out figures by mixing weight."""
    return {"valid_images": images, "valid_acc_by_weight": {str(w): round(a, 4) for w, (a, _) in scores.items()},
            "valid_loss_by_weight": {str(w): round(loss, 4) for w, (_, loss) in scores.items()}}
