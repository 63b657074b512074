"""Choosing the backbone on the user's own training images (`--arch a,b,c`, `--arch auto`, `--select`).

Which ImageNet backbone transfers best depends on the data (Kornblith et al., CVPR 2019: the choice of backbone
matters more than most of what is done after it), and a linear probe on its frozen features measures that cheaply:
each candidate runs once over the training images and their mirror images (features cached with the decoded
pictures), the images are dealt into the same k stratified, seeded folds for every candidate, and a probe fitted on
k-1 folds predicts the k-th. The candidate with the best out-of-fold accuracy trains; candidates within
TIE_IMAGES images of the best are a tie, settled by the lower out-of-fold log-loss. The test split is never read.

`--budget 10m` bounds the choice (fastft/train/budget.py): a candidate is not started when the time spent plus a
candidate's average would pass the deadline (the best so far trains), and a budget too small for even the first
candidate's pass over the images is an error naming the least that would do. The strategy (probe, lp-ft, WiSE-FT)
is chosen in fastft/train/strategy_choice.py.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import NamedTuple

import torch

from fastft.errors import UsageError
from fastft.train.budget import Budget, pass_seconds
from fastft.train.tie import TIE_IMAGES, lowest_loss_among_the_best



class Candidate(NamedTuple):
    arch: str
    weights: str  # a file, or "" for the hub's ImageNet weights


class Score(NamedTuple):
    candidate: Candidate
    accuracy: float  # out-of-fold accuracy of the probe (multi-label: per label, at 0.5)
    log_loss: float  # out-of-fold negative log-likelihood per image
    seconds: float  # features (or reading them back) and the k probes


class Selection(NamedTuple):
    scores: list[Score]  # in the order tried
    dropped: list[Candidate]  # not scored: the --budget ran out first
    chosen: Candidate
    folds: int
    images: int
    probabilities: torch.Tensor  # the chosen backbone's out-of-fold probabilities (the label check reads them)
    labels: torch.Tensor


def weights_by_arch(weights: str) -> dict[str, str]:
    """--weights for a selection: 'a=FILE,b=FILE', or a folder of ARCH.*.safetensors (ARCH.TAG.safetensors), or ''."""
    if not weights:
        return {}
    path = Path(weights).expanduser()
    if "=" not in weights and path.is_dir():
        found = {f.name.split(".")[0]: str(f) for f in sorted(path.glob("*.safetensors"))}
        if not found:
            raise UsageError(f"--weights {path} holds no ARCH.*.safetensors files; name each one after its timm "
                             "architecture, or pass --weights a=FILE,b=FILE")
        return found
    pairs = {}
    for part in filter(None, (p.strip() for p in weights.split(","))):
        arch, equals, file = part.partition("=")
        if not equals or not arch.strip() or not file.strip():
            raise UsageError(f"--weights '{part}' names no architecture; with several backbones pass --weights "
                             "ARCH=FILE,ARCH=FILE (or a folder of ARCH.*.safetensors)")
        pairs[arch.strip()] = file.strip()
    return pairs


def candidates(recipe) -> list[Candidate]:
    """The backbones a selecting recipe tries, each with its weights; every name and file checked."""
    from fastft.train.model import check_arch

    files = weights_by_arch(recipe.weights)
    if "," in recipe.arch:
        names = [a.strip() for a in recipe.arch.split(",")]
    elif files and "=" not in recipe.weights:  # auto, offline: what the weights folder holds
        names = list(files)
    else:
        names = [a.strip() for a in recipe.shortlist.split(",")]
    if "" in names:
        once_each(recipe.arch, "an empty item")
    for name in names:
        check_arch(name)
    unlisted = [a for a in files if a not in names and a not in {n.split(".")[0] for n in names}]
    if unlisted and "=" in recipe.weights:
        raise UsageError(f"--weights names {', '.join(unlisted)}, which --arch does not list ({', '.join(names)}); "
                         "add it to --arch or drop its weights")
    found = [Candidate(name, files.get(name, files.get(name.split(".")[0], ""))) for name in names]
    seen: dict = {}  # backbone identity -> the first candidate that had it
    for c in found:
        if (earlier := seen.setdefault(backbone_identity(c), c)) is not c:
            once_each(recipe.arch, f"{c.arch} twice" if earlier.arch == c.arch else
                      f"{earlier.arch} and {c.arch} are the same weights")
    return found


def once_each(listed: str, problem: str):
    """The one error for a list that names a backbone twice, under two names, or holds an empty item."""
    raise UsageError(f"--arch {listed} must name each backbone once, separated by single commas ({problem}); e.g. "
                     "--arch tf_efficientnet_lite0,tf_efficientnet_lite2")


def backbone_identity(c: Candidate) -> tuple:
    """What makes two candidates the same backbone: the architecture and its weights (a file given, else timm's
    pretrained config: "resnet50" is "resnet50.a1_in1k", but not "resnet50.tv_in1k")."""
    import timm.models

    if c.weights:
        return c.arch.split(".")[0], str(Path(c.weights).expanduser().resolve())
    return c.arch.split(".")[0], repr(timm.models.get_pretrained_cfg(c.arch))


def check_candidates(recipe, found: list[Candidate]) -> None:
    """Every candidate's weights exist (or the hub has them), before any data is read."""
    from fastft.train.model import require_hub_weights, starting_weights

    if len(found) < 2:
        raise UsageError(f"choosing a backbone needs at least two candidates, and there is {len(found)} "
                         f"({', '.join(c.arch for c in found) or 'none'}); list them with --arch a,b,c")
    for c in found:
        start = starting_weights(recipe.replace(arch=c.arch, weights=c.weights, pretrained=True))
        require_hub_weights(c.arch, start, "pass the candidates' weights as --weights ARCH=FILE,ARCH=FILE (timm state "
                            "dicts, .safetensors or .pth) or --weights DIR (a folder of ARCH.*.safetensors), or list "
                            "only backbones whose weights you have with --arch a,b")


