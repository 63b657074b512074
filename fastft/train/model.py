"""timm architectures and their weights: hub tag, local file, a fastft run, or none; normalisation from the
model's config; the stage splitter; the Learner."""
from __future__ import annotations

import difflib
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fastft.run_folder import META, WEIGHTS, run_folder_of
from fastft.errors import UsageError
from fastft.recipe import Recipe
from fastft.schedules import STRATEGIES

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_arch(arch: str) -> None:
    """A timm model name, with or without a weights tag (resnet18, resnet18.tv_in1k)."""
    import timm

    name, _, tag = arch.partition(".")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown architecture '{arch}'; {hint}`python -c \"import timm; print(timm.list_models())\"` lists them")
    if tag and arch not in timm.list_pretrained(arch):
        tags = ", ".join(timm.list_pretrained(f"{name}.*")) or "none"
        raise UsageError(f"timm has no weights tag '{tag}' for {name}; its tags: {tags}")


def normalization(arch: str) -> tuple[tuple, tuple]:
    """(mean, std) the model's pretrained config asks for; ImageNet's where it has none."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None or not cfg.mean:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)


@dataclass(frozen=True)
class StartingWeights:
    """Where a run's weights come from: "hub" (timm's ImageNet weights for the arch), "file" (a timm state
    dict), "run" (a fastft run's bundle: its backbone, and its head when the classes match) or "none"."""
    kind: str
    path: Path | None = None

    def describe(self, arch: str) -> str:
        return {"hub": f"{arch} ImageNet weights", "none": "random init"}.get(self.kind, str(self.path))


def starting_weights(recipe: Recipe) -> StartingWeights:
    """Which weights the recipe asks for, checked before anything is built."""
    if not recipe.weights:
        return StartingWeights("hub" if recipe.pretrained else "none")
    path = Path(recipe.weights).expanduser()
    if not recipe.pretrained:
        raise UsageError(f"--weights {path} was given with --no-pretrained; drop one of them")
    bundle = run_folder_of(path).meta
    if path.is_dir() or (bundle.is_file() and path.name in (META, WEIGHTS)):
        if not bundle.is_file():
            raise UsageError(f"--weights {path} is a folder but not a fastft run (no {META}); pass a run folder or a "
                             "timm state dict (.safetensors or .pth)")
        return StartingWeights("run", bundle.parent)
    if not path.is_file():
        raise UsageError(f"weights file {path} does not exist; pass --weights with a timm state dict (.safetensors or "
                         ".pth) or a fastft run folder")
    return StartingWeights("file", path)


HUB_TIMEOUT_S = 5  # offline, the hub client retries for about a minute and prints a dozen lines first
NO_HUB_WEIGHTS = "pass --weights FILE (a timm state dict of {arch}, .safetensors or .pth) or --no-pretrained"


def hub_weights_problem(arch: str) -> str | None:
    """None when `arch`'s ImageNet weights are in the hub cache or the hub answers within HUB_TIMEOUT_S; else why
    not, in a few words. Checked once before anything slow, so that offline a run fails in seconds."""
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    repo = cfg.hf_hub_id if cfg is not None else None
    if repo and any(isinstance(try_to_load_from_cache(repo, name), str)
                    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")):
        return None
    if constants.HF_HUB_OFFLINE:
        return f"HF_HUB_OFFLINE is set and the ImageNet weights of {arch} are not in the hub's cache"
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=HUB_TIMEOUT_S)
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return (f"the Hugging Face hub ({constants.ENDPOINT}) did not answer within {HUB_TIMEOUT_S} s ({reason}), and "
                f"the ImageNet weights of {arch} are not in its cache (offline?)")
    return None


def require_hub_weights(arch: str, start: StartingWeights, fix: str = "") -> None:
    """Starting from the hub's ImageNet weights (`start`), fail in seconds, before any data is read, when they cannot be
    had: one line naming why and `fix` (by default: pass --weights or --no-pretrained)."""
    if start.kind == "hub" and (problem := hub_weights_problem(arch)):
        raise UsageError(f"{problem}; {fix or NO_HUB_WEIGHTS.format(arch=arch)}")


def _load_tensors(path: Path, arch: str) -> dict:
    from timm.models import load_state_dict

    try:
        return load_state_dict(str(path))
    except Exception as e:  # not a state dict, truncated, a pickle of something else: all surface here
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"weights file {path} is not a readable state dict ({reason}); pass the weights of {arch} "
                         "as .safetensors or .pth") from None


