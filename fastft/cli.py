"""The `fastft` command: `train DIR` for your own photos, one command per recipe (hotdog, cifar, ...), and
run, compare, lr-find, predict, evaluate, export, augs and recipes.

The CLI parses and hands a Recipe to the library. Every training option is a recipe key, with its help
text from fastft/recipe.py; a recipe command's --help shows that recipe's values. Only Typer and the recipe
reader are imported up front, so `--help` and argument errors stay fast; fastai and timm load inside the
commands that need them.
"""
from __future__ import annotations

import errno
import functools
import gc
import inspect
import json
import re
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from fastft.version import __version__
from fastft.data.augment import AUG_HELP
from fastft.errors import Interrupted, UsageError
from fastft.recipe import OPTIONS, Recipe, find_recipes, load_recipe, read_recipe_file
from fastft.schedules import STRATEGIES

try:  # typer >= 0.22 carries its own click, whose errors derive from TyperException; older typer uses click's
    from typer import TyperException as CommandLineError
except ImportError:
    from click import ClickException as CommandLineError

# Plain click help (rich_markup_mode=None): it wraps long help at word boundaries at any width.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Transfer learning for images: `fastft train DIR` on your own photos, and the textbook "
                       "recipes, one command each (fastai + timm).")

COMMANDS = frozenset({"train", "run", "compare", "lr-find", "recipes", "predict", "evaluate", "export", "augs", "resume",
                      "inspect", "explain", "serve"})
TYPES = {"str": str, "int": int, "float": float, "bool": bool}  # a recipe key's type on the command line (lr: str)


