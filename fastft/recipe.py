"""Recipes are data: a TOML file of flat settings, read over built-in defaults, overridden by CLI flags.

Precedence is CLI flag > recipe file > the defaults below. Unknown keys are errors, so a typo never
silently falls back to a default. Every run saves its resolved recipe, and `fastft run that.toml`
reproduces it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from fastft.errors import UsageError, did_you_mean
from fastft.schedules import AUTO, AUTO_HELP, STRATEGIES, strategy_settings
from fastft.values import number_or_word


def setting(default, help: str, flag: str | None = "", choices: tuple = (), cli_min: int | None = None,
            minimum: float | None = None, maximum: float | None = None, above: float | None = None,
            below: float | None = None, parse=None):
    """A recipe key: its built-in default and what it means. `flag` is its command-line option (derived from
    the name when empty: bs -> --bs, bools -> --tta/--no-tta); None for keys only a recipe file sets. `choices`
    are the values it takes, if only some; `cli_min` the least a command-line value may be; `minimum` and `maximum`
    the least and most any value may be, `above` and `below` the bounds it must be strictly inside; `parse(value,
    source)` reads a value that is not simply of the field's type (a number or a word). The CLI builds every training
    command's options from these, and `_checked` every check of a single value."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "cli_min": cli_min,
                                            "minimum": minimum, "maximum": maximum, "above": above, "below": below,
                                            "parse": parse})