def load_backbone(body, tensors: dict, source, arch: str) -> None:
    """Load `tensors` into the timm body, all of it or nothing: a file that fits only part of the backbone (another
    arch, a fastft bundle's prefixed names) would otherwise leave the rest at random init without a word."""
    body.load_state_dict(fitting_tensors(body, tensors, source, arch), strict=False)


def check_weights_fit(arch: str, path: Path) -> None:
    """An error now, before any data is read, when the weights file at `path` would not load into `arch`'s backbone
    (`load_backbone`'s test, on a network built without memory)."""
    import timm
    import torch

    with torch.device("meta"):
        body = timm.create_model(arch, pretrained=False, num_classes=0)
    fitting_tensors(body, _load_tensors(path, arch), path, arch)


def fitting_tensors(body, tensors: dict, source, arch: str) -> dict:
    """The tensors of `tensors` that `body` takes, when they are all it needs and nothing but its classifier is left
    over; else a one-line error naming the file and the architecture."""
    own = body.state_dict()
    fits = {k: tensors[k] for k, v in own.items() if k in tensors and tuple(tensors[k].shape) == tuple(v.shape)}
    needed = [k for k in own if not k.endswith("num_batches_tracked")]  # a counter many files leave out
    if missing := len([k for k in needed if k not in fits]):
        raise UsageError(f"weights file {source} fits {len(needed) - missing} of the {len(needed)} backbone tensors of "
                         f"{arch}; pass the weights of that architecture, or the --arch they belong to")
    # a bigger relative's file holds every tensor of the smaller one with the same shapes (all 296 of lite0's are in
    # lite1's 386): only the classifier, which fastft replaces, may be left over
    classifier = body.default_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    if extra := [k for k in tensors if k not in own and not k.startswith(tuple(f"{c}." for c in classifier))]:
        raise UsageError(f"weights file {source} holds {len(extra)} tensors that {arch} does not have (e.g. {extra[0]}): "
                         f"it is another architecture's; pass the weights of {arch}, or the --arch they belong to")
    return fits


def load_run(learn, run_dir: Path, recipe: Recipe) -> str:
    """A fastft run's backbone into the Learner, and its head too when it was trained on the same classes with
    the same head. Returns what was loaded, in words."""
    from safetensors.torch import load_file

    meta = json.loads((run_dir / META).read_text())
    if meta["arch"].partition(".")[0] != recipe.arch.partition(".")[0]:
        raise UsageError(f"the run {run_dir} trained {meta['arch']}, not {recipe.arch}; pass --arch {meta['arch']}")
    try:
        state = load_file(str(run_dir / WEIGHTS))
    except Exception as e:  # safetensors raises its own types for truncated files
        raise UsageError(f"{run_dir / WEIGHTS} is corrupt or truncated ({str(e)[:100]}); pass another run") from None
    body_prefix, head = "0.model.", learn.model[1]
    load_backbone(learn.model[0].model, {k[len(body_prefix):]: v for k, v in state.items() if k.startswith(body_prefix)},
                  run_dir / WEIGHTS, recipe.arch)
    head_state = {k[2:]: v for k, v in state.items() if k.startswith("1.")}
    own_head = head.state_dict()
    same_head = head_state.keys() == own_head.keys() and all(head_state[k].shape == v.shape for k, v in own_head.items())
    if list(meta["classes"]) == list(learn.dls.vocab) and same_head:
        head.load_state_dict(head_state)
        return f"backbone and head of the run {run_dir}"
    return f"backbone of the run {run_dir} (new head: its classes or head differ)"


def stage_splitter(model) -> list[list]:
    """Parameter groups that follow the backbone's stages: stem, stage 1 ... stage N, head (timm's own
    coarse `group_matcher`); fastai's body/head split for a model without one. Module-level so an
    exported Learner can unpickle it."""
    from timm.models import group_parameters

    body, head = model[0].model, model[1:]
    head_params = [p for p in head.parameters()]
    if not hasattr(body, "group_matcher"):
        return [list(body.parameters()), head_params]
    named = dict(body.named_parameters())
    groups = group_parameters(body, body.group_matcher(coarse=True))
    return [[named[name] for name in names] for names in groups.values()] + [head_params]


