"""`fastft export MODEL --format hub --out DIR`: the folder timm's own loader and the Hugging Face hub read.

timm's `save_for_hf` writes it from a plain timm model: config.json (architecture, num_classes, label_names,
pretrained_cfg with mean, std, input size and crop) and model.safetensors under timm's own parameter names.
fastft adds a README.md model card with the run's figures and recipe.
`timm.create_model("local-dir:DIR", pretrained=True)` loads it, no fastft needed; `huggingface_hub.upload_folder(repo_id=..., folder_path=DIR)` publishes it.

The head: a linear head (strategies `lp-ft` and `probe`: average pooling, one linear layer) is exactly timm's
own classifier, so its weight and bias become the model's classifier. fastai's head (concat pooling,
BatchNorm, a hidden layer with a ReLU) has no timm equivalent: exporting it is an error that says so.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastft.errors import UsageError


def export_hub(model_path: Path, out: str | None) -> Path:
    import timm
    import torch
    from timm.models import save_for_hf

    from fastft.atomic import disk_full, disk_full_error, usual_permissions, write_text
    from fastft.run_folder import new_run_folder, run_folder_of
    from fastft.deploy.bundle import BundleModel, load

    model = load(model_path)
    if not isinstance(model, BundleModel):
        raise UsageError(f"hub export starts from a bundle (a run folder or model.json), not {model_path}")
    head = model.meta.get("head", {})
    if head.get("hidden", 512) or head.get("concat_pool", True):
        raise UsageError("this model has fastai's head (concat pooling, a hidden layer), which plain timm cannot "
                         "hold; train with --strategy lp-ft or probe (a linear head, timm's own) to export to the hub")
    folder = new_run_folder(out, "hub", parent=run_folder_of(model_path).path)
    arch = model.meta["arch"]
    network = timm.create_model(arch.partition(".")[0], pretrained=False, num_classes=len(model.classes))
    body = model.network[0].model.state_dict()
    from fastft.deploy.calibration import folded

    linear = folded(model.network, model.meta.get("temperature"))[1][-1]  # calibrated: softmax(Wx / T + b / T)
    classifier = network.pretrained_cfg.get("classifier") or "fc"
    state = {**body, f"{classifier}.weight": linear.weight.detach(), f"{classifier}.bias": linear.bias.detach()}
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(f"{arch}'s classifier is not a single linear layer named '{classifier}' ({len(missing)} "
                         "tensors left unset); this architecture cannot be exported to the hub layout")
    size = model.meta["input_size"]
    config = {"label_names": list(model.classes),
              # what timm's resolve_data_config + create_transform read: fastft's test preprocessing exactly
              # (deploy/bundle.py, data/images.py's resize_center_crop), at the test size too, where the
              # architecture's own pretrained_cfg would otherwise leave its ImageNet test size (288 px for resnet18)
              "pretrained_cfg": {"mean": tuple(model.meta["mean"]), "std": tuple(model.meta["std"]),
                                 "input_size": (3, size, size), "crop_pct": model.meta["crop_pct"],
                                 "test_input_size": (3, size, size), "test_crop_pct": model.meta["crop_pct"],
                                 "crop_mode": "center", "interpolation": "bilinear",
                                 "num_classes": len(model.classes)}}
    try:
        with torch.no_grad():
            save_for_hf(network.eval(), str(folder), model_config=config, safe_serialization=True)
    except Exception as e:  # safetensors reports a full disk with its own error type
        if disk_full(e):
            raise disk_full_error(folder / "model.safetensors") from None
        raise
    for written in ("model.safetensors", "config.json"):
        usual_permissions(folder / written)
    write_text(folder / "README.md", model_card(model, model_path, folder))
    return folder


# metrics.json's `final` figures that were measured on the test split (the rest are training figures)
TEST_FIGURES = ("test_acc", "test_acc_tta", "balanced_accuracy", "macro_f1", "micro_f1", "mAP")
MADE_BY = {"probe": "a linear probe on the frozen {arch} backbone (its ImageNet features, a classifier fitted on them)",
           "lp-ft": "{arch} fine-tuned with fastft's lp-ft (a linear probe, then the whole network)"}
LOCAL_PATHS = ("data", "labels", "weights")  # recipe keys that hold paths on the training machine


def made_by(strategy: str, arch: str, wise=None) -> str:
    """What made the weights, in words: the strategy, not a blanket "fine-tuned"."""
    words = MADE_BY.get(strategy, "{arch} fine-tuned with fastft's " + strategy).format(arch=arch)
    return words + (f", mixed with its probe by WiSE-FT (weight {wise})" if wise not in (None, "off", 0, 1) else "")


def model_card(model, model_path: Path, folder: Path) -> str:
    """README.md of the hub folder: what made the weights, how to load them, the run's test figures (only those) and
    its recipe without the training machine's paths (a path becomes the name of what it named)."""
    import tomllib

    from fastft.run_folder import run_folder_of

    run = run_folder_of(model_path)
    metrics = json.loads(run.metrics.read_text()).get("final", {}) if run.metrics.is_file() else {}
    recipe_text = run.recipe.read_text() if run.recipe.is_file() else ""
    recipe = tomllib.loads(recipe_text) if recipe_text else {}
    lines = []
    for line in recipe_text.splitlines():
        key, _, value = line.partition(" = ")
        if key in LOCAL_PATHS and value.startswith('"') and value != '""':
            line = f"{key} = {json.dumps(Path(json.loads(value)).name)}  # its name; the path was the training machine's"
        lines.append(line)
    figures = "\n".join(f"| {k} | {metrics[k]:.4f} |" for k in TEST_FIGURES if isinstance(metrics.get(k), float))
    made = made_by(recipe.get("strategy", ""), model.meta["arch"], recipe.get("wise")) if recipe else \
        f"{model.meta['arch']} trained with fastft"
    return f"""---
library_name: timm
tags:
- image-classification
- timm
- fastft
---
# {folder.name}: {made}

Classes: {', '.join(model.classes)}. Input: {model.meta['input_size']} px, resized to {model.meta['resize']} px on the
shorter side and centre-cropped; mean {model.meta['mean']}, std {model.meta['std']}. timm's own
`resolve_data_config` + `create_transform` on this folder reproduce that preprocessing exactly.

```python
import timm
model = timm.create_model("local-dir:{folder.name}", pretrained=True)  # or "hf-hub:<you>/<repo>" once uploaded
```

Upload: `huggingface_hub.upload_folder(repo_id="<you>/<repo>", folder_path="{folder.name}")`.

## Test figures of the run

Measured on the run's test split, which it did not train on.

| figure | value |
|---|---|
{figures}

## Recipe

```toml
{chr(10).join(lines)}
```
"""
