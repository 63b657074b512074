"""Augmentation specs: preset names joined with '+', each with optional parameters after ':'.

    flip                        horizontal flip, p=0.5
    flip:0.3                    a bare number sets the preset's main parameter
    crop:scale=0.1-1:ratio=0.5-2  named parameters; a-b is a range
    crop+flip                   d2l 13.2's training augmentation

Parsing is light (no fastai import) so `--help` and argument errors stay fast; `build_transforms`
turns a parsed spec into fastai item transforms (per image, CPU) and batch transforms (on the device).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastft.errors import UsageError


@dataclass(frozen=True)
class Preset:
    help: str
    params: dict = field(default_factory=dict)  # name -> default; the first is the main strength


PRESETS = {
    "none": Preset("no augmentation"),
    "flip": Preset("horizontal mirror with probability p", {"p": 0.5}),
    "vflip": Preset("vertical mirror with probability p", {"p": 0.5}),
    "crop": Preset("RandomResizedCrop to --size: area share in scale, aspect ratio in ratio",
                   {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)}),
}

AUG_HELP = ("Augmentation presets joined with '+', parameters after ':' "
            "(e.g. crop:scale=0.1-1:ratio=0.5-2+flip:0.3). Presets: "
            + "; ".join(f"{name} ({p.help})" for name, p in PRESETS.items()))


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"'{text}' in --aug '{where}' is not a number") from None


def _value(text: str, default, where: str):
    if isinstance(default, tuple):
        low, sep, high = text.partition("-")
        if not sep:
            raise UsageError(f"'{text}' in --aug '{where}' must be a range like 0.1-1")
        return (_number(low, where), _number(high, where))
    return _number(text, where)


def parse_aug(spec: str) -> list[tuple[str, dict]]:
    """'crop:scale=0.1-1+flip' -> [('crop', {'scale': (0.1, 1.0), 'ratio': (0.75, 1.33)}), ('flip', {'p': 0.5})]."""
    parsed = []
    for part in spec.split("+"):
        name, *settings = part.strip().split(":")
        if name not in PRESETS:
            raise UsageError(f"unknown augmentation '{name}' in --aug '{spec}'; presets: {', '.join(PRESETS)}")
        defaults = PRESETS[name].params
        params = dict(defaults)
        for setting in settings:
            key, eq, text = setting.partition("=")
            if not eq:  # a bare value sets the main parameter
                if not defaults:
                    raise UsageError(f"augmentation '{name}' takes no parameters (in --aug '{spec}')")
                key, text = next(iter(defaults)), setting
            if key not in defaults:
                choices = ", ".join(defaults) or "none"
                raise UsageError(f"unknown parameter '{key}' for augmentation '{name}'; its parameters: {choices}")
            params[key] = _value(text, defaults[key], part)
        parsed.append((name, params))
    return [(n, p) for n, p in parsed if n != "none"]


def build_transforms(spec: str, size: int, crop_pct: float):
    """(item_tfms, batch_tfms) for a parsed `spec`. Test items are never randomly augmented: with a
    crop preset they get d2l's resize-then-centre-crop; every random transform is training-only."""
    from fastai.vision.all import RandomResizedCrop

    from fastft.transforms import BatchFlip, ResizeCenterCrop

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
        item_tfms.append(test_items)
    if "flip" in augs:
        batch_tfms.append(BatchFlip(augs["flip"]["p"], dim=-1))
    if "vflip" in augs:
        batch_tfms.append(BatchFlip(augs["vflip"]["p"], dim=-2))
    return item_tfms, batch_tfms
