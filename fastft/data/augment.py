"""Augmentation: one record per preset, and the plan a `--aug` spec parses into.

A spec is preset names joined with '+', each with optional parameters after ':'.

    flip                          horizontal flip, p=0.5
    hue:0.3                       a bare number sets the preset's main strength
    crop:scale=0.1-1:ratio=0.5-2  named parameters; a-b is a range
    flip+crop:scale=0.1-1+hue:0.5 several at once

Each `Preset` says what it does, where it runs and how to build it: size-changing work (crop) and the
per-image `trivial` policy are item transforms (per image, CPU, random per item, so the decode-once cache
cannot serve them); flips, shifts, rotation, zoom and colour are batch transforms on the training device.
Test images are never randomly augmented. The parser, the transform builder, the cache and `--help` all
read PRESETS; `parse_aug` turns a spec into an `AugPlan` once, and the plan is passed along. Parsing is
light (no fastai import) so `--help` and argument errors stay fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from fastft.errors import UsageError

ITEM, BATCH = "item", "batch"


@dataclass(frozen=True)
class Preset:
    help: str
    stage: str = BATCH  # ITEM: per image on the CPU, before batching; BATCH: on the whole batch, on the device
    random_per_item: bool = False  # an item transform that differs per draw: decoding once cannot serve it
    params: dict = field(default_factory=dict)  # name -> default; a bare number sets `main`
    main: str | None = None  # the parameter a bare number sets; "*" sets every one
    build: Callable[[dict, int], list] | None = None  # (params, size) -> fastai transforms, training-only
    sizes_training_images: bool = False  # makes training images `size` itself: the test resize is then test-only
    joins: str = ""  # presets with the same `joins` key build one transform from their merged parameters
    expands_to: str = ""  # a named combination of other presets


# Builders import fastai lazily: parsing a spec must stay fast.
def _crop(params, size):
    from fastai.vision.all import RandomResizedCrop

    (low, high), ratio = params["scale"], params["ratio"]
    return [RandomResizedCrop(size, min_scale=low, max_scale=high, ratio=ratio)]


def _trivial(params, size):
    from torchvision.transforms import TrivialAugmentWide

    from fastft.data.transforms import TrainOnlyItem

    return [TrainOnlyItem(TrivialAugmentWide())]


def _flip(dim):
    def build(params, size):
        from fastft.data.transforms import BatchFlip

        return [BatchFlip(params["p"], dim=dim)]
    return build


def _shift(params, size):
    from fastft.data.transforms import BatchShift

    return [BatchShift(round(params["px"]))]


def _rotate(params, size):
    from fastai.vision.all import Rotate

    return [Rotate(max_deg=360 * params["turns"], p=1.0, pad_mode="reflection")]


def _zoom(params, size):
    from fastai.vision.all import Zoom

    z = params["z"]
    return [Zoom(min_zoom=1 - z, max_zoom=1 + z, p=1.0, pad_mode="reflection")]


def _color(params, size):
    from fastft.data.transforms import ColorJitter

    return [ColorJitter(**params)]


def _fastai(params, size):
    from fastai.vision.all import aug_transforms

    return aug_transforms()


COLOR = {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.5}  # d2l's ColorJitter example

PRESETS = {
    "none": Preset("no augmentation"),
    "flip": Preset("horizontal mirror with probability p", params={"p": 0.5}, main="p", build=_flip(-1)),
    "vflip": Preset("vertical mirror with probability p", params={"p": 0.5}, main="p", build=_flip(-2)),
    "shift": Preset("move each image by up to +-px pixels in x and y, filling with black (CIFAR's pad-and-crop, "
                    "on the batch)", params={"px": 4.0}, main="px", build=_shift),
    "crop": Preset("RandomResizedCrop to --size, area share in scale=a-b, aspect in ratio=a-b (per image, CPU)",
                   stage=ITEM, random_per_item=True, params={"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)},
                   build=_crop, sizes_training_images=True),
    # colour: `color` first, so that a single factor named after it (color+hue:0.1) overrides its share
    "color": Preset("brightness, contrast, saturation and hue together (a number sets all four)",
                    params=dict(COLOR), main="*", build=_color, joins="color"),
    "brightness": Preset("multiply by a factor in [1-b, 1+b]", params={"brightness": 0.5}, main="brightness",
                         build=_color, joins="color"),
    "contrast": Preset("contrast factor in [1-c, 1+c]", params={"contrast": 0.5}, main="contrast",
                       build=_color, joins="color"),
    "saturation": Preset("saturation factor in [1-s, 1+s]", params={"saturation": 0.5}, main="saturation",
                         build=_color, joins="color"),
    "hue": Preset("shift hue by up to +-h of the colour wheel (h <= 0.5)", params={"hue": 0.5}, main="hue",
                  build=_color, joins="color"),
    "rotate": Preset("rotate by up to +-turns of a full turn (Keras RandomRotation)", params={"turns": 0.1},
                     main="turns", build=_rotate),
    "zoom": Preset("zoom in or out by up to a share z (Keras RandomZoom)", params={"z": 0.1}, main="z", build=_zoom),
    "fastai": Preset("fastai's aug_transforms() defaults: flip, rotate 10, zoom 1.1, warp, lighting", build=_fastai),
    "trivial": Preset("TrivialAugmentWide: one random op of random strength per image (per image, CPU)",
                      stage=ITEM, random_per_item=True, build=_trivial),
    "d2l": Preset("d2l 13.1's combination: flip + color + crop:scale=0.1-1:ratio=0.5-2",
                  expands_to="flip+color+crop:scale=0.1-1:ratio=0.5-2"),
    "keras": Preset("the Keras guide's: flip + rotate:0.1 + zoom:0.1", expands_to="flip+rotate:0.1+zoom:0.1"),
}

AUG_HELP = ("Augmentation presets joined with '+'; a number after ':' sets a preset's strength, key=value after "
            "':' sets a parameter, a-b is a range (e.g. flip+crop:scale=0.1-1:ratio=0.5-2+hue:0.5). Presets: "
            + "; ".join(f"{name}: {p.help}" for name, p in PRESETS.items()))
PARAMETER_LIMITS = {"hue": 0.5, "p": 1.0, "z": 1.0}  # upper bounds; every number is at least 0


@dataclass(frozen=True)
class AugPlan:
    """A parsed --aug spec: the presets it names (combinations expanded), each with its parameters."""
    spec: str
    steps: tuple[tuple[str, dict], ...] = ()

    @property
    def params(self) -> dict[str, dict]:
        return dict(self.steps)

    @property
    def random_per_item(self) -> bool:
        """True when an item transform draws anew for every image: pictures cannot be decoded once."""
        return any(PRESETS[name].random_per_item for name, _ in self.steps)

    def transforms(self, size: int, crop_pct: float) -> tuple[list, list]:
        """(item_tfms, batch_tfms). Test items get the deterministic resize-then-centre-crop and nothing
        random: every preset's transforms are training-only."""
        from fastft.data.transforms import ResizeCenterCrop
        from fastft.fastai_internals import train_only, valid_only

        test_items = ResizeCenterCrop(size, crop_pct)
        item_tfms, batch_tfms = [], []
        for name, params in self.steps:
            preset = PRESETS[name]
            if not preset.joins:
                made = [train_only(t) for t in preset.build(params, size)]
                (item_tfms if preset.stage == ITEM else batch_tfms).extend(made)
        for key in sorted({PRESETS[name].joins for name, _ in self.steps} - {""}):
            # one transform from the merged parameters, in PRESETS order: `color` before a single factor
            # that overrides its share
            members = [(name, preset) for name, preset in PRESETS.items() if preset.joins == key]
            merged = {k: v for name, _ in members for k, v in self.params.get(name, {}).items()}
            batch_tfms += [train_only(t) for t in members[0][1].build(merged, size)]
        resized = any(PRESETS[name].sizes_training_images for name, _ in self.steps)
        # without a random crop, train and test items get the same deterministic resize
        return [valid_only(test_items) if resized else test_items, *item_tfms], batch_tfms


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
    limit = PARAMETER_LIMITS.get(key)
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