def out_of_fold_scores(probabilities: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> tuple[float, float]:
    """(accuracy, negative log-likelihood per image) of out-of-fold probabilities."""
    p = probabilities.clamp(1e-7, 1 - 1e-7)
    if multi_label:
        y = labels.bool()
        accuracy = ((p > 0.5) == y).float().mean().item()
        nll = -(torch.where(y, p.log(), (1 - p).log())).sum(1).mean().item()
    else:
        accuracy = (p.argmax(1) == labels).float().mean().item()
        nll = -p.gather(1, labels[:, None]).log().mean().item()
    return accuracy, nll


def choose(split, recipe, found: list[Candidate], device, budget: Budget | None = None,
           clock=time.perf_counter) -> Selection:
    """Score every candidate by k-fold probes on its frozen features of the training images; the best wins.
    `budget`: the run's --budget, started when the run was prepared; `clock`: seconds, for the figures (a test
    passes its own, the same as its budget's)."""
    from fastft.train.model import starting_weights
    from fastft.train.out_of_fold import features_cached, frozen_learner, probabilities_of, training_folds

    folds = training_folds(split, recipe.seed)
    items, labels, k = folds.items, folds.labels, folds.k
    print(f"choosing the backbone among {len(found)} ({', '.join(c.arch for c in found)}): a linear probe on each "
          f"one's frozen features of the {len(items)} training images, {k}-fold cross-validated (one pass of each "
          f"backbone over the images; a few seconds for a cached one)", flush=True)
    scores, probabilities, dropped = [], {}, []
    began = clock()
    for number, c in enumerate(found, start=1):
        started = clock()
        if budget is not None and scores:
            each = (started - began) / len(scores)
            if budget.would_pass(each):  # the next one would likely overrun: keep what was scored
                dropped = found[number - 1:]
                print(f"  --budget {budget.text}: {started - budget.began:.0f} s spent, about {each:.0f} s a backbone; "
                      f"not scoring {', '.join(d.arch for d in dropped)}: the best so far trains", flush=True)
                break
        candidate_recipe = recipe.replace(arch=c.arch, weights=c.weights, pretrained=True)
        torch.manual_seed(recipe.seed)
        learn = frozen_learner(split, candidate_recipe, starting_weights(candidate_recipe), device)
        if not scores and not features_cached(learn, items, candidate_recipe):  # the first pass: how long?
            needed = pass_seconds(learn, items, clock)
            if budget is not None:
                budget.check_room_for_first_pass(needed, f"one backbone ({c.arch}'s pass over the {len(items)} "
                                                         "training images)")
            print(f"  about {needed:.0f} s a backbone here ({c.arch}'s pass timed on one batch; larger backbones take "
                  f"longer): about {needed * len(found):.0f} s for the {len(found)}", flush=True)
        elif not scores and budget is not None:  # cached: about as long again as loading it took, for its probes
            budget.check_room_for_first_pass(clock() - started, f"one backbone ({c.arch}, its features cached)")
        probabilities[c] = probabilities_of(learn, candidate_recipe, split, folds)
        del learn
        accuracy, nll = out_of_fold_scores(probabilities[c], labels, split.multi_label)
        scores.append(Score(c, accuracy, nll, clock() - started))
        spent = sum(s.seconds for s in scores)
        left = f"; about {spent / number * (len(found) - number):.0f} s left" if number < len(found) else ""
        print(f"  {c.arch}: cross-validated accuracy {accuracy:.3f}, log-loss {nll:.3f} "
              f"({scores[-1].seconds:.1f} s{left})", flush=True)
    chosen = lowest_loss_among_the_best({s.candidate: (s.accuracy, s.log_loss) for s in scores}, len(items))
    return Selection(scores, dropped, chosen, k, len(items), probabilities[chosen], labels)


def describe(selection: Selection) -> str:
    score = next(s for s in selection.scores if s.candidate == selection.chosen)
    best = max(selection.scores, key=lambda s: s.accuracy)
    tie = (f"; tied with {best.candidate.arch}'s {best.accuracy:.3f} (within {TIE_IMAGES} images), and the lower "
           f"log-loss" if best.accuracy > score.accuracy else "")
    return (f"chose {selection.chosen.arch} (cross-validated accuracy {score.accuracy:.3f} on {selection.images} "
            f"training images, {selection.folds} folds{tie}; selection.csv)")


def write_report(selection: Selection, csv_path: Path, chart_path: Path) -> None:
    """selection.csv (every candidate, its weights, scores and seconds; which was chosen) and a bar chart PNG."""
    from fastft.atomic import replacing
    from fastft.train.report import candidate_chart, standard_error

    with replacing(csv_path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arch", "weights", "cv_accuracy", "standard_error", "cv_log_loss", "seconds", "chosen"])
        writer.writerows([s.candidate.arch, s.candidate.weights or "hub", f"{s.accuracy:.4f}",
                          f"{standard_error(s.accuracy, selection.images):.4f}", f"{s.log_loss:.4f}", f"{s.seconds:.1f}",
                          str(s.candidate == selection.chosen).lower()] for s in selection.scores)
        writer.writerows([c.arch, c.weights or "hub", "", "", "", "", "not scored: --budget"] for c in selection.dropped)
    chosen = next(i for i, s in enumerate(selection.scores) if s.candidate == selection.chosen)
    candidate_chart([s.candidate.arch for s in selection.scores], [s.accuracy for s in selection.scores], chosen,
                    f"out-of-fold accuracy of a linear probe ({selection.folds} folds, {selection.images} training "
                    "images)", describe(selection), chart_path, row_height=0.6, images=selection.images,
                    rule=f"rule: the best accuracy, or among those within {TIE_IMAGES} images of it the lowest log-loss")
