"""What is known of a backbone before it sees the user's photos: how strong an ImageNet model it is.

For a linear probe on penultimate-layer features, transfer accuracy follows ImageNet top-1 closely when the networks
are trained alike (Kornblith, Shlens and Le, "Do Better ImageNet Models Transfer Better?", CVPR 2019: r about 0.99
over 16 networks and 12 datasets). The backbone choice (backbone_choice.py) decides by this prior among the
candidates its folds cannot separate. A candidate's top-1 comes from timm's own results table where this module
holds it; when any candidate lacks one, all are ranked by a proxy instead: parameters x input pixels (the bigger
member of a family, at its own resolution, is the stronger ImageNet model in every family timm lists).
"""
from __future__ import annotations

from typing import NamedTuple

# ImageNet-1k top-1 (%) from timm's results table (huggingface/pytorch-image-models, results/results-imagenet.csv),
# each measured at the model's own test size and crop: the weights fastft's recipes, tests and benches name.
IMAGENET_TOP1 = {
    "tf_efficientnet_lite0.in1k": 74.830,
    "tf_efficientnet_lite1.in1k": 76.644,
    "tf_efficientnet_lite2.in1k": 77.464,
    "tf_efficientnet_lite3.in1k": 79.808,
    "efficientnet_lite0.ra_in1k": 75.480,
    "efficientnet_b0.ra_in1k": 77.694,
    "resnet18.tv_in1k": 69.760,
    "resnet50.tv_in1k": 76.130,
}


class Prior(NamedTuple):
    value: float  # higher: the stronger ImageNet model
    words: str  # what the value is, for selection.csv and the run's line


def full_name(arch: str) -> str:
    """`arch` with timm's default pretrained tag when it has none ("tf_efficientnet_lite0" ->
    "tf_efficientnet_lite0.in1k"): a weights file given for a bare name is taken to be those weights."""
    import timm.models

    if "." in arch:
        return arch
    config = timm.models.get_pretrained_cfg(arch)
    return f"{arch}.{config.tag}" if config is not None and config.tag else arch


def size_proxy(arch: str) -> tuple[float, int, int]:
    """(parameters x input pixels, parameters, input side) of `arch`'s backbone, built without memory."""
    import timm
    import torch

    with torch.device("meta"):  # shapes only: no weights are allocated or read
        body = timm.create_model(arch, pretrained=False, num_classes=0)
    parameters = sum(p.numel() for p in body.parameters())
    side = int(body.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return parameters * side * side, parameters, side


def priors(archs: list[str]) -> dict[str, Prior]:
    """Each arch's prior: ImageNet top-1 when every one has it in IMAGENET_TOP1, else all by the size proxy (a
    top-1 and a proxy cannot be compared)."""
    names = {arch: full_name(arch) for arch in archs}
    if all(name in IMAGENET_TOP1 for name in names.values()):
        return {arch: Prior(IMAGENET_TOP1[name], f"ImageNet top-1 {IMAGENET_TOP1[name]:.1f}% (timm's results)")
                for arch, name in names.items()}
    out = {}
    for arch in archs:
        proxy, parameters, side = size_proxy(arch)
        out[arch] = Prior(float(proxy), f"{parameters / 1e6:.1f}M parameters at {side} px (a proxy: no top-1 known "
                                        "for every candidate)")
    return out


def ranks(prior_by_arch: dict[str, Prior]) -> dict[str, int]:
    """1 for the strongest prior, 2 for the next ... (ties share the better rank)."""
    values = sorted({p.value for p in prior_by_arch.values()}, reverse=True)
    return {arch: 1 + values.index(p.value) for arch, p in prior_by_arch.items()}