def _steps(spec: str) -> list[tuple[str, dict]]:
    steps = []
    for part in spec.split("+"):
        name, params = _parse_one(part, spec)
        if PRESETS[name].expands_to:
            steps += _steps(PRESETS[name].expands_to)
        elif name != "none":
            steps.append((name, params))
    return steps


def parse_aug(spec: str) -> AugPlan:
    """'crop:scale=0.1-1+flip' -> AugPlan with steps [('crop', {'scale': (0.1, 1.0), 'ratio': (0.75, 1.33)}),
    ('flip', {'p': 0.5})]. Named combinations (d2l, keras) expand to their parts; a preset named twice is an error."""
    steps = _steps(spec)
    names = [n for n, _ in steps]
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise UsageError(f"--aug '{spec}' names {', '.join(repeated)} twice; give each preset once")
    return AugPlan(spec, tuple(steps))


def preview_grid(plan: AugPlan, image_path, out_path, size: int = 200, rows: int = 2, cols: int = 4, seed: int = 0) -> None:
    """d2l's `apply` picture: rows x cols augmented versions of one image, as training would see them."""
    from fastft.atomic import subplots
    import torch
    from fastai.vision.all import IntToFloatTensor, Pipeline, ToTensor, TensorImage, set_seed

    from fastft.atomic import save_figure
    from fastft.data.transforms import RGBImage

    set_seed(seed)
    item_tfms, batch_tfms = plan.transforms(size, crop_pct=1.0)
    items = Pipeline([*item_tfms, ToTensor()], split_idx=0)
    image = RGBImage.create(image_path)
    batch = TensorImage(torch.stack([items(image) for _ in range(rows * cols)]))
    batch = Pipeline([IntToFloatTensor(), *batch_tfms], split_idx=0)(batch)
    tile = max(size, 100) / 100  # inches at dpi 100: every tile at least 100 px
    fig, axes = subplots(rows, cols, figsize=(cols * tile, rows * tile + 0.4), squeeze=False)
    for ax, picture in zip(axes.flat, batch):
        ax.imshow(picture.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.axis("off")
    fig.suptitle(f"--aug {plan.spec}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_path)
