"""The `fastft` command: one subcommand per recipes/*.toml, plus run, predict and recipes.

The CLI parses and hands a Recipe to the library. It imports only Typer and the recipe reader up
front, so `--help` and argument errors stay fast; fastai and timm load inside the commands.
"""
from __future__ import annotations

import functools
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from fastft import __version__
from fastft.data.augment import AUG_HELP
from fastft.errors import UsageError
from fastft.recipe import load_recipe, read_recipe_file, recipe_files
from fastft.train.strategies import STRATEGIES

# Noise from the libraries fastft drives, not something a user can act on.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Transfer learning for images: the textbook recipes, one command each (fastai + timm).")

# Options every training command takes: name -> (type, flag, help). None means "not given": the
# recipe file's value (or the built-in default) stands.
TRAIN_OPTIONS = {
    "data": (str, "--data", "Local dataset folder: train/ and test/ (or valid/) of class folders, or class folders alone. Default: download the recipe's dataset."),
    "data_url": (str, "--data-url", "Download the dataset archive from this URL instead of the recipe's."),
    "epochs": (int, "--epochs", "Total epochs, frozen phases included."),
    "lr": (str, "--lr", "The head's peak learning rate; 0: the strategy's default; auto: run fastai's LR finder first."),
    "bs": (int, "--bs", "Batch size."),
    "wd": (float, "--wd", "Decoupled weight decay (fastai's default 0.01; the d2l strategy keeps its own 1e-3)."),
    "label_smoothing": (float, "--label-smoothing", "Label smoothing eps: 0 plain cross-entropy, 0.1 a common choice against overconfidence."),
    "tta": (bool, "--tta/--no-tta", "Flip TTA: report the final test accuracy, and predict, averaging each image with its mirror."),
    "size": (int, "--size", "Input side in pixels (train crops and test centre-crops to it)."),
    "arch": (str, "--arch", "Any timm model name, with or without weights tag: resnet18, resnet18.tv_in1k, tf_efficientnet_lite0."),
    "weights": (str, "--weights", "Local timm state dict (.safetensors or .pth) to start from instead of the hub."),
    "pretrained": (bool, "--pretrained/--no-pretrained", "Start from ImageNet weights, or from random init."),
    "head_dropout": (float, "--head-dropout", "Dropout in fastai's head (its ps): p/2 before the hidden layer, p before the last."),
    "strategy": (str, "--strategy", "Training schedule. " + "; ".join(f"{k}: {v.help}" for k, v in STRATEGIES.items())),
    "freeze_epochs": (int, "--freeze-epochs", "fine-tune, keras: epochs that train only the head (part of --epochs)."),
    "unfreeze": (int, "--unfreeze", "keras: stages unfrozen from the top after the head-only phase."),
    "aug": (str, "--aug", AUG_HELP),
    "valid_pct": (float, "--valid-pct", "Test share when the data folder has no train/test split."),
    "limit": (int, "--limit", "A seeded, class-stratified sample of at most N train and N test images (quick runs)."),
    "seed": (int, "--seed", "Random seed: the same seed gives the same numbers on the same machine."),
    "workers": (int, "--workers", "DataLoader worker processes (0: load in the main process)."),
    "cache": (bool, "--cache/--no-cache", "Decode each image once into memory (and ~/.cache/fastft, or $FASTFT_CACHE) when no item transform is random, instead of every epoch."),
    "device": (str, "--device", "auto, cpu, cuda, cuda:N or mps."),
    "precision": (str, "--precision", "auto, fp32, bf16 or fp16 (auto: bf16 on GPUs and CPUs that have it in hardware; else fp16 on GPUs, fp32 on CPU and MPS)."),
    "channels_last": (bool, "--channels-last/--no-channels-last", "Model and batches in channels-last memory format: the same arithmetic, often faster convolutions."),
}


def _option(name: str, kind: type, flag: str, help: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                             default=typer.Option(None, *flag.split(" "), help=help, show_default=False))


OUT_OPTION = inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                               default=typer.Option(None, "--out", show_default=False,
                                                    help="Run folder (must be new or empty). Default: runs/<recipe>-<time>."))


