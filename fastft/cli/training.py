"""The training commands: `train DIR`, one per recipe, run, lr-find, compare, resume; and inspect and recipes.

Every training option is a recipe key, with its help text from fastft/recipe.py; a recipe command's --help shows that
recipe's values. fastai and timm load inside the commands, so `--help` and argument errors stay fast.
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Optional

import typer

from fastft.cli.common import COMMANDS, TYPES, app, argument, command, user_errors
from fastft.errors import InterruptedBeforeTraining, UsageError
from fastft.recipe import ONE_LINE_HELP, OPTIONS, Recipe, find_recipes, load_recipe, read_recipe_file
from fastft.schedules import AUTO, LP_FT, STRATEGIES


def flag_of(name: str) -> str:
    """A recipe key's command-line flag: bs -> --bs, channels_last -> --channels-last/--no-channels-last."""
    field, dashed = OPTIONS[name], name.replace("_", "-")
    return field.metadata["flag"] or (f"--{dashed}/--no-{dashed}" if field.type == "bool" else f"--{dashed}")


def shown_value(recipe: Recipe, name: str) -> str:
    """How --help shows a recipe's value of `name`."""
    value = getattr(recipe, name)
    if isinstance(value, bool):
        return f"--{name.replace('_', '-')}" if value else f"--no-{name.replace('_', '-')}"
    if name == "lr" and not value:
        strategy = LP_FT if recipe.strategy == AUTO else recipe.strategy  # auto fine-tunes with lp-ft, if at all
        return f"{STRATEGIES[strategy].default_lr:g} ({strategy}'s default)"
    if name == "data" and not value:
        return f"download {recipe.dataset or recipe.name}" if recipe.data_url else "none"
    return str(value) if value != "" else "none"


# --help's panels: what a first run needs comes first (data, model, training), each option in one line there; every
# other key of the recipe after, in full
PANELS = {
    "Data": ("data", "labels", "valid_pct", "holdout", "limit"),
    "Model": ("arch", "weights", "size", "pretrained"),
    "Training": ("strategy", "epochs", "lr", "bs", "aug", "tta", "seed"),
    "Automatic choice": ("select", "budget", "wise", "exclude_suspects"),
    "Validation": ("keep", "monitor", "patience"),
    "Output": ("log",),
}
PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}


def training_options(recipe: Recipe | None = None, leave_out=(), resumable: bool = True) -> list[inspect.Parameter]:
    """One option per recipe key (and --out), in --help's panels. None means "not given": the recipe's value stands.
    With a recipe, --help shows its values as the defaults."""
    parameters = []
    for name, field in OPTIONS.items():
        if name in leave_out:
            continue
        shown = shown_value(recipe, name) if recipe else False
        panel = PANEL_OF.get(name, "Advanced")
        help = ONE_LINE_HELP.get(name, field.metadata["help"])  # the first screen's a line each
        option = typer.Option(None, *flag_of(name).split(" "), help=help, show_default=shown,
                              min=field.metadata["cli_min"], rich_help_panel=panel)
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=Optional[TYPES.get(field.type, str)]))
    out = typer.Option(None, "--out", show_default=False, rich_help_panel="Output",
                       help="Run folder (must be new or empty). Default: runs/<name>-<time>.")
    resume = typer.Option(None, "--resume", show_default=False, metavar="RUN", rich_help_panel="Output",
                          help="Continue the stopped run in folder RUN from its last finished epoch, as it was set up "
                               "(the same as `fastft resume RUN`; no other option goes with it).")
    parameters.append(inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default=out, annotation=Optional[str]))
    if resumable:
        parameters.append(inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=resume,
                                            annotation=Optional[Path]))
    return parameters


def _train(recipe: Recipe, options: dict) -> None:
    out, resume = options.pop("out"), options.pop("resume", None)
    if resume is not None and (out is not None or any(v is not None for v in options.values())):
        raise UsageError("--resume continues a run as it was set up; drop the other options (a new run: leave out --resume)")
    recipe = recipe.replace(source="command-line options", **options)  # bad values fail here, before the imports
    recipe.check()
    from fastft.train.pipeline import train

    train(recipe, out, resume=resume)  # Ctrl-C: Interrupted, one line and exit 130 (cli/common.py's user_errors)


def _describe(path: Path) -> str:
    try:
        return read_recipe_file(path).description
    except UsageError as e:  # shown, and raised again when the command runs
        return f"(broken recipe: {e})"


