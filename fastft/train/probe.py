"""A linear probe: the head fitted in closed form on the frozen backbone's features, in seconds.

The backbone (in eval mode) turns every training image, and its mirror image, into pooled features once,
through the test transform (resize, centre crop): no augmentation, so one pass is all the data there is.
A multinomial logistic regression on those features (full-batch L-BFGS, L2 penalty) is then the best
linear head those features allow. Its penalty is chosen on a validation split carved from the training
images (never the test split), and the head is then refitted on all of them. The `probe` strategy stops
there; `lp-ft` (Kumar et al., ICLR 2022) fine-tunes everything from that head, which distorts the
pretrained features less than fine-tuning from a random head does.

Features live in memory only: nothing is written anywhere.
"""
from __future__ import annotations

import random

import torch
from fastai.callback.core import Callback

PENALTIES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # L2 per example on standardised features: the candidates tried
VALID_SHARE = 0.2  # of each class's training images, to choose the penalty


def pooled_features(learn, items) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (2N, D), labels (2N,)): every item, then every item's mirror image, through the frozen backbone
    and the head's pooling layers, with the test transform. Runs on the Learner's device, in eval mode."""
    body, head = learn.model[0], learn.model[1]
    pool = torch.nn.Sequential(*[m for m in head if isinstance(m, (torch.nn.AdaptiveAvgPool2d, torch.nn.Flatten))])
    dl = learn.dls.test_dl(items, with_labels=True, shuffle=False)
    originals, mirrors, labels = [], [], []
    was_training = learn.model.training
    learn.model.eval()
    with torch.inference_mode():
        for xb, yb in dl:
            xb, yb = xb.as_subclass(torch.Tensor), yb.as_subclass(torch.Tensor)  # plain tensors, not fastai's types
            originals.append(pool(body(xb)).float().cpu())
            mirrors.append(pool(body(xb.flip(-1))).float().cpu())
            labels.append(yb.cpu())
    learn.model.train(was_training)
    return torch.cat(originals + mirrors), torch.cat(labels + labels)  # row i + N is row i's mirror image


def head_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the classes; multi-label (y is 0/1 per label) binary cross-entropy per label."""
    if y.ndim == 2:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    return torch.nn.functional.cross_entropy(logits, y)


def head_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    if y.ndim == 2:
        return ((logits > 0) == y.bool()).float().mean().item()
    return (logits.argmax(1) == y).float().mean().item()


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)) minimising the mean loss + penalty/2 * |weight|^2, by full-batch L-BFGS: a
    multinomial logistic regression, or one binary logistic regression per label for multi-label targets."""
    weight = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = head_loss(x @ weight.T + bias, y) + penalty / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _split_by_class(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, valid) of pairs (an image and its mirror stay together), VALID_SHARE of each class held out."""
    keys = [str(label) for label in labels[: len(labels) // 2].tolist()]  # a class, or a multi-label row's label set
    rng, fit, valid = random.Random(seed), [], []
    for c in sorted(set(keys)):
        members = [i for i, key in enumerate(keys) if key == c]
        rng.shuffle(members)
        n_valid = round(len(members) * VALID_SHARE) if len(members) > 2 else 0
        valid += members[:n_valid]
        fit += members[n_valid:]
    half = len(keys)
    as_rows = lambda idx: torch.tensor(idx + [i + half for i in idx], dtype=torch.long)
    return as_rows(fit), as_rows(valid)


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, n_classes: int, seed: int) -> dict:
    """Fit the probe: choose the penalty on a validation split of the training images, refit on all of them.
    Returns {"weight", "bias"} for a Linear on the raw features, and its figures on the training images."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    fit, valid = _split_by_class(labels, seed)
    scores = {}
    if len(valid):
        for penalty in PENALTIES:
            weight, bias = _logistic_regression(x[fit], labels[fit], n_classes, penalty)
            scores[penalty] = head_loss(x[valid] @ weight.T + bias, labels[valid]).item()
    penalty = min(scores, key=scores.get) if scores else PENALTIES[-1]
    print(f"linear probe: L2 penalty {penalty:g}, chosen on {len(valid) // 2} held-out training images "
          f"(their loss: {', '.join(f'{p:g} {v:.3f}' for p, v in scores.items())})", flush=True)
    weight, bias = _logistic_regression(x, labels, n_classes, penalty)
    logits = x @ weight.T + bias
    # fold the standardisation into the layer: W((f - m) / s) + b = (W / s) f + (b - (W / s) m)
    raw_weight = weight / std
    return {"weight": raw_weight, "bias": bias - raw_weight @ mean, "penalty": penalty, "images": len(labels) // 2,
            "train_loss": head_loss(logits, labels).item(), "train_acc": head_accuracy(logits, labels)}


def fit_probe(learn, seed: int) -> dict:
    """Fit the Learner's linear head (its last layer) as a probe on the training images. Returns the fit's figures."""
    features, labels = pooled_features(learn, learn.dls.train_ds.items)
    fitted = fit_linear_head(features, labels, learn.dls.c, seed)
    linear = learn.model[1][-1]
    with torch.no_grad():
        linear.weight.copy_(fitted["weight"].to(linear.weight))
        linear.bias.copy_(fitted["bias"].to(linear.bias))
    return fitted


class FrozenBatchNormStatistics(Callback):
    """Every BatchNorm layer normalises with its running statistics while training, and keeps them (its affine
    weights still train): the features a probe was fitted on do not move with each small augmented batch."""

    order = 5  # after fastai's TrainEvalCallback (order -10) puts the model in training mode

    def before_train(self):
        for module in self.learn.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
