"""Calibration: temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017), and the
figures that say how far a model's probabilities are from how often it is right.

A fine-tuned network's probabilities are over-confident: "bee 0.97" is right less often than 97% of the time.
Dividing its logits by one temperature T > 1, fitted on held-out predictions (the validation split), fixes most of
it without changing a single prediction (the arg max is the same). A multi-label model gets one T per label, each a
sigmoid's. The bundle stores T; every way of predicting with the model applies it.

A temperature fitted on a few hundred held-out images carries their noise: on a model that is nearly calibrated
already, the fitted T (1.27 on flowers, bench/README.md) lowered the validation NLL by less than its own standard
error and made the test split's ECE worse. So a fitted T is kept only when the held-out NLL it saves is more than
NOISE standard errors of that saving (a paired comparison, image by image); otherwise T stays 1, and the run says so.

Figures, each before and after: the expected calibration error (ECE, 15 equal-width confidence bins, weighted by
how many predictions fall in each), the negative log-likelihood (NLL) and the Brier score.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fastft.data.split import MIN_HELD_OUT  # the fewest held-out images a temperature is fitted on

BINS = 15
LIMITS = (0.05, 20.0)  # a temperature outside these is a fit gone wrong, not a calibration
NOISE = 2.0  # standard errors the held-out NLL must fall by for a fitted temperature to be kept (one-sided, ~98%)


def fit_temperature(logits: np.ndarray, targets: np.ndarray, multi_label: bool = False) -> float | list[float]:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on held-out (logits, targets), by L-BFGS on
    log T; multi-label: one T per label, for sigmoid(logits / T) against 0/1 targets."""
    import torch

    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets))
    # Held-out predictions that are all right carry no evidence of over-confidence, and their NLL falls for ever as
    # T shrinks: such a fit would sharpen the model to certainty. Those (a label's, for multi-label) keep T = 1.
    right = ((z > 0) == y.bool()).all(dim=0) if multi_label else (z.argmax(1) == y).all().reshape(1)
    log_t = torch.zeros(z.shape[1] if multi_label else 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        scaled = z / log_t.exp()
        value = (torch.nn.functional.binary_cross_entropy_with_logits(scaled, y.double()) if multi_label
                 else torch.nn.functional.cross_entropy(scaled, y.long()))
        value.backward()
        return value
    if not right.all():
        optimizer.step(loss)
    t = torch.where(right, torch.ones_like(log_t), log_t.detach().exp().clamp(*LIMITS))
    return [float(v) for v in t] if multi_label else float(t[0])


class Temperature(NamedTuple):
    """The temperature a model applies, and why: `value` is `fitted` where the fit beat its noise, else 1."""
    value: float | list[float]
    fitted: float | list[float]  # what minimised the held-out NLL
    gain: float | list[float]  # the held-out NLL the fitted temperature saves, per image (per label: per image-label)
    noise: float | list[float]  # the standard error of that saving

    @property
    def kept_at_one(self) -> bool:  # anywhere: one label's T is enough
        return self.value != self.fitted  # floats, or lists of them


def choose_temperature(logits: np.ndarray, targets: np.ndarray, multi_label: bool = False) -> Temperature:
    """fit_temperature's T where it lowers the held-out NLL by more than NOISE standard errors of the saving,
    else 1 (per label for multi-label)."""
    fitted = fit_temperature(logits, targets, multi_label)

    def nll(temperature):  # per image (N, 1), or per image and label (N, L)
        terms = _nll_terms(scaled(logits, temperature, multi_label), targets, multi_label)
        return terms if multi_label else terms[:, None]
    saving = nll(1.0) - nll(fitted)
    gain = saving.mean(axis=0)
    noise = saving.std(axis=0, ddof=1) / np.sqrt(len(saving)) if len(saving) > 1 else np.full_like(gain, np.inf)
    kept = np.where(gain > NOISE * noise, np.asarray(fitted, dtype=np.float64), 1.0)
    as_given = (lambda a: [float(v) for v in a]) if multi_label else (lambda a: float(a[0]))
    return Temperature(as_given(kept), fitted, as_given(gain), as_given(noise))


def _nll_terms(probs: np.ndarray, targets: np.ndarray, multi_label: bool) -> np.ndarray:
    """-log of the probability given to what came true: per image (N,), or per image and label (N, L)."""
    eps = 1e-12
    if multi_label:
        y = np.asarray(targets, dtype=np.float64)
        return -(y * np.log(probs + eps) + (1 - y) * np.log(1 - probs + eps))
    return -np.log(probs[np.arange(len(probs)), np.asarray(targets).astype(int)] + eps)


def scaled(logits: np.ndarray, temperature, multi_label: bool = False) -> np.ndarray:
    """Probabilities of logits / T: a softmax over the classes, or a sigmoid per label."""
    z = np.asarray(logits, dtype=np.float64) / np.asarray(temperature, dtype=np.float64)
    if multi_label:
        return 1 / (1 + np.exp(-z))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _confidence_and_outcome(probs: np.ndarray, targets: np.ndarray, multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """(how sure each prediction is, whether it came true): the top class's probability and whether it was the
    truth; multi-label: every (image, label) pair's probability and whether the label applies."""
    if multi_label:
        return probs.ravel(), np.asarray(targets).ravel().astype(float)
    return probs.max(axis=1), (probs.argmax(axis=1) == np.asarray(targets)).astype(float)


def _bin_of(confidence: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Each confidence's bin among `bins` equal-width bins of [0, 1] (a bin holds its upper edge)."""
    return np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1], right=True), 0, bins - 1)


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, multi_label: bool = False,
                               bins: int = BINS) -> float:
    confidence, outcome = _confidence_and_outcome(probs, targets, multi_label)
    which = _bin_of(confidence, bins)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(confidence[members].mean() - outcome[members].mean())
    return float(error)