@dataclass
class CommonRecipe:
    """The keys every run has. `Recipe` adds the strategies' own settings (fastft/schedules.py)."""
    name: str = setting("custom", "the run's name: run folders are <name>-<time>", flag=None)
    description: str = setting("", "one line for `fastft recipes` and --help", flag=None)
    # data: a local folder, or (when empty) a download into the data home
    data: str = setting("", "Local dataset folder: train/ and test/ (or valid/) of class folders, or class folders "
                            "alone (split by --valid-pct). Default: download the recipe's dataset.")
    dataset: str = setting("", "folder name the download extracts to, under the data home", flag=None)
    data_url: str = setting("", "Download the dataset archive from this URL instead of the recipe's.")
    data_sha1: str = setting("", "published SHA-1 of that archive; empty = not checked", flag=None)
    labels: str = setting("", "A CSV file of image paths (relative to it or to --data) and labels, instead of class "
                              "folders; a split column (train/valid/test, or is_valid) decides the split if it has one.")
    image_col: str = setting("", "The labels CSV's image column (found by name when empty: image, file, path, ...).")
    label_col: str = setting("", "The labels CSV's label column (found by name when empty: label, class, tags, ...).")
    label_delim: str = setting("", "What separates several labels in one cell (a multi-label run): empty: ';' when a "
                                   "cell has one, a space when the spaced words are labels themselves; none: "
                                   "single-label.")
    balance: str = setting("none", "Imbalanced classes: weights (class-weighted loss), sampler (fastai's WeightedDL: "
                                   "each class drawn equally often) or none.", choices=("none", "weights", "sampler"))
    exclude_suspects: int = setting(0, "Train without the N training images whose labels look most wrong (the label "
                                       "check of `fastft inspect --labels-check`, on the starting weights; the run's "
                                       "label_issues.csv lists them). The files are not touched. 0: train on all.",
                                    cli_min=0, minimum=0)
    valid_pct: float = setting(0.2, "Held-out (test) share when the data folder has no train/test split.", above=0,
                               below=1)
    limit: int = setting(0, "A seeded, class-stratified sample of at most N training images (a --holdout "
                            "validation split is held out of them), N test images and N valid/ images (quick runs); "
                            "0: all.", minimum=0)
    # model
    arch: str = setting("resnet18", "Any timm model name, with or without weights tag: resnet18, resnet18.tv_in1k, "
                                    "tf_efficientnet_lite0; several, comma-separated, or auto: choose among them on the training images (--select).")
    select: bool = setting(False, "Choose the backbone on the training images: among --arch a,b,c (a list implies "
                                  "it), or the recipe's shortlist (--arch auto; offline, the architectures of a "
                                  "--weights folder of ARCH.*.safetensors), by the cross-validated accuracy of a linear "
                                  "probe on each one's frozen features; the best trains. The test split is not read.")
    budget: str = setting("", "Time for choosing the backbone (--arch a,b,c / auto) and the strategy (--strategy "
                              "auto's trial run): 90s, 10m, 1h. A backbone that would likely overrun it is not scored, "
                              "a trial epoch not trained, and the best so far trains; one too small for even the first probe is an "
                              "error naming the least. Empty: no limit.")
    shortlist: str = setting("", "the backbones --arch auto tries, comma-separated", flag=None)
    pretrained: bool = setting(True, "Start from ImageNet weights (the hub's, or --weights), or from random init.")
    weights: str = setting("", "Start from local weights instead of the hub's: a timm state dict (.safetensors or .pth), "
                               "or a fastft run folder (its backbone, and its head when the classes match). Choosing among several "
                               "backbones: ARCH=FILE,ARCH=FILE, or a folder of ARCH.*.safetensors.")
    head_dropout: float = setting(0.5, "Dropout in the classifier head while it trains by steps: fastai's head (its ps; "
                                       "fine-tune, d2l, keras, gradual, scratch) p/2 before the hidden layer and p "
                                       "before the last; lp-ft's linear head p before it. The probe's one solve uses "
                                       "none.", minimum=0, below=1)
    # input and augmentation
    size: int = setting(224, "Input side in pixels (train crops and test centre-crops to it).", minimum=1, maximum=4096)
    crop_pct: float = setting(0.875, "test items: resize the shorter side to floor(size / crop_pct), then centre-crop "
                                     "to size (timm's eval transform)", flag=None,
                              above=0, maximum=1)
    # the presets' list is the CLI's help for --aug (fastft/data/augment.py: AUG_HELP), which data parses
    aug: str = setting("flip", "Augmentation presets joined with '+', e.g. flip+crop:scale=0.1-1+hue:0.5 (`fastft augs "
                               "--help` lists them).")
    # training
    strategy: str = setting("fine-tune", "Training schedule: " + "; ".join(f"{k}: {v.help}" for k, v in STRATEGIES.items())
                            + f"; {AUTO}: {AUTO_HELP}", choices=(*STRATEGIES, AUTO))
    epochs: int = setting(5, "Total epochs, frozen phases included.", minimum=1)
    lr: float | str = setting(0.0, "The head's peak learning rate; 0: the strategy's default; auto: run fastai's LR "
                                   "finder first.", parse=lambda value, source: _learning_rate(value, source))
    bs: int = setting(64, "Batch size (per process).", minimum=1)
    wd: float = setting(0.01, "Decoupled weight decay (fastai's default 0.01; the d2l strategy keeps its own 1e-3).",
                        minimum=0)
    label_smoothing: float = setting(0.0, "Label smoothing eps: 0 plain cross-entropy, 0.1 a common choice against "
                                          "overconfidence.", minimum=0, below=1)
    mixup: float = setting(0.0, "MixUp (fastai's callback): every training batch blends pairs of images and their "
                                "labels by a Beta(A, A) share; A: 0.4 is fastai's usual value; 0: off.", minimum=0)
    cutmix: float = setting(0.0, "CutMix (fastai's callback): a patch of one training image pasted into another, the "
                                 "labels mixed by area; Beta(A, A), 1.0 the paper's; 0: off. Not with --mixup.", minimum=0)
    ema: float = setting(0.0, "An exponential moving average of the weights while they train (timm's ModelEmaV3, "
                              "its warm-up making a short run average its last steps): its decay per step at most D "
                              "(0.999 is usual); the average is what each epoch measures and the run keeps; 0: off.",
                         minimum=0, below=1)
    tta: bool = setting(False, "Flip TTA: the final test accuracy, and predictions, average each image with its mirror.")
    # which epoch to keep, when to stop, where to log
    holdout: float | str = setting(0.0, "Share of each class's training images held out as a validation split, to "
                                        "calibrate the probabilities, pick the best epoch (--keep) and stop early "
                                        "(--patience); 0: none; auto: 10% when that is 50 images or more. A data "
                                        "folder with valid/ beside train/ and test/ has one already.",
                                 parse=lambda value, source: number_or_word(
                                     "holdout", value, source, 0, 1, words=("auto",), below_high=True,
                                     meaning="auto, or a share of the training images at least 0 and below 1"))
    keep: str = setting("auto", "Which epoch's weights the run keeps (bundle, model.pkl): best (by --monitor), last, or "
                                "auto: best when the run has a validation split apart from the test split, else last "
                                "(picking on the test split would overstate its accuracy).",
                        choices=("auto", "best", "last"))
    monitor: str = setting("accuracy", "The figure --keep best and --patience watch on the validation split: accuracy "
                                       "or valid_loss.", choices=("accuracy", "valid_loss"))
    patience: int = setting(0, "Stop after N epochs without improvement of --monitor (the rest of the schedule is "
                               "skipped); 0: never.", cli_min=0, minimum=0)
    log: str = setting("", "Log also to: tensorboard (event files under the run folder; pip install "
                           "'fastft[tensorboard]'). metrics.json and history.csv are always written.",
                       choices=("", "tensorboard"))
    # infrastructure
    seed: int = setting(42, "Random seed: the same seed gives the same numbers on the same machine (and the same "
                            "--workers).", minimum=0, maximum=2**32 - 1)  # NumPy's seeds are 32-bit
    workers: int | str = setting("auto", "DataLoader worker processes per pass over the data (0: load in the main "
                                         "process), never more than the pass's batches; auto: none on a CPU, on a GPU "
                                         "one per 4 batches, up to the cores (8 at most). Unused when decoded once. "
                                         "Random crops draw in the process that loads, so different counts give "
                                         "different (each reproducible) numbers.",
                                 parse=lambda value, source: _workers(value, source))
    cache: bool = setting(True, "Decode each image once into memory and the disk cache (~/.cache/fastft, or "
                                "$FASTFT_CACHE) when no item transform is random, instead of every epoch.")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps.")
    precision: str = setting("auto", "auto, fp32, bf16 or fp16 (auto: bf16 on GPUs and CPUs that have it in hardware; "
                                     "else fp16 on GPUs, fp32 on CPU and MPS).")
    channels_last: bool = setting(False, "Model and batches in channels-last memory format: the same arithmetic, "
                                         "often faster convolutions.")

    def replace(self, source: str = "the command line", **changes):
        """A copy with `changes` applied (None values mean 'not given' and are ignored), validated."""
        given = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **_checked(given, source))

    def check(self) -> None:
        """The rules between keys that need no data (`_check_between_keys`): what a user gives is checked with them
        before any work, a command line's options and a recipe file alike."""
        _check_between_keys(self)

    def to_toml(self, asked: dict | None = None) -> str:
        """The recipe as TOML; `asked`: what the command asked where the run chose (`asked_differences`), kept apart
        in an [asked] table that `fastft run` does not train."""
        lines = ["# fastft recipe, resolved: `fastft run THIS_FILE` reproduces the run"]
        lines += [f"{f.name} = {_toml_value(getattr(self, f.name))}" for f in fields(self)]
        if asked:
            lines += ["", f"[{ASKED}]  # what the command asked where the run chose; the keys above are what it chose, "
                          "and what `fastft run` trains (without choosing again)"]
            lines += [f"{name} = {_toml_value(value)}" for name, value in asked.items()]
        return "\n".join(lines) + "\n"


