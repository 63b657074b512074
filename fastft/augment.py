"""Augmentation specs: preset names joined with '+', each with optional parameters after ':'.

    flip                          horizontal flip, p=0.5
    hue:0.3                       a bare number sets the preset's main strength
    crop:scale=0.1-1:ratio=0.5-2  named parameters; a-b is a range
    flip+crop:scale=0.1-1+hue:0.5 several at once

Where each runs: size-changing work (crop) and the per-image `trivial` policy are item transforms
(per image, CPU); flips, rotation, zoom and colour are batch transforms on the training device. Test
images are never randomly augmented. Parsing is light (no fastai import) so `--help` and argument
errors stay fast; `build_transforms` makes the fastai transforms.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastft.errors import UsageError


@dataclass(frozen=True)
class Preset:
    help: str
    params: dict = field(default_factory=dict)  # name -> default; a bare number sets `main`
    main: str | None = None  # the parameter a bare number sets; "*" sets every one
    expands_to: str = ""  # a named combination of other presets


COLOR = {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.5}  # d2l's ColorJitter example

PRESETS = {
    "none": Preset("no augmentation"),
    "flip": Preset("horizontal mirror with probability p", {"p": 0.5}, "p"),
    "vflip": Preset("vertical mirror with probability p", {"p": 0.5}, "p"),
    "shift": Preset("move each image by up to +-px pixels in x and y, filling with black (CIFAR's "
                    "pad-and-crop, on the batch)", {"px": 4.0}, "px"),
    "crop": Preset("RandomResizedCrop to --size, area share in scale=a-b, aspect in ratio=a-b",
                   {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)}),
    "brightness": Preset("multiply by a factor in [1-b, 1+b]", {"brightness": 0.5}, "brightness"),
    "contrast": Preset("contrast factor in [1-c, 1+c]", {"contrast": 0.5}, "contrast"),
    "saturation": Preset("saturation factor in [1-s, 1+s]", {"saturation": 0.5}, "saturation"),
    "hue": Preset("shift hue by up to +-h of the colour wheel (h <= 0.5)", {"hue": 0.5}, "hue"),
    "color": Preset("brightness, contrast, saturation and hue together (a number sets all four)", dict(COLOR), "*"),
    "rotate": Preset("rotate by up to +-turns of a full turn (Keras RandomRotation)", {"turns": 0.1}, "turns"),
    "zoom": Preset("zoom in or out by up to a share z (Keras RandomZoom)", {"z": 0.1}, "z"),
    "fastai": Preset("fastai's aug_transforms() defaults: flip, rotate 10, zoom 1.1, warp, lighting"),
    "trivial": Preset("TrivialAugmentWide: one random op of random strength per image (per image, CPU)"),
    "d2l": Preset("d2l 13.1's combination: flip + color + crop:scale=0.1-1:ratio=0.5-2",
                  expands_to="flip+color+crop:scale=0.1-1:ratio=0.5-2"),
    "keras": Preset("the Keras guide's: flip + rotate:0.1 + zoom:0.1", expands_to="flip+rotate:0.1+zoom:0.1"),
}

AUG_HELP = ("Augmentation presets joined with '+'; a number after ':' sets a preset's strength, key=value "
            "after ':' sets a parameter, a-b is a range (e.g. flip+crop:scale=0.1-1:ratio=0.5-2+hue:0.5). "
            "Presets: " + "; ".join(f"{name}: {p.help}" for name, p in PRESETS.items()))


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"'{text}' in --aug '{where}' is not a number") from None


def _value(key: str, text: str, default, where: str):
    if isinstance(default, tuple):
        low, sep, high = text.partition("-")
        if not sep:
            raise UsageError(f"'{key}={text}' in --aug '{where}' must be a range like 0.1-1")
        low, high = _number(low, where), _number(high, where)
        if not 0 < low <= high:
            raise UsageError(f"'{key}={text}' in --aug '{where}' must be a range a-b with 0 < a <= b")
        return (low, high)
    value = _number(text, where)
    limit = 0.5 if key == "hue" else 1.0 if key in ("p", "z") else None
    if value < 0 or (limit is not None and value > limit):
        bound = f"between 0 and {limit}" if limit is not None else "at least 0"
        raise UsageError(f"'{key}' in --aug '{where}' must be {bound}, got {text}")
    return value


def _parse_one(part: str, spec: str) -> tuple[str, dict]:
    name, *settings = part.strip().split(":")
    if name not in PRESETS:
        raise UsageError(f"unknown augmentation '{name}' in --aug '{spec}'; presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if preset.expands_to and settings:
        raise UsageError(f"'{name}' is a named combination and takes no parameters; "
                         f"spell it out to change them: {preset.expands_to}")
    params = dict(preset.params)
    for setting in settings:
        key, eq, text = setting.partition("=")
        if not eq:  # a bare value sets the main parameter (or all of them)
            if preset.main is None:
                raise UsageError(f"augmentation '{name}' takes no bare strength (in --aug '{spec}')"
                                 + (f"; its parameters: {', '.join(preset.params)}" if preset.params else ""))
            for key in (preset.params if preset.main == "*" else [preset.main]):
                params[key] = _value(key, setting, preset.params[key], part)
            continue
        if key not in preset.params:
            choices = ", ".join(preset.params) or "none"
            raise UsageError(f"unknown parameter '{key}' for augmentation '{name}'; its parameters: {choices}")
        params[key] = _value(key, text, preset.params[key], part)
    return name, params


def parse_aug(spec: str) -> list[tuple[str, dict]]:
    """'crop:scale=0.1-1+flip' -> [('crop', {'scale': (0.1, 1.0), 'ratio': (0.75, 1.33)}), ('flip', {'p': 0.5})].
    Named combinations (d2l, keras) expand to their parts."""
    parsed = []
    for part in spec.split("+"):
        name, params = _parse_one(part, spec)
        if PRESETS[name].expands_to:
            parsed += parse_aug(PRESETS[name].expands_to)
        elif name != "none":
            parsed.append((name, params))
    names = [n for n, _ in parsed]
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise UsageError(f"--aug '{spec}' names {', '.join(repeated)} twice; give each preset once")
    return parsed


def build_transforms(spec: str, size: int, crop_pct: float):
    """(item_tfms, batch_tfms) for `spec`. Test items are never randomly augmented: they get d2l's
    resize-then-centre-crop; every random transform is training-only."""
    from fastai.vision.all import RandomResizedCrop, Rotate, Zoom, aug_transforms
    from torchvision.transforms import TrivialAugmentWide

    from fastft.transforms import BatchFlip, BatchShift, ColorJitter, ResizeCenterCrop, TrainOnlyItem

    augs = dict(parse_aug(spec))
    test_items = ResizeCenterCrop(size, crop_pct)
    item_tfms, batch_tfms = [], []
    if "crop" in augs:
        (low, high), ratio = augs["crop"]["scale"], augs["crop"]["ratio"]
        crop = RandomResizedCrop(size, min_scale=low, max_scale=high, ratio=ratio)
        crop.split_idx = 0  # training only; test_items handles the test split
        test_items.split_idx = 1
        item_tfms += [crop, test_items]
    else:
        item_tfms.append(test_items)  # the same deterministic resize for both splits
    if "trivial" in augs:
        item_tfms.append(TrainOnlyItem(TrivialAugmentWide()))
    if "flip" in augs:
        batch_tfms.append(BatchFlip(augs["flip"]["p"], dim=-1))
    if "shift" in augs:
        batch_tfms.append(BatchShift(round(augs["shift"]["px"])))
    if "vflip" in augs:
        batch_tfms.append(BatchFlip(augs["vflip"]["p"], dim=-2))
    if "rotate" in augs:
        batch_tfms.append(Rotate(max_deg=360 * augs["rotate"]["turns"], p=1.0, pad_mode="reflection"))
    if "zoom" in augs:
        z = augs["zoom"]["z"]
        batch_tfms.append(Zoom(min_zoom=1 - z, max_zoom=1 + z, p=1.0, pad_mode="reflection"))
    color = {k: v for name in ("color", "brightness", "contrast", "saturation", "hue") for k, v in augs.get(name, {}).items()}
    if color:
        batch_tfms.append(ColorJitter(**color))
    if "fastai" in augs:
        batch_tfms += aug_transforms()
    for tfm in batch_tfms:
        tfm.split_idx = 0  # fastai's affine transforms would otherwise also resample test batches
    return item_tfms, batch_tfms


def preview_grid(spec: str, image_path, out_path, size: int = 200, rows: int = 2, cols: int = 4, seed: int = 0) -> None:
    """d2l's `apply` picture: rows x cols augmented versions of one image, as training would see them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from fastai.vision.all import IntToFloatTensor, Pipeline, ToTensor, TensorImage, set_seed

    from fastft.transforms import RGBImage

    set_seed(seed)
    item_tfms, batch_tfms = build_transforms(spec, size, crop_pct=1.0)
    items = Pipeline([*item_tfms, ToTensor()], split_idx=0)
    image = RGBImage.create(image_path)
    batch = TensorImage(torch.stack([items(image) for _ in range(rows * cols)]))
    batch = Pipeline([IntToFloatTensor(), *batch_tfms], split_idx=0)(batch)
    tile = max(size, 100) / 100  # inches at dpi 100: every tile at least 100 px
    fig, axes = plt.subplots(rows, cols, figsize=(cols * tile, rows * tile + 0.4), squeeze=False)
    for ax, picture in zip(axes.flat, batch):
        ax.imshow(picture.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.axis("off")
    fig.suptitle(f"--aug {spec}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
