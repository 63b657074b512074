"""A linear probe: the head fitted in closed form on the frozen backbone's features, in seconds.

The backbone (in eval mode) turns every training image, and its mirror image, into pooled features once,
through the test transform (resize, centre crop): no augmentation, so one pass is all the data there is.
A multinomial logistic regression on those features (full-batch L-BFGS, L2 penalty) is then the best
linear head those features allow. Its penalty is chosen on a validation split carved from the training
images (never the test split), and the head is then refitted on all of them. The `probe` strategy stops
there; `lp-ft` (Kumar et al., ICLR 2022) fine-tunes everything from that head, which distorts the
pretrained features less than fine-tuning from a random head does.

In one process the features go through the feature cache (with --cache, the default), which the backbone choice
and the label check fill for the same images. Under several processes each computes the features of its shard of
the training images in memory; every rank gets all of them, rank 0 fits the head, and every rank copies rank 0's
head, so all end with the same weights.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import torch
from fastai.callback.core import Callback

from fastft.data.split import indices_by_key, shuffled_by_group
from fastft.fastai_internals import AFTER_TRAINING_MODE
from fastft.train.distributed import unwrapped
from fastft.train.features import frozen_features, pooled_features

# L2 per example on standardised features: the candidates tried first. Where the best is one of the grid's ends, the
# grid goes on past it along LADDER (the same 1-3 steps) while each step wins beyond noise (choose_penalty): a best
# at an end only says that the optimum may lie beyond it (it was 0.001 or 1 in 7 of 11 fits on real photos).
LADDER = tuple(float(f"{m}e{e}") for e in range(-6, 4) for m in (1, 3))[:-1]  # 1e-6 ... 1e3: where it stops
PENALTIES = LADDER[LADDER.index(1e-3): LADDER.index(1.0) + 1]
VALID_SHARE = 0.2  # of each class's training images, to choose the penalty


def all_features(learn, dist) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (2N, D), labels (2N,)) of every training image, then of every one's mirror image (row i + N is
    row i's mirror). Each process computes its shard (every size-th image from its rank) and all get everything."""
    items = learn.dls.train_ds.items
    on_terminal = dist.is_main and sys.stdout.isatty()
    shards = dist.gather(pooled_features(learn, items[dist.rank::dist.size], show_progress=on_terminal))

    def whole(part: int) -> torch.Tensor:  # item i is row i // size of rank i % size's shard
        pieces = [shard[part] for shard in shards]
        out = pieces[0].new_empty((len(items), *pieces[0].shape[1:]))
        for rank, piece in enumerate(pieces):
            out[rank::dist.size] = piece
        return out
    originals, mirrors, labels = whole(0), whole(1), whole(2)
    return torch.cat([originals, mirrors]), torch.cat([labels, labels])


