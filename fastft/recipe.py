"""Recipes are data: a TOML file of flat settings, read over built-in defaults, overridden by CLI flags.

Precedence is CLI flag > recipe file > the defaults below. Unknown keys are errors, so a typo never
silently falls back to a default. Every run saves its resolved recipe, and `fastft run that.toml`
reproduces it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from fastft.errors import UsageError
from fastft.train.strategies import STRATEGIES


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    # data: a local folder, or (when empty) a download into the data home
    data: str = ""  # folder with train/ and test/ (or valid/) class folders, or just class folders
    dataset: str = ""  # folder name the download extracts to, under the data home
    data_url: str = ""  # where to download the dataset from when `data` is empty
    data_sha1: str = ""  # published checksum of that archive; empty = not checked
    valid_pct: float = 0.2  # held-out share when the folder has no train/test split
    limit: int = 0  # >0: a seeded, class-stratified sample of at most this many images per split
    # model
    arch: str = "resnet18"  # any timm name, optionally with a weights tag: resnet18.tv_in1k
    pretrained: bool = True  # start from ImageNet weights (hub, or `weights`)
    weights: str = ""  # local timm state dict (.safetensors / .pth) used instead of the hub
    head_dropout: float = 0.5  # fastai's head dropout (ps): p/2 before the hidden layer, p before the last
    # input and augmentation
    size: int = 224  # square input side in pixels
    crop_pct: float = 0.875  # test items: resize to round(size / crop_pct), then centre-crop to size
    aug: str = "flip"  # augmentation presets joined with '+': see `fastft hotdog --help`
    # training
    strategy: str = "fine-tune"  # fine-tune, d2l, keras, gradual, scratch: see fastft/train/strategies.py
    epochs: int = 5  # total epochs, frozen phases included
    freeze_epochs: int = 1  # fine-tune, keras: epochs that train only the head (within `epochs`)
    unfreeze: int = 2  # keras: stages unfrozen (from the top) after the head-only phase
    lr: float | str = 0.0  # the head's peak learning rate; 0 = the strategy's default; "auto" = LR finder
    bs: int = 64  # batch size
    wd: float = 0.01  # decoupled weight decay of fastai's optimizers (fastai's default; d2l's strategy keeps its own)
    label_smoothing: float = 0.0  # share of each target spread over all classes (fastai's LabelSmoothingCrossEntropy eps)
    tta: bool = False  # flip TTA: the final test accuracy (and the bundle's predictions) average each image with its mirror
    # infrastructure
    seed: int = 42  # same seed, same numbers on the same machine
    workers: int = 2  # DataLoader worker processes (0 = load in the main process); unused when cached
    cache: bool = True  # decode each image once into memory and the disk cache (fastft/data/cache.py), when it applies
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: str = "auto"  # auto, fp32, bf16, fp16 (auto: bf16 where the hardware has it, else fp32 on CPU, fp16 on GPU)
    channels_last: bool = False  # model and batches in channels-last memory format (timm's --channels-last); same numbers

    def replace(self, source: str = "the command line", **changes) -> "Recipe":
        """A copy with `changes` applied (None values mean 'not given' and are ignored), validated."""
        given = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **_checked(given, source))

    def to_toml(self) -> str:
        lines = ["# fastft recipe, resolved: `fastft run THIS_FILE` reproduces the run"]
        lines += [f"{f.name} = {_toml_value(getattr(self, f.name))}" for f in fields(self)]
        return "\n".join(lines) + "\n"


_FIELD_TYPES = {f.name: f.type for f in fields(Recipe)}
_TYPE_NAMES = {"str": str, "int": int, "float": float, "bool": bool}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes


def _checked(values: dict, source: str) -> dict:
    """Reject unknown keys and values of the wrong type, naming the key and where it came from."""
    out = {}
    for key, value in values.items():
        if key not in _FIELD_TYPES:
            known = ", ".join(_FIELD_TYPES)
            raise UsageError(f"unknown key '{key}' in {source}; known keys: {known}")
        if key == "lr":
            out[key] = _learning_rate(value, source)
            continue
        want = _TYPE_NAMES[_FIELD_TYPES[key]]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise UsageError(f"'{key}' in {source} must be a {want.__name__}, got {value!r}")
        out[key] = value
    if out.get("strategy", "fine-tune") not in STRATEGIES:
        raise UsageError(f"unknown strategy '{out['strategy']}' in {source}; choose one of: {', '.join(STRATEGIES)}")
    for key in ("epochs", "bs", "size"):
        if key in out and out[key] < 1:
            raise UsageError(f"'{key}' in {source} must be at least 1, got {out[key]}")
    for key in ("freeze_epochs", "limit", "workers", "wd"):
        if key in out and out[key] < 0:
            raise UsageError(f"'{key}' in {source} must not be negative, got {out[key]}")
    if out.get("unfreeze", 1) < 1:
        raise UsageError(f"'unfreeze' in {source} must be at least 1 stage, got {out['unfreeze']}")
    if "valid_pct" in out and not 0 < out["valid_pct"] < 1:
        raise UsageError(f"'valid_pct' in {source} must be between 0 and 1, got {out['valid_pct']}")
    for key in ("label_smoothing", "head_dropout"):
        if key in out and not 0 <= out[key] < 1:
            raise UsageError(f"'{key}' in {source} must be in [0, 1), got {out[key]}")
    if "crop_pct" in out and not 0 < out["crop_pct"] <= 1:
        raise UsageError(f"'crop_pct' in {source} must be in (0, 1], got {out['crop_pct']}")
    return out


def _learning_rate(value, source: str) -> float | str:
    """A positive number, 0 (the strategy's default), or "auto" (run the LR finder first)."""
    if value == "auto":
        return value
    try:
        lr = float(value) if not isinstance(value, bool) else -1.0
    except (TypeError, ValueError):
        lr = -1.0
    if lr < 0:
        raise UsageError(f"'lr' in {source} must be a positive number, 0 (the strategy's default) or auto; got {value!r}")
    return lr


def recipe_dirs() -> list[Path]:
    """Where recipes live: the package's own (inside the wheel, or the repo's recipes/ in a source
    checkout), then any folders listed in FASTFT_RECIPE_PATH (os.pathsep-separated) for your own."""
    here = Path(__file__).resolve().parent
    shipped = here / "recipes" if (here / "recipes").is_dir() else here.parent / "recipes"
    extra = [Path(p) for p in os.environ.get("FASTFT_RECIPE_PATH", "").split(os.pathsep) if p]
    return [shipped, *extra]


def recipe_files() -> dict[str, Path]:
    """Recipe name -> file, for every recipes/*.toml; each becomes a CLI command."""
    found = {}
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def read_recipe_file(path: Path) -> Recipe:
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"recipe file {path} does not exist; `fastft recipes` lists the shipped ones") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"recipe file {path} is not valid TOML: {e}") from None
    values.setdefault("name", path.stem)
    return Recipe(**_checked(values, str(path)))


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (`hotdog`) or by path (`runs/x/recipe.toml`)."""
    files = recipe_files()
    if name_or_path in files:
        return read_recipe_file(files[name_or_path])
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return read_recipe_file(path)
    raise UsageError(f"unknown recipe '{name_or_path}'; choose one of: {', '.join(files)} (or pass a .toml path)")
