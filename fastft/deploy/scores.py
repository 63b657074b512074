"""The scores a run reports at its end and `fastft evaluate` reports on any data: one function per kind of
label, in NumPy, so training and evaluation compute the very same numbers.

Single-label: accuracy, balanced accuracy (the mean of the per-class recalls), macro F1, per-class precision,
recall, F1 and support, the confusion matrix. Multi-label (a label is on when its probability reaches the
threshold): accuracy over every (image, label) pair, micro and macro F1, mAP (mean average precision over the
labels, threshold-free), and per-label precision, recall, F1, average precision and support.
"""
from __future__ import annotations

import numpy as np

THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    total = precision + recall
    return np.divide(2 * precision * recall, total, out=np.zeros_like(total, dtype=float), where=total > 0)


def _ratio(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def single_label(probs: np.ndarray, truth: np.ndarray, classes: list[str]) -> dict:
    """probs (N, C), truth (N,) class indices."""
    n = len(classes)
    guess = probs.argmax(axis=1)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (truth, guess), 1)
    hits, predicted, actual = np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1)
    precision, recall = _ratio(hits, predicted), _ratio(hits, actual)
    f1 = _f1(precision, recall)
    present = actual > 0  # classes the data has: a class with no image has no recall to average
    return {"accuracy": float((guess == truth).mean()) if len(truth) else 0.0,
            "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                              "support": int(actual[i])} for i, c in enumerate(classes)},
            "confusion": {"classes": list(classes), "matrix": confusion.tolist()}}


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """The area under one label's precision-recall curve, as the mean precision at each positive's rank."""
    if not positive.any():
        return 0.0
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(float)
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


def multi_label(probs: np.ndarray, truth: np.ndarray, classes: list[str], threshold: float) -> dict:
    """probs and truth (N, C); truth is 0/1."""
    truth = truth.astype(bool)
    on = probs >= threshold
    tp, fp, fn = (on & truth).sum(0), (on & ~truth).sum(0), (~on & truth).sum(0)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _f1(precision, recall)
    ap = np.array([average_precision(probs[:, i], truth[:, i]) for i in range(len(classes))])
    present = truth.sum(0) > 0
    micro_p, micro_r = _ratio(tp.sum(), tp.sum() + fp.sum()), _ratio(tp.sum(), tp.sum() + fn.sum())
    return {"accuracy": float((on == truth).mean()) if truth.size else 0.0, "threshold": float(threshold),
            "micro_f1": float(_f1(micro_p, micro_r)), "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "mAP": float(ap[present].mean()) if present.any() else 0.0,
            "per_label": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                              "ap": float(ap[i]), "support": int(truth[:, i].sum())} for i, c in enumerate(classes)}}


def choose_threshold(probs: np.ndarray, truth: np.ndarray) -> float:
    """The threshold (0.05 .. 0.95) with the best micro F1 on these images: the validation split's."""
    truth = truth.astype(bool)

    def micro_f1(t):
        on = probs >= t
        tp, fp, fn = (on & truth).sum(), (on & ~truth).sum(), (~on & truth).sum()
        return 2 * tp / max(2 * tp + fp + fn, 1)
    return float(max(THRESHOLDS, key=lambda t: (micro_f1(t), -abs(t - 0.5))))  # ties: the one nearest 0.5
