"""`fastft export MODEL --format onnx`: model.onnx beside the bundle, checked against PyTorch."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from fastft.atomic import disk_full, disk_full_error, replacing
from fastft.errors import UsageError
from fastft.run_folder import RunFolder, run_folder_of

TOLERANCE = 1e-4  # max abs difference of probabilities between ONNX Runtime and PyTorch


def sample_images(run: RunFolder, n: int = 8) -> list[Path]:
    """Real inputs for the check: test images of the run's data, if its recipe.toml still points at them."""
    from fastft.data.folders import collect_images, keep_readable, test_folder
    from fastft.recipe import read_recipe_file

    recipe_file = run.recipe
    if not recipe_file.is_file():
        return []
    data = Path(read_recipe_file(recipe_file).data)
    folder = test_folder(data) or data
    if not folder.is_dir():
        return []
    files = collect_images([folder])
    return keep_readable(random.Random(0).sample(files, min(n, len(files))), quiet=True)[0]


def export_onnx(model_path: Path, images: list[Path] | None = None) -> tuple[Path, float, int]:
    """Write model.onnx (dynamic batch, softmax included) and compare it with PyTorch on real images
    (or random inputs when none are at hand). Returns (path, max abs difference, images checked)."""
    import torch

    from fastft.deploy.bundle import BundleModel, OnnxModel, load, record_file_hash

    model = load(model_path)
    if not isinstance(model, BundleModel):
        raise UsageError(f"export starts from a bundle (a run folder or model.json), not {model_path}")
    run = run_folder_of(model_path)
    target = run.onnx
    from fastft.deploy.calibration import folded

    activation = torch.nn.Sigmoid() if model.multi_label else torch.nn.Softmax(dim=1)
    network = torch.nn.Sequential(folded(model.network, model.meta.get("temperature")), activation).eval()
    size = model.meta["input_size"]
    try:
        with replacing(target) as temporary:
            torch.onnx.export(network, (torch.zeros(2, 3, size, size),), str(temporary), input_names=["images"],
                              output_names=["probabilities"], dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
    except Exception as e:  # the exporter raises many types for unsupported operators
        if disk_full(e):
            raise disk_full_error(target) from None
        raise UsageError(f"{model.meta['arch']} cannot be exported to ONNX ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:150] if str(e).strip() else ''})") from None
    record_file_hash(run.meta, target)  # ties this model.onnx to this model.json: another run's is refused
    images = images if images is not None else sample_images(run)
    if images:
        batch = np.stack([model.preprocess(p) for p in images])
    else:
        batch = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
    difference = float(np.abs(OnnxModel(target).probabilities(batch) - model.probabilities(batch)).max())
    return target, difference, len(images)