# Each strategy's own settings (`StrategySetting`s, declared with the strategies that take them) are recipe keys too.
Recipe = dataclasses.make_dataclass(
    "Recipe", [(name, s.type, setting(s.default, f"{', '.join(users)}: {s.help}", cli_min=s.minimum, minimum=s.minimum,
                                      parse=s.parse))
               for name, (s, users) in strategy_settings().items()],
    bases=(CommonRecipe,), namespace={"__doc__": "A run's settings: the common keys and every strategy's own."})
Recipe.__module__ = __name__

# --help's first screen: the keys a first run sets, a line each (the rest of --help gives every other key in full;
# the README gives these in full, and `fastft augs` the augmentation presets)
ONE_LINE_HELP = {
    "data": "Your data: class folders, or train/ and test/ of class folders.",
    "labels": "A CSV of image paths and labels, instead of class folders.",
    "valid_pct": "The test share, where the folder has no train/test split.",
    "holdout": "A validation share held out of the training images (picks the epoch, calibrates); auto: 10% from 500.",
    "limit": "At most N training, N test and N validation images (quick runs); 0: all.",
    "arch": "A timm model name; several (a,b,c) or auto: choose one on the training images (within noise, the "
            "stronger ImageNet model: timm's top-1, else parameters x pixels).",
    "weights": "Local weights instead of the hub's: a file, a folder of ARCH.*.safetensors, or a run.",
    "size": "Input side in pixels.",
    "pretrained": "Start from ImageNet weights, or from random init.",
    "strategy": "auto (the probe or lp-ft, chosen on the training images), probe (one pass of the backbone over "
                "the images, whatever --epochs says), lp-ft, fine-tune, d2l, keras, gradual, scratch.",
    "epochs": "Total epochs, frozen phases included.",
    "lr": "The head's peak learning rate; 0: the strategy's default; auto: fastai's LR finder.",
    "bs": "Batch size (per process).",
    "aug": "Training augmentation: a preset (flip, crop+flip, d2l, ...) or steps joined by +; `fastft augs` draws one.",
    "tta": "Average each test prediction with its mirror image's (flip TTA).",
    "seed": "Random seed: the same seed gives the same numbers on the same machine.",
}
_FIELDS = {f.name: f for f in fields(Recipe)}
_FIELD_TYPES = {f.name: f.type for f in fields(Recipe)}
OPTIONS = {f.name: f for f in fields(Recipe) if f.metadata["flag"] is not None}  # keys the command line sets
_TYPE_NAMES = {"str": str, "int": int, "float": float, "bool": bool}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes


