"""Why a model decides: Grad-CAM heat maps from the maintained `grad-cam` package (pytorch-grad-cam), on the
bundle's network, for the predicted class or any other.

The target layer is the last feature stage timm reports for the architecture (`model.feature_info`), so any
timm model works without a hard-coded layer name; `--layer` names another module. Needs the `explain` extra:
pip install 'fastft[explain]'.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastft.errors import UsageError


def _gradcam():
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise UsageError("Grad-CAM needs the grad-cam package: pip install 'fastft[explain]'") from None
    return GradCAM, ClassifierOutputTarget


def available() -> bool:
    try:
        _gradcam()
        return True
    except UsageError:
        return False


def target_layer(network, arch: str, layer: str | None = None):
    """The module Grad-CAM reads: `layer` (a module name inside the timm model), or the last stage timm's
    feature_info names for this architecture."""
    body = network[0].model
    if not layer:
        info = getattr(body, "feature_info", None)
        names = [entry.get("module") for entry in info] if isinstance(info, list) else []
        layer = next((name for name in reversed(names) if name), None)
        if layer is None:
            raise UsageError(f"timm reports no feature stages for {arch}, so there is no layer to explain; name one "
                             "with --layer (a module of the model, e.g. layer4)")
    try:
        return body.get_submodule(layer)
    except AttributeError:
        raise UsageError(f"{arch} has no module '{layer}'; name one of its modules with --layer") from None


class Explainer:
    """Grad-CAM over a BundleModel: heat maps (H, W) in [0, 1] at the model's input size."""

    def __init__(self, model, layer: str | None = None):
        from fastft.deploy.bundle import BundleModel

        if not isinstance(model, BundleModel):
            raise UsageError("Grad-CAM needs the PyTorch bundle (a run folder or model.json), not ONNX or a pickle")
        GradCAM, self.target = _gradcam()
        self.model = model
        self.cam = GradCAM(model=model.network, target_layers=[target_layer(model.network, model.meta["arch"], layer)])

    def class_index(self, name: str | None, probabilities: np.ndarray) -> int:
        if name is None:
            return int(probabilities.argmax())
        if name not in self.model.classes:
            raise UsageError(f"--class {name}: the model knows {', '.join(self.model.classes)}")
        return self.model.classes.index(name)

    def heat_maps(self, batch: np.ndarray, targets: list[int]) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch))
        with torch.enable_grad():
            return self.cam(input_tensor=x, targets=[self.target(t) for t in targets])


def picture_of(model, batch_row: np.ndarray) -> np.ndarray:
    """The normalised input back as an (H, W, 3) picture in [0, 1]: what the model saw."""
    mean, std = (np.array(model.meta[k], dtype=np.float32)[:, None, None] for k in ("mean", "std"))
    return np.clip(batch_row * std + mean, 0, 1).transpose(1, 2, 0)


OVERLAY_ALPHA = 0.3  # light enough that the photo under the heat map stays recognisable


def draw(ax, picture: np.ndarray, heat: np.ndarray, title: str) -> None:
    ax.imshow(picture)
    ax.imshow(heat, cmap="jet", alpha=OVERLAY_ALPHA, vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def draw_beside(axes, original, picture: np.ndarray, heat: np.ndarray, title: str) -> None:
    """The photo as it is (left) beside the picture the model saw with the heat map over it (right)."""
    axes[0].imshow(original)
    axes[0].set_title("the photo", fontsize=8)
    axes[0].axis("off")
    draw(axes[1], picture, heat, title)


def shown_photo(image, longest: int = 512):
    """A photo (a path or a PIL image) as RGB, at most `longest` pixels on its longer side: for showing."""
    from fastft.data.images import open_rgb

    im = open_rgb(image) if isinstance(image, (str, Path)) else image.convert("RGB")
    im.thumbnail((longest, longest))
    return im


def explain(model_path: Path, images: list[Path], out: str | None, class_name: str | None = None,
            layer: str | None = None, top_k: int = 3, trust_pickle: bool = False) -> tuple[Path, list[dict]]:
    """One PNG per image in a new folder: the photo beside the picture the model saw with the heat map of the
    predicted class (or `class_name`) over it, and the top-k probabilities. Returns (folder, [{path, class, png, top}])."""
    from fastft.atomic import subplots

    from fastft.atomic import save_figure, write_json
    from fastft.run_folder import new_run_folder, run_folder_of
    from fastft.deploy.bundle import load
    from fastft.deploy.predict import readable_images

    model = load(model_path, trust_pickle=trust_pickle)
    explainer = Explainer(model, layer)
    files = readable_images(images)
    folder = new_run_folder(out, "explain", parent=run_folder_of(model_path).path)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for number, path in enumerate(files):
        batch = model.preprocess(path)[None]
        probs = model.predict_arrays(batch, tta=False)[0]
        target = explainer.class_index(class_name, probs)
        heat = explainer.heat_maps(batch, [target])[0]
        top = sorted(zip(model.classes, map(float, probs)), key=lambda cp: -cp[1])[:top_k]
        fig, axes = subplots(1, 2, figsize=(7.6, 4.2))
        draw_beside(axes, shown_photo(path), picture_of(model, batch[0]), heat,
                    f"Grad-CAM: {model.classes[target]}\n" + ", ".join(f"{c} {p:.2f}" for c, p in top))
        fig.tight_layout()
        png = folder / f"{number:03d}-{path.stem}.png"
        save_figure(fig, png)
        results.append({"path": str(path), "class": model.classes[target], "png": str(png), "top": top})
    write_json(folder / "explain.json", results)
    return folder, results


def plot_top_losses(model, rows: list[tuple], path: Path) -> bool:
    """gradcam_top_losses.png: the top-loss images (path, actual, predicted, loss, probability), each with the
    heat map of the class the model predicted. False (nothing written) without grad-cam or a PyTorch bundle."""
    from fastft.deploy.bundle import BundleModel

    if not rows or not isinstance(model, BundleModel) or not available():
        return False
    from fastft.atomic import subplots

    from fastft.atomic import save_figure

    explainer = Explainer(model)
    batch = np.stack([model.preprocess(p) for p, *_ in rows])
    probs = model.predict_arrays(batch, tta=False)
    heats = explainer.heat_maps(batch, [int(row.argmax()) for row in probs])
    cols = 3
    fig, axes = subplots(-(-len(rows) // cols), cols, figsize=(cols * 3, -(-len(rows) // cols) * 3.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, actual, predicted, loss, prob), row, heat in zip(axes.flat, rows, batch, heats):
        draw(ax, picture_of(model, row), heat, f"{predicted}/{actual}\nloss {loss:.2f}, p {prob:.2f}")
    fig.suptitle("top losses with Grad-CAM of the predicted class: predicted/actual", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return True