def _read_or_default(path: Path) -> Recipe | None:
    try:
        return read_recipe_file(path)
    except UsageError:
        return None  # the command reports it when run


RECIPES, REFUSED = find_recipes(reserved=COMMANDS - {"train"})  # `fastft train` is recipes/train.toml


def run_name(folder: str) -> str:
    """A run's name from its data folder: my photos/ -> my_photos."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(folder).expanduser().resolve().name).strip("._") or "data"


def train_folder(data, **options):
    recipe = read_recipe_file(RECIPES["train"])
    if Path(data).suffix.lower() == ".csv" and options.get("labels") is None:  # `fastft train labels.csv`
        data, options["labels"] = str(Path(data).parent), str(data)
    _train(recipe.replace(name=run_name(data), data=str(data)), options)


if "train" in RECIPES:  # the shipped recipes/train.toml
    command("train", f"{_describe(RECIPES['train'])}. Runs are named after the folder: runs/<folder>-<time>/.",
            train_folder, [argument("data", "Your data: a folder of class folders (split by --valid-pct), or of "
                                             "train/ and test/ class folders; or a CSV file of image paths and "
                                             "labels (as --labels).")]
            + training_options(_read_or_default(RECIPES["train"]), leave_out={"data"}))


def _recipe_command(name: str, path: Path) -> None:
    def run_recipe(**options):
        _train(read_recipe_file(path), options)
    command(name, f"{_describe(path)} (recipe: {path.name})", run_recipe, training_options(_read_or_default(path)))


for _name, _path in RECIPES.items():
    if _name != "train":
        _recipe_command(_name, _path)


def run_file(recipe, **options):
    _train(load_recipe(recipe), options)


def lr_find(recipe, **options):
    from fastft.train.lr_finder import lr_find_only

    out = options.pop("out")
    if options.pop("epochs") is not None or options.pop("tta") is not None:
        raise UsageError("--epochs and --tta do nothing in lr-find (it takes a number of steps bounded by the data, "
                         "then stops); drop them")
    recipe = load_recipe(recipe).replace(source="command-line options", **options)
    recipe.check()
    suggestion = lr_find_only(recipe, out)
    typer.echo(f"suggested lr {suggestion:.2e} (fastai's valley); plot in lr_find.png")


def compare(recipe, **options):
    from fastft.train.compare import compare as compare_settings, settings_to_compare

    out, strategies, augs = options.pop("out"), options.pop("strategy"), options.pop("aug")
    base = load_recipe(recipe).replace(source="command-line options", **options)
    compare_settings(base, settings_to_compare(base, strategies, augs), out)


RECIPE_HELP = "A recipe name (see `fastft recipes`) or a .toml file."
command("run", "Run any recipe file; a run's saved recipe.toml reproduces that run.", run_file,
        [argument("recipe", "A recipe .toml file, e.g. a run's saved recipe.toml, or a recipe name.")] + training_options())
command("lr-find", "Run fastai's LR finder on a recipe's data and model: prints the suggestion, saves lr_find.png "
        "in --out. It takes at most 100 steps, fewer on a small dataset.", lr_find,
        [argument("recipe", RECIPE_HELP)] + training_options(resumable=False))
command("compare", "Train a recipe once per setting, same data, seed and epochs: --strategy a,b,... or --aug a,b,... "
        "(commas separate settings). Each run goes to OUT/<setting>/; the table to OUT/compare.json and the curves "
        "to OUT/compare.png.", compare, [argument("recipe", RECIPE_HELP)] + training_options(resumable=False))


@app.command(name="resume")
@user_errors
def resume_run(run: Path = typer.Argument(..., metavar="RUN", help="The folder of a run that stopped (Ctrl-C, a crash, "
                                                                     "a kill) before it finished.")):
    """Continue a stopped run from its last finished epoch: the same phases, learning-rate schedule and random
    draws, as if it had never stopped."""
    _train(Recipe(), {"out": None, "resume": run})


@app.command(name="inspect")
@user_errors
def inspect_data(
    data: Path = typer.Argument(..., metavar="DATA", help="A data folder (class folders, or train/ and test/), or a labels CSV."),
    labels: Optional[str] = typer.Option(None, "--labels", help=OPTIONS["labels"].metadata["help"]),
    image_col: str = typer.Option("", "--image-col", help=OPTIONS["image_col"].metadata["help"]),
    label_col: str = typer.Option("", "--label-col", help=OPTIONS["label_col"].metadata["help"]),
    label_delim: str = typer.Option("", "--label-delim", help=OPTIONS["label_delim"].metadata["help"]),
    valid_pct: float = typer.Option(0.2, "--valid-pct", help=OPTIONS["valid_pct"].metadata["help"]),
    seed: int = typer.Option(42, "--seed", help="The seed the split is drawn with (as training's --seed)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    out: Optional[str] = typer.Option(None, "--out", help="Also write report.json and samples.png (a grid of "
                                                           "images per class) to this new folder. Default: print only "
                                                           "(--labels-check: runs/labels-check-<time>)."),
    labels_check: bool = typer.Option(False, "--labels-check", help="Also list the training images whose given label "
                                      "looks wrong (confident learning, cleanlab, on out-of-fold predictions of linear "
                                      "probes on the frozen backbone's features): label_issues.csv and "
                                      "label_issues.png."),
    arch: Optional[str] = typer.Option(None, "--arch", help="--labels-check: the backbone (default: the train "
                                                            "recipe's). " + OPTIONS["arch"].metadata["help"]),
    weights: Optional[str] = typer.Option(None, "--weights", help="--labels-check: " + OPTIONS["weights"].metadata["help"]),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="--labels-check: "
                                    + OPTIONS["pretrained"].metadata["help"]),
    size: Optional[int] = typer.Option(None, "--size", min=1, help="--labels-check: " + OPTIONS["size"].metadata["help"]),
):
    """What a dataset holds, before training: images per class and split, empty class folders, unreadable files,
    sizes and modes, exact duplicates (within a split, and train/test leakage), tiny classes; with --labels-check,
    the training images whose labels look wrong. Changes nothing in DATA; writes files only with --out (or
    --labels-check)."""
    from fastft.data.folders import split_files
    from fastft.data.inspect import as_text, report, sample_grid

    if data.suffix.lower() == ".csv" and labels is None:
        data, labels = data.parent, str(data)
    recipe = Recipe().replace(source="command-line options", data=str(data), labels=labels, image_col=image_col,
                              label_col=label_col, label_delim=label_delim, valid_pct=valid_pct, seed=seed)
    from fastft.atomic import write_json
    from fastft.data.images import large_images_allowed
    from fastft.run_folder import RunFolder, check_new_out, new_run_folder

    check_new_out(out)
    if labels_check:  # the recipe `fastft train DATA` would run, with these options
        recipe = load_recipe("train").replace(
            source="command-line options", data=str(data), labels=labels, image_col=image_col, label_col=label_col,
            label_delim=label_delim, valid_pct=valid_pct, seed=seed, pretrained=pretrained,
            **{k: v for k, v in {"arch": arch, "weights": weights, "size": size}.items() if v is not None})
    split = split_files(data, recipe, empty_ok=True)
    with large_images_allowed():  # the user's own photos, as a run reads them
        result = report(split, data)
        check = None
        if labels_check:
            from fastft.train import label_issues

            try:
                check = label_issues.check_folder(recipe)
            except KeyboardInterrupt:
                raise InterruptedBeforeTraining(
                    f"interrupted while checking the labels: nothing was written and {data} is unchanged; the frozen "
                    "features, once their pass finished, are cached, so starting again skips it") from None
            result["label_issues"] = [{"file": str(s.file), "given_label": s.given, "suggested_label": s.suggested,
                                       "score": round(s.score, 4)} for s in check.suspects]
            out = out or str(new_run_folder(None, "labels-check"))
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            write_json(Path(out) / "report.json", result)
            sample_grid(split, Path(out) / "samples.png")
            if check is not None:
                folder = RunFolder(Path(out))
                label_issues.write_report(check, folder.label_issues, folder.suspects)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    shown = as_text(result) + ("\n" + label_issues.as_text(check) if check is not None else "")
    written = (f"\nreport.json, samples.png{', label_issues.csv and label_issues.png' if check else ''} in {out} "
               f"(nothing in {data} was changed)" if out else "")
    typer.echo(shown + written)


@app.command(name="recipes")
@user_errors
def list_recipes():
    """List the recipes and their key settings."""
    for name, path in RECIPES.items():
        recipe = _read_or_default(path)
        typer.echo(f"{name:<10} {_describe(path)}")
        if recipe:
            usage = "fastft train DIR" if name == "train" else f"fastft {name}"
            typer.echo(f"{'':<10} {usage}: {recipe.arch}, {recipe.strategy}, {recipe.epochs} epochs, lr "
                       f"{shown_value(recipe, 'lr')}, {recipe.size} px, --aug {recipe.aug}, batch {recipe.bs}")