def _checked(values: dict, source: str) -> dict:
    """Each value on its own: known keys only, of the key's type (or read by its `parse`), within the key's range and
    choices, each error naming the key and where it came from. Rules between keys are `check`'s."""
    out = {}
    for key, value in values.items():
        if key not in _FIELD_TYPES:
            known = ", ".join(_FIELD_TYPES)
            raise UsageError(f"unknown key '{key}' in {source}{did_you_mean(key, _FIELD_TYPES)}; known keys: {known}")
        meta = _FIELDS[key].metadata
        if meta["parse"] is not None:
            out[key] = meta["parse"](value, source)
            continue
        want = _TYPE_NAMES[_FIELD_TYPES[key]]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise UsageError(f"'{key}' in {source} must be a {want.__name__}, got {value!r}")
        if want is float and not math.isfinite(value):
            raise UsageError(f"'{key}' in {source} must be a finite number, got {value!r}")
        if not _within_range(value, meta):
            raise UsageError(f"'{key}' in {source} must be {_range_words(meta)}, got {value}")
        if meta["choices"] and value not in meta["choices"]:
            shown = ", ".join(c or '""' for c in meta["choices"])
            raise UsageError(f"'{key}' in {source} must be one of {shown}; got {value!r}")
        out[key] = value
    return out


def _within_range(value, meta) -> bool:
    return ((meta["minimum"] is None or value >= meta["minimum"]) and (meta["maximum"] is None or value <= meta["maximum"])
            and (meta["above"] is None or value > meta["above"]) and (meta["below"] is None or value < meta["below"]))


def _range_words(meta) -> str:
    """'at least 1', 'in [0, 1)', 'in (0, 1]', ...: a key's range from its metadata."""
    low, high = meta["minimum"] if meta["minimum"] is not None else meta["above"], (
        meta["maximum"] if meta["maximum"] is not None else meta["below"])
    if high is None:
        return f"at least {low}" if meta["minimum"] is not None else f"above {low}"
    if low is None:
        return f"at most {high}" if meta["maximum"] is not None else f"below {high}"
    return f"in {'[' if meta['minimum'] is not None else '('}{low}, {high}{']' if meta['maximum'] is not None else ')'}"


def _check_between_keys(recipe) -> None:
    """The rules between a recipe's keys that need no data, one line naming the fix for each. Single values are
    `_checked`'s. A recipe changed in code on the way (a probe learner for the backbone choice, say) may break them."""
    for name, (setting_, users) in strategy_settings().items():
        value = getattr(recipe, name)
        if setting_.only_its_strategies and value != setting_.default and recipe.strategy not in users:
            flag, title, takers = f"--{name.replace('_', '-')}", setting_.title or name, " or ".join(users)
            if recipe.strategy == AUTO:
                raise UsageError(f"--strategy auto chooses {title} itself; drop {flag} {value} (or give --strategy "
                                 f"{takers} with it)")
            raise UsageError(f"{flag} ({title}) is a setting of only --strategy {takers} (this run: {recipe.strategy}), "
                             f"where it would do nothing; drop {flag} or use {takers}")
    if recipe.ema and recipe.strategy != AUTO and not STRATEGIES[recipe.strategy].trains_by_steps:
        raise UsageError(f"--ema averages the weights over the training steps, and --strategy {recipe.strategy} fits "
                         "its head in one solve, with none; drop --ema or choose a strategy that fine-tunes")
    if recipe.mixup and recipe.cutmix:
        raise UsageError("--mixup and --cutmix each replace the training loss; choose one")
    if selecting(recipe):
        if recipe.strategy != AUTO and STRATEGIES[recipe.strategy].random_init:
            raise UsageError(f"--strategy {recipe.strategy} starts from random weights, so there is no backbone to "
                             "choose; drop --select and the --arch list")
        if not recipe.pretrained:
            raise UsageError("choosing a backbone compares pretrained weights; drop --no-pretrained (or --select and "
                             "the --arch list)")
    elif recipe.budget and recipe.strategy != AUTO:
        raise UsageError("--budget bounds choosing: a backbone (--arch a,b,c or auto) and the strategy (--strategy "
                         "auto's trial run), and this run chooses neither; give one of them, or drop --budget")