def figures(probs: np.ndarray, targets: np.ndarray, multi_label: bool = False) -> dict:
    """ECE (15 bins), NLL and Brier score of `probs` against `targets` (class indices; multi-label: 0/1 rows)."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    nll = _nll_terms(probs, targets, multi_label).mean()
    if multi_label:
        brier = np.mean((probs - targets.astype(float)) ** 2)
    else:
        brier = np.mean(np.sum((probs - np.eye(probs.shape[1])[targets.astype(int)]) ** 2, axis=1))
    return {"ece": expected_calibration_error(probs, targets, multi_label), "nll": float(nll), "brier": float(brier)}


def reliability_diagram(before: np.ndarray, after: np.ndarray, targets: np.ndarray, multi_label: bool, path: Path,
                        title: str) -> None:
    """reliability.png: accuracy against confidence per bin, before and after calibration, beside the diagonal a
    perfectly calibrated model would follow."""
    from fastft.atomic import save_figure, subplots

    fig, ax = subplots(figsize=(5, 4.6))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfectly calibrated")
    for probs, name, style in ((before, "before", "o-"), (after, "after", "s-")):
        confidence, outcome = _confidence_and_outcome(np.asarray(probs), targets, multi_label)
        which = _bin_of(confidence)
        shown = [b for b in range(BINS) if (which == b).any()]
        ece = expected_calibration_error(np.asarray(probs), targets, multi_label)
        ax.plot([confidence[which == b].mean() for b in shown], [outcome[which == b].mean() for b in shown], style,
                label=f"{name} (ECE {ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy" if not multi_label else "frequency",
           title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def folded(network, temperature):
    """A copy of `network` whose last linear layer is divided by `temperature` (row by row for one per label): its
    logits are the calibrated ones, so an export (ONNX, the hub's plain timm model) needs no fastft to apply it.
    The network itself when there is no temperature."""
    if temperature is None:
        return network

    import torch

    network = copy.deepcopy(network)
    linear = [m for m in network.modules() if isinstance(m, torch.nn.Linear)][-1]
    t = torch.as_tensor(temperature, dtype=linear.weight.dtype).reshape(-1)
    with torch.no_grad():
        linear.weight.div_(t[:, None])
        if linear.bias is not None:
            linear.bias.div_(t)
    return network