def user_errors(command):
    """Mistakes a user can fix print as one line and exit 2; bugs keep their traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UsageError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            typer.echo(f"error: no space left on the disk while writing {e.filename or 'a file'}; free some space and run "
                       "the command again (every file written before is whole; a stopped training run continues with "
                       "`fastft resume RUN`)", err=True)
            raise typer.Exit(2) from None
    return wrapper


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
        strategy = "lp-ft" if recipe.strategy == "auto" else recipe.strategy  # auto fine-tunes with lp-ft, if at all
        return f"{STRATEGIES[strategy].default_lr:g} ({strategy}'s default)"
    if name == "data" and not value:
        return f"download {recipe.dataset or recipe.name}" if recipe.data_url else "none"
    return str(value) if value != "" else "none"


def training_options(recipe: Recipe | None = None, leave_out=(), resumable: bool = True) -> list[inspect.Parameter]:
    """One option per recipe key (and --out). None means "not given": the recipe's value stands. With a
    recipe, --help shows its values as the defaults."""
    parameters = []
    for name, field in OPTIONS.items():
        if name in leave_out:
            continue
        shown = shown_value(recipe, name) if recipe else False
        help = AUG_HELP if name == "aug" else field.metadata["help"]  # every preset, from the module that parses them
        option = typer.Option(None, *flag_of(name).split(" "), help=help, show_default=shown,
                              min=field.metadata["cli_min"])
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=Optional[TYPES.get(field.type, str)]))
    out = typer.Option(None, "--out", show_default=False,
                       help="Run folder (must be new or empty). Default: runs/<name>-<time>.")
    resume = typer.Option(None, "--resume", show_default=False, metavar="RUN",
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
    from fastft.train.run import train

    try:
        train(recipe, out, resume=resume)
    except Interrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(130) from None


def _argument(name: str, help: str, annotation=str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation,
                             default=typer.Argument(..., help=help, show_default=False, metavar=name.upper()))


def command(name: str, help: str, function, parameters: list[inspect.Parameter]) -> None:
    """Register `function(**parameters)` as `fastft NAME`, with user errors as one line."""
    function.__signature__ = inspect.Signature(parameters)
    function.__name__ = name.replace("-", "_")
    app.command(name=name, help=help)(user_errors(function))


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
            train_folder, [_argument("data", "Your data: a folder of class folders (split by --valid-pct), or of "
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
    from fastft.train.run import lr_find_only

    out = options.pop("out")
    if options.pop("epochs") is not None or options.pop("tta") is not None:
        raise UsageError("--epochs and --tta do nothing in lr-find (it takes a number of steps bounded by the data, "
                         "then stops); drop them")
    suggestion = lr_find_only(load_recipe(recipe).replace(source="command-line options", **options), out)
    typer.echo(f"suggested lr {suggestion:.2e} (fastai's valley); plot in lr_find.png")


def compare(recipe, **options):
    from fastft.train.compare import compare as compare_settings, settings_to_compare

    out, strategies, augs = options.pop("out"), options.pop("strategy"), options.pop("aug")
    base = load_recipe(recipe).replace(source="command-line options", **options)
    compare_settings(base, settings_to_compare(base, strategies, augs), out)


RECIPE_HELP = "A recipe name (see `fastft recipes`) or a .toml file."
command("run", "Run any recipe file; a run's saved recipe.toml reproduces that run.", run_file,
        [_argument("recipe", "A recipe .toml file, e.g. a run's saved recipe.toml, or a recipe name.")] + training_options())
command("lr-find", "Run fastai's LR finder on a recipe's data and model: prints the suggestion, saves lr_find.png "
        "in --out. It takes at most 100 steps, fewer on a small dataset.", lr_find,
        [_argument("recipe", RECIPE_HELP)] + training_options(resumable=False))
command("compare", "Train a recipe once per setting, same data, seed and epochs: --strategy a,b,... or --aug a,b,... "
        "(commas separate settings). Each run goes to OUT/<setting>/; the table to OUT/compare.json and the curves "
        "to OUT/compare.png.", compare, [_argument("recipe", RECIPE_HELP)] + training_options(resumable=False))


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

            check = label_issues.check_folder(recipe)
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


@app.command()
@user_errors
def predict(
    model: Path = typer.Argument(..., metavar="MODEL", help="A run folder (a run's --out), model.json, model.onnx, or model.pkl."),
    paths: List[Path] = typer.Argument(..., metavar="PATHS", help="Image files and folders (recursed)."),
    top: Optional[int] = typer.Option(None, "--top-k", min=1, help="Show the K most likely labels. Default: the most "
                                                                   "likely one; multi-label: every label at or above "
                                                                   "the run's threshold."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON list at the end."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV rows: path, then label and probability pairs."),
    bs: int = typer.Option(64, "--bs", min=1, help="Images per batch."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Average each prediction with its mirror image's. Default: as the model's run did (its recipe's tta)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a fastai model.pkl (a pickle runs code)."),
    min_confidence: Optional[float] = typer.Option(None, "--min-confidence", min=0.0, max=1.0,
                                                   help="Report a prediction whose (calibrated) top probability is "
                                                        "below this as 'uncertain'. Default: off."),
):
    """Label images: path, label and probability per line, as results come."""
    import csv

    from fastft.deploy.predict import predict as predict_images, shown_labels

    if as_json and as_csv:
        raise UsageError("--json and --csv are exclusive; pick one")
    results = predict_images(model, paths, bs=bs, tta=tta, trust_pickle=trust_pickle, progress=sys.stderr.isatty(),
                             min_confidence=min_confidence)
    if as_json:
        typer.echo(json.dumps([{**r, "top": shown_labels(r, top)} for r in results], indent=2))
        return
    writer = csv.writer(sys.stdout) if as_csv else None
    for number, r in enumerate(results):
        best = shown_labels(r, top)
        if writer and number == 0:
            multi = "labels" in r
            writer.writerow(["path", "labels", *r["probabilities"]] if multi else
                            ["path"] + [f"{name}{i}" for i in range(1, len(best) + 1) for name in ("label", "probability")])
        if writer and "labels" in r:  # multi-label: the labels shown, then every label's probability
            writer.writerow([r["path"], ";".join(label for label, _ in best), *(f"{p:.6f}" for p in r["probabilities"].values())])
        elif writer:
            writer.writerow([r["path"]] + [v for label, p in best for v in (label, f"{p:.6f}")])
        else:
            typer.echo(r["path"] + "".join(f"\t{label}\t{p:.3f}" for label, p in best))
        sys.stdout.flush()


@app.command()
@user_errors
def export(
    model: Path = typer.Argument(..., metavar="MODEL", help="A run folder (a run's --out) or its model.json."),
    format: str = typer.Option("onnx", "--format", help="onnx: model.onnx beside the bundle; hub: the folder timm "
                                                         "and the Hugging Face hub read (config.json, model.safetensors, "
                                                         "README.md)."),
    out: Optional[str] = typer.Option(None, "--out", help="hub: the folder to write (new or empty). Default: "
                                                           "hub-<time> beside the model."),
):
    """Export a model: ONNX (dynamic batch, probabilities out, checked in ONNX Runtime against PyTorch), or the
    hub layout that plain timm loads (`timm.create_model("local-dir:DIR", pretrained=True)`)."""
    if format == "hub":
        from fastft.deploy.hub import export_hub

        folder = export_hub(model, out)
        typer.echo(f"wrote {folder}: load it with timm.create_model(\"local-dir:{folder}\", pretrained=True); upload "
                   f"it with "
                   f"huggingface_hub.upload_folder(repo_id=..., folder_path=\"{folder}\")")
        return
    from fastft.deploy.export import TOLERANCE, export_onnx

    if format != "onnx":
        raise UsageError(f"unknown export format '{format}'; formats: onnx, hub")
    if out is not None:
        raise UsageError("--out is for --format hub; ONNX goes beside the bundle (model.onnx)")
    path, difference, checked = export_onnx(model)
    inputs = f"{checked} real images" if checked else "random inputs (the run's data is not at hand)"
    typer.echo(f"wrote {path}; max abs difference of probabilities vs PyTorch on {inputs}: {difference:.2e}")
    if difference > TOLERANCE:
        typer.echo(f"error: ONNX Runtime and PyTorch differ by {difference:.2e} > {TOLERANCE:.0e}", err=True)
        raise typer.Exit(1)


@app.command()
@user_errors
def explain(
    model: Path = typer.Argument(..., metavar="MODEL", help="A run folder (a run's --out) or its model.json."),
    images: List[Path] = typer.Argument(..., metavar="IMAGES", help="Image files and folders (recursed)."),
    out: Optional[str] = typer.Option(None, "--out", help="Folder for the pictures (new or empty). Default: "
                                                           "explain-<time> beside the model."),
    class_name: Optional[str] = typer.Option(None, "--class", help="Explain this class instead of the predicted one."),
    layer: Optional[str] = typer.Option(None, "--layer", help="The module Grad-CAM reads (default: the last feature "
                                                               "stage timm reports for the architecture)."),
    top: int = typer.Option(3, "--top-k", min=1, help="Probabilities shown per image."),
):
    """Grad-CAM: each image with a heat map of where the model looked for the predicted class (or --class), and
    its top-k probabilities. Needs pip install 'fastft[explain]'."""
    from fastft.deploy.explain import explain as explain_images

    folder, results = explain_images(model, images, out, class_name, layer, top)
    for r in results:
        typer.echo(f"{r['path']}\t{r['class']}\t{r['png']}")
    typer.echo(f"{len(results)} picture(s) and explain.json in {folder}")


@app.command()
@user_errors
def serve(
    model: Path = typer.Argument(..., metavar="MODEL", help="A run folder (a run's --out) or its model.json."),
    host: str = typer.Option("127.0.0.1", "--host", help="Where to listen: 127.0.0.1 (this machine only); "
                                                          "0.0.0.0 opens it to the network."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    max_upload: float = typer.Option(10.0, "--max-upload", min=0.0, help="Largest upload in MB."),
    allow_dir: Optional[Path] = typer.Option(None, "--allow-dir", help="Let the page name image files under this "
                                             "folder (symlinks followed, nothing outside it). Default: uploads only."),
    allow_host: list[str] = typer.Option([], "--allow-host", help="Another host name clients may use to reach the "
                                         "server (a reverse proxy's, a LAN name); repeatable."),
):
    """A web page for one model: drop or pick an image and see its top labels with probability bars, and the
    Grad-CAM picture when the explain extra is there; POST /predict (with the header X-Fastft: 1) answers as
    `fastft predict --json`. Needs pip install 'fastft[serve]'."""
    from fastft.deploy.serve import serve as serve_model

    serve_model(model, host, port, max_upload, allow_dir, tuple(allow_host))


@app.command()
@user_errors
def evaluate(
    model: Path = typer.Argument(..., metavar="MODEL", help="A run folder, model.json, model.onnx, or model.pkl."),
    data: Optional[Path] = typer.Argument(None, metavar="[DATA]", help="A folder of class folders, or one with test/ (or valid/), or a labels CSV. "
                                          "The run's own unsplit data scores only the images the run held out. "
                                          "Default: the run's own data (its recipe.toml's), so its test split."),
    out: Optional[str] = typer.Option(None, "--out", help="Report folder. Default: a new eval-<data> folder beside the model."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    bs: int = typer.Option(64, "--bs", min=1),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Average each prediction with its mirror image's. Default: as the model's run did (its recipe's tta)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a fastai model.pkl (a pickle runs code)."),
):
    """Accuracy, balanced accuracy, macro F1, per-class precision and recall (multi-label: micro/macro F1, mAP,
    per-label precision and recall), confusion.png and top_losses.png."""
    from fastft.deploy.evaluate import evaluate as evaluate_model

    report = evaluate_model(model, data, out, bs=bs, tta=tta, trust_pickle=trust_pickle)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"accuracy {report['accuracy']:.3f} on {report['images']} images{' (flip TTA)' if report['tta'] else ''}: "
               f"{report['scored']}")
    rows = report.get("per_class") or report["per_label"]
    if "per_label" in report:
        typer.echo(f"threshold {report['threshold']:.2f}, micro F1 {report['micro_f1']:.3f}, macro F1 "
                   f"{report['macro_f1']:.3f}, mAP {report['mAP']:.3f}")
    else:
        typer.echo(f"balanced accuracy {report['balanced_accuracy']:.3f}, macro F1 {report['macro_f1']:.3f}")
    typer.echo(f"{'label' if 'per_label' in report else 'class':<20} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>7}")
    for name, row in rows.items():
        typer.echo(f"{name:<20} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>7.3f} {row['support']:>7}")
    typer.echo(f"{', '.join(report['pictures'])} and evaluation.json in {report['folder']}")


@app.command()
@user_errors
def augs(
    spec: str = typer.Argument(..., metavar="SPEC", help=AUG_HELP),
    image: Path = typer.Argument(..., metavar="IMAGE", help="The image to augment."),
    out: Path = typer.Option(Path("augs.png"), "--out", help="The PNG file to write (must not exist yet)."),
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
    if out.exists():
        raise UsageError(f"--out {out} already exists; choose a new file name (nothing was overwritten)")
    preview_grid(plan, image, out, size=size, rows=rows, cols=cols, seed=seed)
    typer.echo(f"wrote {out}")


def _show_version(value: bool):
    if value:
        typer.echo(f"fastft {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                             help="Print the version and exit.")):
    for line in REFUSED:
        typer.echo(f"warning: {line}", err=True)


def main():
    """The `fastft` command's process. Only here, where the process is fastft's own, are warnings filtered: noise from
    the libraries fastft drives, not something a user can act on. `import fastft` changes no warning filter."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
    try:
        code = app(standalone_mode=False)
    except CommandLineError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `fastft` alone: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        # a bad argument or option: one line that names it and where the help is
        where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        print(f"error: {e.format_message()}{where}", file=sys.stderr)
        code = 2
    except typer.Abort:
        code = 130
    except UsageError as e:  # raised while building the commands, e.g. a broken recipe file
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        skip_exit_collection()
    sys.exit(code if isinstance(code, int) else 0)


def skip_exit_collection() -> None:
    """The command is done: spare the interpreter's shutdown a walk over every object torch, timm and fastai made.
    Its final garbage collections over that half a million objects take about 1.3 s of each command's wall time on
    a 2-core CPU (bench/gpu.py, commands table); frozen objects are skipped by them. Nothing fastft does at exit
    needs them collected: files are closed by `with`, background writers are threads that Python joins first,
    atexit handlers still run."""
    gc.freeze()
