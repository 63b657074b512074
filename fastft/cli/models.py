"""The commands on a trained model: predict, export, explain, serve, evaluate; runs, which lists the runs; and augs,
which draws a --aug spec.
Each imports what it needs when it runs."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from fastft.cli.common import app, user_errors
from fastft.data.augment import AUG_HELP
from fastft.deploy.server_limits import MAX_CONNECTIONS, MAX_UPLOAD_MB, READ_TIMEOUT_S
from fastft.errors import UsageError


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

    from fastft.deploy.predict import UNCERTAIN, predict as predict_images, shown_labels

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
        elif r["label"] == UNCERTAIN and top is None:  # its label names its top guess and probability already
            typer.echo(f"{r['path']}\t{best[0][0]}")
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
    max_upload: float = typer.Option(MAX_UPLOAD_MB, "--max-upload", min=0.0, help="Largest upload in MB."),
    allow_dir: Optional[Path] = typer.Option(None, "--allow-dir", help="Let the page name image files under this "
                                             "folder (symlinks followed, nothing outside it). Default: uploads only."),
    allow_host: list[str] = typer.Option([], "--allow-host", help="Another host name clients may use to reach the "
                                         "server (a reverse proxy's, a LAN name); repeatable."),
    read_timeout: float = typer.Option(READ_TIMEOUT_S, "--read-timeout", min=0.1, help="Seconds a client may stall while "
                                       "sending its request body before it gets 408 and is disconnected."),
    max_connections: int = typer.Option(MAX_CONNECTIONS, "--max-connections", min=1,
                                        help="Open connections at once; more get 503 (stalled clients cannot take "
                                             "every socket)."),
):
    """A web page for one model: drop or pick an image and see its top labels with probability bars, and the
    Grad-CAM picture when the explain extra is there; POST /predict (with the header X-Fastft: 1) answers as
    `fastft predict --json`. Needs pip install 'fastft[serve]'."""
    from fastft.deploy.serve import serve as serve_model

    serve_model(model, host, port, max_upload, allow_dir, tuple(allow_host), read_timeout, max_connections)


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
def runs(
    folder: Path = typer.Argument(Path("runs"), metavar="[FOLDER]", help="The folder the runs went to."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
):
    """The runs under FOLDER (default runs/): data, backbone, strategy (auto: chosen), test accuracy plain and
    with flip TTA, calibrated or not, training seconds, when it started, and whether it finished; an unfinished
    run with the `fastft resume` line that continues it."""
    from fastft.deploy.runs import as_table, list_runs

    rows = list_runs(folder)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif not rows:
        typer.echo(f"no runs in {folder}")
    else:
        typer.echo(as_table(rows))


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