def head_config(strategy: str, dropout: float) -> dict:
    """The classifier head a strategy trains (a name in fastft/deploy/network.py's HEADS), with the recipe's dropout:
    what the bundle records to rebuild it."""
    from fastft.deploy.network import HEADS
    return {**HEADS[STRATEGIES[strategy].head], "dropout": dropout}


def create_learner(dls, recipe: Recipe, start: StartingWeights | None = None, head: dict | None = None,
                   class_counts: dict[str, int] | None = None, multi_label: bool = False, **learner_kwargs):
    """(Learner, what its weights were loaded from in words): fastai's vision_learner on a timm body with `head`
    (by default the strategy's), from `start` (by default the recipe's starting weights; checked: a file that fits
    only part of the backbone is an error). `class_counts` weigh the loss for --balance weights; `multi_label`
    makes it binary cross-entropy per label."""
    from fastai.vision.all import vision_learner

    from fastft.deploy.network import head as build_head
    from fastft.train.optimizer import FusedAdam
    start = start or starting_weights(recipe)
    head = head or head_config(recipe.strategy, recipe.head_dropout)
    loss, metric = loss_function(dls, recipe, class_counts, multi_label)
    try:
        learn = vision_learner(dls, recipe.arch, normalize=False, pretrained=start.kind == "hub", ps=recipe.head_dropout,
                               wd=recipe.wd, loss_func=loss, metrics=metric, splitter=stage_splitter,
                               **{"opt_func": FusedAdam, **learner_kwargs})
    except OSError as e:  # hub unreachable (huggingface_hub errors are OSErrors)
        if start.kind != "hub":
            raise
        raise UsageError(f"could not fetch ImageNet weights for {recipe.arch} from the Hugging Face hub "
                         f"({first_sentence(e)}); {NO_HUB_WEIGHTS.format(arch=recipe.arch)}") from None
    if STRATEGIES[recipe.strategy].head != "fastai":  # fastai builds its own head: put the strategy's in its place
        body = learn.model[0]
        learn.model[1] = build_head(body.model.num_features, dls.c, pool=body.needs_pool, **head).to(
            next(body.parameters()).device)
        learn.opt = None  # fastai made its optimizer (when it froze the body) over the head it built
    loaded = start.describe(recipe.arch)
    if start.kind == "file":
        load_backbone(learn.model[0].model, _load_tensors(start.path, recipe.arch), start.path, recipe.arch)
    elif start.kind == "run":
        loaded = load_run(learn, start.path, recipe)
    return learn, loaded


def loss_function(dls, recipe: Recipe, class_counts: dict[str, int] | None, multi_label: bool):
    """(loss, fastai metric): cross-entropy (label smoothing with --label-smoothing), or for multi-label data binary
    cross-entropy per label; --balance weights weighs each class by the inverse of its share of the training
    images (multi-label: each label's positives by its negatives-to-positives ratio)."""
    import torch
    from fastai.vision.all import BCEWithLogitsLossFlat, CrossEntropyLossFlat, accuracy, accuracy_multi

    counts = torch.tensor([float(class_counts[c]) for c in dls.vocab]) if class_counts else None
    weighted = recipe.balance == "weights" and counts is not None
    if multi_label:
        if recipe.label_smoothing:
            raise UsageError("--label-smoothing is for single-label data; this run is multi-label: drop it")
        positive = (len(dls.train_ds) - counts) / counts.clamp_min(1) if weighted else None
        return BCEWithLogitsLossFlat(pos_weight=positive.to(dls.device) if positive is not None else None), accuracy_multi
    weight = (counts.sum() / (len(counts) * counts.clamp_min(1))).to(dls.device) if weighted else None
    # torch's label_smoothing is fastai's LabelSmoothingCrossEntropy: (1 - eps) * CE + eps * mean over classes
    return CrossEntropyLossFlat(weight=weight, label_smoothing=recipe.label_smoothing), accuracy


def first_sentence(e: BaseException) -> str:
    """The first sentence of an exception's message, whole (hub errors run to several lines)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text.split(". ")[0].rstrip(".")