def selecting(recipe) -> bool:
    """Whether the run chooses its backbone: --select, a list of architectures, or auto."""
    return recipe.select or "," in recipe.arch or recipe.arch == "auto"


def _learning_rate(value, source: str) -> float | str:
    """A positive number, 0 (the strategy's default), or "auto" (run the LR finder first)."""
    if value == "auto":
        return value
    try:
        lr = float(value) if not isinstance(value, bool) else -1.0
    except (TypeError, ValueError):
        lr = -1.0
    if not (0 <= lr < math.inf):  # nan and inf too
        raise UsageError(f"'lr' in {source} must be a positive number, 0 (the strategy's default) or auto; got {value!r}")
    return lr


def _workers(value, source: str) -> int | str:
    """auto, or a number of processes (0 or more; the command line gives it as text)."""
    if value == "auto":
        return value
    try:
        count = int(value) if not isinstance(value, (bool, float)) else -1
    except (TypeError, ValueError):
        count = -1
    if count < 0:
        raise UsageError(f"'workers' in {source} must be auto or a number of processes (0: none), got {value!r}")
    return count


def recipe_dirs() -> list[Path]:
    """Where recipes live: the package's own (inside the wheel, or the repo's recipes/ in a source
    checkout), then any folders listed in FASTFT_RECIPE_PATH (os.pathsep-separated) for your own."""
    here = Path(__file__).resolve().parent
    shipped = here / "recipes" if (here / "recipes").is_dir() else here.parent / "recipes"
    extra = [Path(p) for p in os.environ.get("FASTFT_RECIPE_PATH", "").split(os.pathsep) if p]
    return [shipped, *extra]


def find_recipes(reserved: frozenset[str] = frozenset()) -> tuple[dict[str, Path], list[str]]:
    """(recipe name -> file for every recipes/*.toml, each a CLI command; one line per file refused). A file
    named like one of the `reserved` command names, or like a recipe found before it, is refused: it
    could never run as a command (`fastft run FILE` still runs it)."""
    found, refused = {}, []
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.toml")):
            if path.stem in reserved:
                refused.append(f"ignoring recipe {path}: '{path.stem}' is a fastft command; rename the file "
                               "(its name is the command), or run it with `fastft run FILE`")
            elif path.stem in found:
                refused.append(f"ignoring recipe {path}: the recipe '{path.stem}' is already {found[path.stem]}; "
                               "rename the file (its name is the command)")
            else:
                found[path.stem] = path
    return found, refused


def recipe_files() -> dict[str, Path]:
    """Recipe name -> file, for every recipe a command can name."""
    return find_recipes()[0]


ASKED = "asked"  # a run's recipe.toml: the table of what its command asked where the run chose (a record only)


def asked_differences(asked: Recipe, chosen: Recipe) -> dict:
    """What `asked` (the command's recipe) said where the run settled on `chosen`: --strategy auto, an --arch list
    and the keys that went with them (--budget, the weights folder)."""
    return {f.name: getattr(asked, f.name) for f in fields(asked) if getattr(asked, f.name) != getattr(chosen, f.name)}


def read_recipe_file(path: Path) -> Recipe:
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark some editors add is no error
    except FileNotFoundError:
        raise UsageError(f"recipe file {path} does not exist; `fastft recipes` lists the shipped ones") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"recipe file {path} is not valid TOML: {e}") from None
    except RecursionError:
        raise UsageError(f"recipe file {path} is nested too deeply to be a recipe") from None
    asked = values.pop(ASKED, {})
    if not isinstance(asked, dict) or not set(asked) <= set(_FIELDS):
        raise UsageError(f"recipe file {path}: [{ASKED}] must be a table of recipe keys (what a run's command asked); "
                         "remove it")
    values.setdefault("name", path.stem)
    return recipe_from_values(values, str(path))


def recipe_from_values(values: dict, source: str) -> Recipe:
    """A recipe from key/value pairs (a parsed TOML file), checked: `source` names them in errors."""
    recipe = Recipe(**_checked(values, source))
    recipe.check()
    return recipe


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (`hotdog`) or by path (`runs/x/recipe.toml`)."""
    files = recipe_files()
    if name_or_path in files:
        return read_recipe_file(files[name_or_path])
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return read_recipe_file(path)
    raise UsageError(f"unknown recipe '{name_or_path}'; choose one of: {', '.join(files)} (or pass a .toml path)")
