"""Choosing the backbone on the user's own training images (`--arch a,b,c`, `--arch auto`, `--select`).

Which ImageNet backbone transfers best depends on the data (Kornblith et al., CVPR 2019: the choice of backbone
matters more than most of what is done after it), and a linear probe on its frozen features measures that cheaply:
each candidate runs once over the training images and their mirror images (features cached with the decoded
pictures), the images are dealt into the same k stratified, seeded folds for every candidate (REPEATS times over
for fewer than REPEATED_BELOW images), and a probe fitted on k-1 folds predicts the k-th.

A few images' difference in out-of-fold accuracy is a coin toss, so candidates are compared by their noise: image by
image on the same folds, one beats another only when its accuracy is higher by more than NOISE standard errors of
the paired difference (the calibration guard's rule). Among the candidates no other beats, the prior decides
(fastft/train/prior.py): the stronger ImageNet model, whose features transfer better when the folds cannot tell.
The test split is never read.

`--budget 10m` bounds the choice (fastft/train/budget.py): a candidate is not started when the time spent plus a
candidate's average would pass the deadline (the best so far trains), and a budget too small for even the first
candidate's pass over the images is an error naming the least that would do. A candidate whose weights fail to load
is reported as failed and the choice goes on without it. The strategy (probe, lp-ft, WiSE-FT) is chosen in
fastft/train/strategy_choice.py.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import NamedTuple

import torch

from fastft.deploy.calibration import NOISE  # the same rule as the temperature's: 2 standard errors of a paired difference
from fastft.errors import UsageError
from fastft.train.budget import Budget
from fastft.train.prior import Prior, priors, ranks

REPEATED_BELOW = 500  # fewer training images than this: the folds are dealt REPEATS times, cutting the noise of one
REPEATS = 3  # dealing for the cost of more probes on the same cached features (no extra pass over the images)
WON, TIED = "won beyond noise", "tied within noise; chose the stronger ImageNet model"
ONLY = "the only candidate scored"  # the others failed or --budget left them out


class Candidate(NamedTuple):
    arch: str
    weights: str  # a file, or "" for the hub's ImageNet weights


class Score(NamedTuple):
    candidate: Candidate
    accuracy: float  # out-of-fold accuracy of the probe (multi-label: per label, at 0.5)
    log_loss: float  # out-of-fold negative log-likelihood per image
    seconds: float  # features (or reading them back) and the probes
    correct: torch.Tensor  # each image's out-of-fold correctness (N,) (multi-label: its share of labels right)


class Failed(NamedTuple):
    candidate: Candidate
    why: str


class Selection(NamedTuple):
    scores: list[Score]  # in the order tried
    dropped: list[Candidate]  # not scored: the --budget ran out first
    chosen: Candidate
    folds: int
    images: int
    probabilities: torch.Tensor  # the chosen backbone's out-of-fold probabilities (the label check reads them)
    labels: torch.Tensor
    repeats: int = 1  # times the folds were dealt
    failed: tuple = ()  # Failed: weights that did not load
    priors: dict = {}  # arch -> Prior
    reason: str = WON  # WON, TIED or ONLY
    verdicts: dict = {}  # arch -> how it fared against the others, in words (selection.csv's reason)


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
    if files and "=" not in recipe.weights and (lacking := [c.arch for c in found if not c.weights]):
        raise UsageError(f"--weights {recipe.weights} holds no file for {', '.join(lacking)} (ARCH.*.safetensors); add "
                         "its weights there, or leave it out of --arch")
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
    """Every candidate's weights exist and fit its architecture (or the hub has them), before any data is read."""
    from fastft.train.model import check_weights_fit, require_hub_weights, starting_weights

    if len(found) < 2:
        raise UsageError(f"choosing a backbone needs at least two candidates, and there is {len(found)} "
                         f"({', '.join(c.arch for c in found) or 'none'}); list them with --arch a,b,c")
    for c in found:
        start = starting_weights(recipe.replace(arch=c.arch, weights=c.weights, pretrained=True))
        require_hub_weights(c.arch, start, "pass the candidates' weights as --weights ARCH=FILE,ARCH=FILE (timm state "
                            "dicts, .safetensors or .pth) or --weights DIR (a folder of ARCH.*.safetensors), or list "
                            "only backbones whose weights you have with --arch a,b")
        if start.kind == "file":
            check_weights_fit(c.arch, start.path)