def user_errors(command):
    """Mistakes a user can fix print as one line and exit 2; bugs keep their traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UsageError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    return wrapper


def _train(recipe, options: dict) -> None:
    from fastft.train.run import Interrupted, train

    out = options.pop("out")
    recipe = recipe.replace(source="command-line options", **options)
    try:
        train(recipe, out)
    except Interrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(130) from None


def _recipe_command(name: str, path: Path):
    def command(**options):
        _train(read_recipe_file(path), options)
    command.__signature__ = inspect.Signature([_option(k, *spec) for k, spec in TRAIN_OPTIONS.items()] + [OUT_OPTION])
    command.__name__ = name
    return user_errors(command)


def _describe(path: Path) -> str:
    try:
        return read_recipe_file(path).description
    except UsageError as e:  # shown, and raised again when the command runs
        return f"(broken recipe: {e})"


for _name, _path in recipe_files().items():
    app.command(name=_name, help=f"{_describe(_path)} (recipe: {_path.name})")(_recipe_command(_name, _path))


def _recipe_argument(help: str) -> inspect.Parameter:
    return inspect.Parameter("recipe", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                             default=typer.Argument(..., help=help, show_default=False))


def _with_recipe_options(function, recipe_help: str):
    """Give `function(recipe, **options)` the recipe argument and every training option."""
    function.__signature__ = inspect.Signature([_recipe_argument(recipe_help)]
                                               + [_option(k, *spec) for k, spec in TRAIN_OPTIONS.items()] + [OUT_OPTION])
    return user_errors(function)


def run_file(recipe, **options):
    _train(load_recipe(recipe), options)


def lr_find(recipe, **options):
    from fastft.train.run import lr_find_only

    out = options.pop("out")
    suggestion = lr_find_only(load_recipe(recipe).replace(source="command-line options", **options), out)
    typer.echo(f"suggested lr {suggestion:.2e} (fastai's valley); plot in lr_find.png")


def compare(recipe, **options):
    from fastft.train.compare import compare as compare_settings, settings_to_compare

    out, strategies, augs = options.pop("out"), options.pop("strategy"), options.pop("aug")
    base = load_recipe(recipe).replace(source="command-line options", **options)
    compare_settings(base, settings_to_compare(base, strategies, augs), out)


RECIPE_HELP = "A recipe name (see `fastft recipes`) or a .toml file."
app.command(name="run", help="Run any recipe file; a run's saved recipe.toml reproduces that run.")(
    _with_recipe_options(run_file, "A recipe .toml file, e.g. a run's saved recipe.toml, or a recipe name."))
app.command(name="lr-find", help="Run fastai's LR finder on a recipe's data and model: prints the suggestion, "
            "saves lr_find.png in --out.")(_with_recipe_options(lr_find, RECIPE_HELP))
app.command(name="compare", help="Train a recipe once per setting, same data, seed and epochs: --strategy a,b,... or "
            "--aug a,b,... (commas separate settings). Each run goes to OUT/<setting>/; the table to "
            "OUT/compare.json and the curves to OUT/compare.png.")(_with_recipe_options(compare, RECIPE_HELP))


@app.command(name="recipes")
@user_errors
def list_recipes():
    """List the recipes, one line each."""
    for name, path in recipe_files().items():
        typer.echo(f"{name:<12} {_describe(path)}")


@app.command()
@user_errors
def predict(
    model: Path = typer.Argument(..., help="A run folder (a run's --out), model.json, model.onnx, or model.pkl."),
    paths: List[Path] = typer.Argument(..., help="Image files and folders (recursed)."),
    top: int = typer.Option(1, "--top-k", min=1, help="Show the K most likely labels."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON list at the end."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV rows: path, then label and probability pairs."),
    bs: int = typer.Option(64, "--bs", min=1, help="Images per batch."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Average each prediction with its mirror image's. Default: as the model's run did (its recipe's tta)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a fastai model.pkl (a pickle runs code)."),
):
    """Label images: path, label and probability per line, as results come."""
    import csv

    from fastft.deploy.predict import predict as predict_images, top_k

    if as_json and as_csv:
        raise UsageError("--json and --csv are exclusive; pick one")
    results = predict_images(model, paths, bs=bs, tta=tta, trust_pickle=trust_pickle, progress=sys.stderr.isatty())
    if as_json:
        typer.echo(json.dumps([{**r, "top": top_k(r, top)} for r in results], indent=2))
        return
    writer = csv.writer(sys.stdout) if as_csv else None
    if writer:
        writer.writerow(["path"] + [f"{name}{i}" for i in range(1, top + 1) for name in ("label", "probability")])
    for r in results:
        best = top_k(r, top)
        if writer:
            writer.writerow([r["path"]] + [v for label, p in best for v in (label, f"{p:.6f}")])
        else:
            typer.echo(r["path"] + "".join(f"\t{label}\t{p:.3f}" for label, p in best))
        sys.stdout.flush()


@app.command()
@user_errors
def export(
    model: Path = typer.Argument(..., help="A run folder (a run's --out) or its model.json."),
    format: str = typer.Option("onnx", "--format", help="Export format: onnx."),
):
    """Export a model: model.onnx (dynamic batch, probabilities out) beside the bundle, checked in
    ONNX Runtime against PyTorch."""
    from fastft.deploy.export import TOLERANCE, export_onnx

    if format != "onnx":
        raise UsageError(f"unknown export format '{format}'; formats: onnx")
    path, difference, checked = export_onnx(model)
    inputs = f"{checked} real images" if checked else "random inputs (the run's data is not at hand)"
    typer.echo(f"wrote {path}; max abs difference of probabilities vs PyTorch on {inputs}: {difference:.2e}")
    if difference > TOLERANCE:
        typer.echo(f"error: ONNX Runtime and PyTorch differ by {difference:.2e} > {TOLERANCE:.0e}", err=True)
        raise typer.Exit(1)


@app.command()
@user_errors
def evaluate(
    model: Path = typer.Argument(..., help="A run folder, model.json, model.onnx, or model.pkl."),
    data: Path = typer.Argument(..., help="A folder of class folders, or one with test/ (or valid/)."),
    out: Optional[str] = typer.Option(None, "--out", help="Report folder. Default: a new eval-<data> folder beside the model."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    bs: int = typer.Option(64, "--bs", min=1),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Average each prediction with its mirror image's. Default: as the model's run did (its recipe's tta)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a fastai model.pkl (a pickle runs code)."),
):
    """Accuracy, per-class precision and recall, confusion.png and top_losses.png."""
    from fastft.deploy.evaluate import evaluate as evaluate_model

    report = evaluate_model(model, data, out, bs=bs, tta=tta, trust_pickle=trust_pickle)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"accuracy {report['accuracy']:.3f} on {report['images']} images{' (flip TTA)' if report['tta'] else ''}")
    typer.echo(f"{'class':<20} {'precision':>9} {'recall':>7} {'support':>7}")
    for name, row in report["per_class"].items():
        typer.echo(f"{name:<20} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['support']:>7}")
    typer.echo(f"confusion.png, top_losses.png and evaluation.json in {report['folder']}")


@app.command()
@user_errors
def augs(
    spec: str = typer.Argument(..., help=AUG_HELP),
    image: Path = typer.Argument(..., help="The image to augment."),
    out: Path = typer.Option(Path("augs.png"), "--out", help="The PNG file to write."),
    size: int = typer.Option(200, "--size", min=8, help="Side of each augmented image in pixels."),
    rows: int = typer.Option(2, "--rows", min=1),
    cols: int = typer.Option(4, "--cols", min=1),
    seed: int = typer.Option(0, "--seed"),
):
    """Draw a grid of augmented versions of IMAGE (d2l's `apply`), for any --aug spec."""
    from fastft.data.augment import parse_aug, preview_grid
    from fastft.data.images import unreadable_reason

    plan = parse_aug(spec)
    if not image.is_file() or (why := unreadable_reason(image)):
        raise UsageError(f"cannot read image {image} ({'no such file' if not image.is_file() else why}); pass an image file")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out} must name a .png file")
    preview_grid(plan, image, out, size=size, rows=rows, cols=cols, seed=seed)
    typer.echo(f"wrote {out}")


def _show_version(value: bool):
    if value:
        typer.echo(f"fastft {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                             help="Print the version and exit.")):
    pass


def main():
    try:
        app()
    except UsageError as e:  # raised while building the commands, e.g. a broken recipe file
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
