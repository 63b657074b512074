"""timm architectures and their weights: hub tag, local file, or none; normalisation from the model's config."""
from __future__ import annotations

import difflib
from pathlib import Path

from fastft.errors import UsageError
from fastft.recipe import Recipe

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


def weights_source(recipe: Recipe) -> dict:
    """Extra timm.create_model arguments that point it at a local weights file, if the recipe has one."""
    if not recipe.weights:
        return {}
    path = Path(recipe.weights).expanduser()
    if not recipe.pretrained:
        raise UsageError(f"--weights {path} was given with --no-pretrained; drop one of them")
    if not path.is_file():
        raise UsageError(f"weights file {path} does not exist; pass --weights with a timm state dict (.safetensors or .pth)")
    return {"pretrained_cfg_overlay": {"file": str(path.resolve())}}


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


def create_learner(dls, recipe: Recipe, **learner_kwargs):
    """fastai's vision_learner on a timm body, with the recipe's weights. Bad weights are user errors."""
    from fastai.vision.all import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat, accuracy, vision_learner

    from fastft.train.optimizer import FusedAdam

    extra = weights_source(recipe)
    loss = LabelSmoothingCrossEntropyFlat(eps=recipe.label_smoothing) if recipe.label_smoothing else CrossEntropyLossFlat()
    try:
        return vision_learner(dls, recipe.arch, normalize=False, pretrained=recipe.pretrained, ps=recipe.head_dropout, wd=recipe.wd,
                              loss_func=loss, metrics=accuracy, splitter=stage_splitter,
                              **extra, **{"opt_func": FusedAdam, **learner_kwargs})
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if extra:  # a wrong arch, not a state dict, a truncated file: all surface here
            raise UsageError(f"weights file {recipe.weights} does not fit {recipe.arch} ({reason}); "
                             f"pass the weights of that architecture, or the --arch they belong to") from None
        if recipe.pretrained and isinstance(e, OSError):  # hub unreachable (huggingface_hub errors are OSErrors)
            raise UsageError(f"could not fetch ImageNet weights for {recipe.arch} from the Hugging Face hub ({reason}); "
                             "pass --weights FILE (a local timm state dict) or --no-pretrained") from None
        raise