def per_image(probabilities: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(correctness (N,), negative log-likelihood (N,)) of each image's out-of-fold probabilities."""
    p = probabilities.clamp(1e-7, 1 - 1e-7)
    if multi_label:
        y = labels.bool()
        return ((p > 0.5) == y).float().mean(1), -(torch.where(y, p.log(), (1 - p).log())).sum(1)
    return (p.argmax(1) == labels).float(), -p.gather(1, labels[:, None]).log().squeeze(1)


def paired_difference(a: Score, b: Score) -> tuple[float, float]:
    """(a's accuracy minus b's, its standard error) over the same images: the noise of the difference itself, which
    is far smaller than either accuracy's when the two are right and wrong on mostly the same images."""
    difference = a.correct - b.correct
    n = len(difference)
    error = difference.std().item() / n ** 0.5 if n > 1 else float("inf")
    return difference.mean().item(), error


def beats(a: Score, b: Score) -> bool:
    difference, error = paired_difference(a, b)
    return difference > 0 and difference > NOISE * error


def decide(scores: list[Score], prior_by_arch: dict[str, Prior]) -> tuple[Candidate, str, dict[str, str]]:
    """(the chosen candidate, WON, TIED or ONLY, each candidate's verdict in words): among the candidates no other
    beats beyond noise, the strongest prior (then the lower log-loss)."""
    unbeaten = [s for s in scores if not any(beats(other, s) for other in scores if other is not s)]
    best = max(unbeaten, key=lambda s: (prior_by_arch[s.candidate.arch].value, -s.log_loss))
    reason = ONLY if len(scores) == 1 else WON if len(unbeaten) == 1 else TIED
    verdicts = {}
    for s in scores:
        winners = [o.candidate.arch for o in scores if o is not s and beats(o, s)]
        verdicts[s.candidate.arch] = (f"beaten beyond noise by {', '.join(winners)}" if winners else reason if s is best
                                      else "tied within noise; a weaker ImageNet model")
    return best.candidate, reason, verdicts


def choose(split, recipe, found: list[Candidate], device, budget: Budget | None = None,
           clock=time.perf_counter, forecast=None) -> Selection:
    """Score every candidate by k-fold probes on its frozen features of the training images, and choose by noise
    and prior (`decide`). `budget`: the run's --budget, started when the run was prepared; `clock`: seconds, for the
    figures (a test passes its own, the same as its budget's); `forecast`: the whole command's estimate
    (fastft/train/estimate.py), said once the first candidate's speeds are timed."""
    from fastft.train.model import starting_weights
    from fastft.train.devices import resolve_precision
    from fastft.train.estimate import measure
    from fastft.train.features import features_cached
    from fastft.train.out_of_fold import frozen_learner, probabilities_of, training_folds

    repeats = REPEATS if len(split.items("train")) < REPEATED_BELOW else 1
    folds = training_folds(split, recipe.seed, repeats)
    items, labels, k = folds.items, folds.labels, folds.k
    dealt = f"{k}-fold cross-validated" + (f", the folds dealt {repeats} times" if repeats > 1 else "")
    print(f"choosing the backbone among {len(found)} ({', '.join(c.arch for c in found)}): a linear probe on each "
          f"one's frozen features of the {len(items)} training images, {dealt} (one pass of each backbone over the "
          "images; a few seconds for a cached one)", flush=True)
    scores, probabilities, dropped, failed = [], {}, [], []
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
        try:
            learn = frozen_learner(split, candidate_recipe, starting_weights(candidate_recipe), device)
        except (UsageError, OSError, RuntimeError) as e:  # its weights: unreadable, another network's, unreachable
            failed.append(Failed(c, str(e).splitlines()[0] if str(e) else type(e).__name__))
            print(f"  {c.arch}: failed ({failed[-1].why}); the choice goes on without it", flush=True)
            continue
        if not scores:  # the first candidate: how long will a pass take?
            cached = features_cached(learn, items, candidate_recipe)
            if forecast is not None or not cached:
                speeds = measure(learn, items, resolve_precision(recipe.precision, device), clock)
                needed = speeds.features * len(items)
                if budget is not None and not cached:
                    budget.check_room_for_first_pass(needed, f"one backbone ({c.arch}'s pass over the {len(items)} "
                                                             "training images)")
                if forecast is not None:  # the trial's probe reads the chosen one's features, stored by its pass here
                    forecast.timed(speeds, features_cached=True)
                elif not cached:
                    print(f"  about {needed:.0f} s a backbone here ({c.arch}'s pass timed on one batch; larger "
                          f"backbones take longer): about {needed * len(found):.0f} s for the {len(found)}", flush=True)
            if cached and budget is not None:  # cached: about as long again as loading it took, for its probes
                budget.check_room_for_first_pass(clock() - started, f"one backbone ({c.arch}, its features cached)")
        probabilities[c] = probabilities_of(learn, candidate_recipe, split, folds)
        del learn
        correct, losses = per_image(probabilities[c], labels, split.multi_label)
        scores.append(Score(c, correct.mean().item(), losses.mean().item(), clock() - started, correct))
        spent = sum(s.seconds for s in scores)
        left = f"; about {spent / number * (len(found) - number):.0f} s left" if number < len(found) else ""
        print(f"  {c.arch}: cross-validated accuracy {scores[-1].accuracy:.3f}, log-loss {scores[-1].log_loss:.3f} "
              f"({scores[-1].seconds:.1f} s{left})", flush=True)
    if not scores:
        raise UsageError(f"no backbone could be scored: {'; '.join(f'{f.candidate.arch}: {f.why}' for f in failed)}")
    prior_by_arch = priors([s.candidate.arch for s in scores])
    chosen, reason, verdicts = decide(scores, prior_by_arch)
    return Selection(scores, dropped, chosen, k, len(items), probabilities[chosen], labels, repeats, tuple(failed),
                     prior_by_arch, reason, verdicts)


def describe(selection: Selection) -> str:
    """The choice in one line: the chosen backbone's score and why it was chosen."""
    from fastft.train.report import standard_error

    score = next(s for s in selection.scores if s.candidate == selection.chosen)
    why = (f"{TIED} ({selection.priors[selection.chosen.arch].words})" if selection.reason == TIED
           else selection.reason)
    return (f"chose {selection.chosen.arch} (cross-validated accuracy {score.accuracy:.3f} ± "
            f"{standard_error(score.accuracy, selection.images):.3f} on {selection.images} training images, "
            f"{folds_words(selection)}; {why}; selection.csv)")


def folds_words(selection: Selection) -> str:
    return f"{selection.folds} folds" + (f" dealt {selection.repeats} times" if selection.repeats > 1 else "")


def write_report(selection: Selection, csv_path: Path, chart_path: Path) -> None:
    """selection.csv (every candidate, its weights, scores, prior and seconds; which was chosen and why) and a chart."""
    from fastft.atomic import replacing
    from fastft.train.report import candidate_chart, standard_error

    rank = ranks(selection.priors)
    with replacing(csv_path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arch", "weights", "cv_accuracy", "standard_error", "cv_log_loss", "prior", "prior_rank",
                         "seconds", "chosen", "reason"])
        writer.writerows([s.candidate.arch, s.candidate.weights or "hub", f"{s.accuracy:.4f}",
                          f"{standard_error(s.accuracy, selection.images):.4f}", f"{s.log_loss:.4f}",
                          selection.priors[s.candidate.arch].words, rank[s.candidate.arch], f"{s.seconds:.1f}",
                          str(s.candidate == selection.chosen).lower(), selection.verdicts[s.candidate.arch]]
                         for s in selection.scores)
        writer.writerows([f.candidate.arch, f.candidate.weights or "hub", "", "", "", "", "", "", "false",
                          f"failed: {f.why}"] for f in selection.failed)
        writer.writerows([c.arch, c.weights or "hub", "", "", "", "", "", "", "false", "not scored: --budget"]
                         for c in selection.dropped)
    chosen = next(i for i, s in enumerate(selection.scores) if s.candidate == selection.chosen)
    candidate_chart([f"{s.candidate.arch} (prior #{rank[s.candidate.arch]})" for s in selection.scores],
                    [s.accuracy for s in selection.scores], chosen,
                    f"out-of-fold accuracy of a linear probe ({folds_words(selection)}, {selection.images} training "
                    "images)", describe(selection), chart_path, row_height=0.6, images=selection.images,
                    rule=f"rule: a backbone wins only by more than {NOISE:g} standard errors of the paired difference "
                         "(image by image); among those none beats, the stronger ImageNet model (prior #1 is the "
                         "strongest)")