def head_loss(logits: torch.Tensor, y: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Cross-entropy over the classes; multi-label (y is 0/1 per label) binary cross-entropy per label."""
    if multi_label:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    return torch.nn.functional.cross_entropy(logits, y)


def head_accuracy(logits: torch.Tensor, y: torch.Tensor, multi_label: bool) -> float:
    if multi_label:
        return ((logits > 0) == y.bool()).float().mean().item()
    return (logits.argmax(1) == y).float().mean().item()


def logistic_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int, penalty: float,
                         multi_label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)) minimising the mean loss + penalty/2 * |weight|^2, by full-batch L-BFGS: a
    multinomial logistic regression, or one binary logistic regression per label for multi-label targets."""
    weight = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = head_loss(x @ weight.T + bias, y, multi_label) + penalty / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _split_by_class(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, valid) of pairs (an image and its mirror stay together), VALID_SHARE of each class held out."""
    keys = [str(label) for label in labels[: len(labels) // 2].tolist()]  # a class, or a multi-label row's label set
    fit, valid = [], []
    for members in shuffled_by_group(indices_by_key(keys), seed).values():
        n_valid = round(len(members) * VALID_SHARE) if len(members) > 2 else 0
        valid += members[:n_valid]
        fit += members[n_valid:]
    half = len(keys)
    as_rows = lambda idx: torch.tensor(idx + [i + half for i in idx], dtype=torch.long)
    return as_rows(fit), as_rows(valid)


def standardised(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features with zero mean and unit deviation per column, the mean, the deviation)."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    return (features - mean) / std, mean, std


class PenaltyChoice(NamedTuple):
    """The probe's L2 penalty and how it was chosen: what metrics.json's `probe` reports."""
    penalty: float
    losses: dict[float, float]  # each penalty tried: its mean loss on the held-out training images (none: none held out)
    at_edge: bool  # the best is an end of the values tried: the optimum may lie beyond, where the images cannot tell

    def report(self) -> dict:
        return {"penalty": self.penalty, "at_edge": self.at_edge,
                "tried": {f"{p:g}": round(loss, 6) for p, loss in sorted(self.losses.items())}}

    def line(self, held_out: int) -> str:
        if not self.losses:
            return f"linear probe: L2 penalty {self.penalty:g} (too few training images to hold any out and choose it)"
        tried = sorted(self.losses)
        widened = (tried[0], tried[-1]) != (PENALTIES[0], PENALTIES[-1])
        grid = f", the grid widened to {tried[0]:g}-{tried[-1]:g}" if widened else ""
        edge = ("; the end of the values tried: one further did no better beyond the noise of these images"
                if self.at_edge and self.penalty not in (LADDER[0], LADDER[-1]) else
                "; the end of the widest grid" if self.at_edge else "")
        return (f"linear probe: L2 penalty {self.penalty:g}, chosen on {held_out} held-out training images{grid} "
                f"(their loss: {', '.join(f'{p:g} {self.losses[p]:.3f}' for p in tried)}){edge}")


def per_image_loss(logits: torch.Tensor, y: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Each image's loss (N,) from the rows of N images then of their N mirror images: the two rows averaged."""
    if multi_label:
        rows = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").mean(1)
    else:
        rows = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    half = len(rows) // 2
    return (rows[:half] + rows[half:]) / 2


def choose_penalty(x: torch.Tensor, labels: torch.Tensor, n_classes: int, seed: int, multi_label: bool,
                   quiet: bool = False) -> PenaltyChoice:
    """The L2 penalty with the least loss on VALID_SHARE of each class held out of `x` (standardised features of N
    images, then of their N mirror images): of PENALTIES first; then, where an end of them is best, on along LADDER
    past it while each next value beats the last beyond noise (NOISE standard errors of the paired per-image
    difference: a few held-out images cannot tell 0.001 from 0.000001, and an extreme chosen on them is over- or
    under-confident). Says which unless `quiet`."""
    from fastft.deploy.calibration import NOISE

    fit, valid = _split_by_class(labels, seed)
    if not len(valid):
        choice = PenaltyChoice(PENALTIES[-1], {}, at_edge=False)
    else:
        per_image = {}

        def held_out(penalty: float) -> torch.Tensor:
            if penalty not in per_image:
                weight, bias = logistic_regression(x[fit], labels[fit], n_classes, penalty, multi_label)
                per_image[penalty] = per_image_loss(x[valid] @ weight.T + bias, labels[valid], multi_label)
            return per_image[penalty]
        best = min(PENALTIES, key=lambda p: held_out(p).mean().item())
        at_edge = best in (PENALTIES[0], PENALTIES[-1])
        step = -1 if best == PENALTIES[0] else 1
        while at_edge and 0 <= (beyond := LADDER.index(best) + step) < len(LADDER):
            saving = held_out(best) - held_out(LADDER[beyond])
            if saving.mean().item() <= NOISE * saving.std().item() / len(saving) ** 0.5:
                break  # no better beyond noise: the optimum may lie further out, and these images cannot tell
            best = LADDER[beyond]
        choice = PenaltyChoice(best, {p: v.mean().item() for p, v in per_image.items()}, at_edge=at_edge)
    if not quiet:
        print(choice.line(len(valid) // 2), flush=True)
    return choice


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, n_classes: int, seed: int,
                    multi_label: bool = False) -> dict:
    """Fit the probe: choose the penalty on a validation split of the training images, refit on all of them.
    Returns {"weight", "bias"} for a Linear on the raw features, and its figures on the training images."""
    x, mean, std = standardised(features)
    choice = choose_penalty(x, labels, n_classes, seed, multi_label)
    weight, bias = logistic_regression(x, labels, n_classes, choice.penalty, multi_label)
    logits = x @ weight.T + bias
    # fold the standardisation into the layer: W((f - m) / s) + b = (W / s) f + (b - (W / s) m)
    raw_weight = weight / std
    return {"weight": raw_weight, "bias": bias - raw_weight @ mean, "penalty": choice.penalty, "penalty_choice": choice,
            "images": len(labels) // 2,
            "train_loss": head_loss(logits, labels, multi_label).item(),
            "train_acc": head_accuracy(logits, labels, multi_label)}


def fit_probe(learn, context) -> dict:
    """Fit the Learner's linear head (its last layer) as a probe on the training images, on rank 0 of a run of
    several processes, every rank taking its result. Returns the fit's figures. `context`: the RunContext.
    In one process the features come through the feature cache (fastft/train/features.py), where the backbone
    choice and the label check of the same images left them: one pass of a backbone over the images serves all."""
    if context.dist.size == 1 and context.train_targets is not None:
        originals, mirrors = frozen_features(learn, learn.dls.train_ds.items, context.recipe)
        features, labels = torch.cat([originals, mirrors]), torch.cat([context.train_targets, context.train_targets])
    else:
        features, labels = all_features(learn, context.dist)
    fitted = context.dist.from_main(lambda: fit_linear_head(features, labels, len(context.classes),
                                                            context.recipe.seed, context.multi_label))
    linear = unwrapped(learn.model)[1][-1]
    with torch.no_grad():
        linear.weight.copy_(fitted["weight"].to(linear.weight))
        linear.bias.copy_(fitted["bias"].to(linear.bias))
    return fitted


class FrozenBatchNormStatistics(Callback):
    """Every BatchNorm layer normalises with its running statistics while training, and keeps them (its affine
    weights still train): the features a probe was fitted on do not move with each small augmented batch."""

    order = AFTER_TRAINING_MODE

    def before_train(self):
        for module in self.learn.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
