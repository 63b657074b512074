"""A pickle-free model bundle, and loading any fastft model for inference.

A bundle is `model.safetensors` (the network's weights) plus `model.json` (everything inference needs:
timm arch, classes, input size, resize/crop, normalisation, versions). Loading one unpickles nothing
and needs no fastai: torch, timm and `fastft.deploy.network` rebuild the network from the JSON. The same
`load` also takes an ONNX export (onnxruntime) and, only when asked to trust it, fastai's model.pkl.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from fastft.atomic import write_bytes, write_json
from fastft.data.images import open_rgb, resize_center_crop, resize_side
from fastft.deploy.calibration import LIMITS as TEMPERATURE_LIMITS
from fastft.errors import UsageError
from fastft.run_folder import META, PICKLE, WEIGHTS, RunFolder

FORMAT = "fastft-bundle/1"


def write_bundle(model, run: RunFolder, *, arch: str, classes: list[str], size: int, crop_pct: float,
                 mean, std, head: dict, tta: bool = False, threshold: float | None = None,
                 temperature: float | list[float] | None = None) -> None:
    """Save the trained network's weights and what inference needs to use them. `threshold`: a multi-label
    model's (a label is predicted when its probability reaches it); None for single-label. `temperature`: what its
    logits are divided by for calibrated probabilities (deploy/calibration.py; one per label for a multi-label
    model); None for an uncalibrated model."""
    import timm
    import torch
    from safetensors.torch import save

    from fastft.version import __version__
    from fastft.deploy.network import HEAD_DEFAULTS

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save(state, metadata={ARCH_TAG: arch})
    write_bytes(run.weights, weights)
    meta = {
        "format": FORMAT, "arch": arch, "files": {run.weights.name: hashlib.sha256(weights).hexdigest()},
        "classes": list(classes), "head": {**HEAD_DEFAULTS, **head},
        "input_size": size, "resize": resize_side(size, crop_pct), "crop_pct": crop_pct,
        "mean": list(mean), "std": list(std), "tta": tta,
        **({"multi_label": True, "threshold": threshold} if threshold is not None else {}),
        **({"temperature": temperature} if temperature is not None else {}),
        "versions": {"fastft": __version__, "timm": timm.__version__, "torch": torch.__version__},
    }
    write_json(run.meta, meta)


def mirror_image(batch):
    """Each image of an (N, 3, H, W) batch flipped left to right; `batch` is a numpy array or a torch tensor."""
    return batch.flip(-1) if hasattr(batch, "flip") else np.ascontiguousarray(batch[..., ::-1])


def averaged_with_mirror(plain, mirror):
    """Flip TTA, the one rule every model uses: each image's probabilities averaged with its mirror image's."""
    return (plain + mirror) / 2


def mirror_averaged(probabilities, batch, plain=None):
    """Flip TTA of an (N, 3, H, W) batch through `probabilities`, a function of a batch; `plain`: the batch's own
    probabilities, when the caller has them already."""
    return averaged_with_mirror(probabilities(batch) if plain is None else plain, probabilities(mirror_image(batch)))


def activation(logits, multi_label: bool = False, temperature=None):
    """Probabilities from a torch network's logits: softmax over the classes, or for a multi-label model a sigmoid
    per label; of the logits divided by `temperature` (calibrated) when one is given."""
    if temperature is not None:
        logits = logits / logits.new_tensor(temperature)
    return logits.sigmoid() if multi_label else logits.softmax(dim=1)


def probabilities_of(network, multi_label: bool = False, temperature=None):
    """A torch network's probabilities (`activation` of its logits), as a function of a batch (for
    mirror_averaged)."""
    return lambda batch: activation(network(batch), multi_label, temperature)


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value, low: float, high: float, open_low: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (low < value if open_low else low <= value) and value <= high)


def _rgb(value, low: float, high: float) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_number(v, low, high) for v in value)


def _temperature(value) -> bool:
    return _number(value, *TEMPERATURE_LIMITS)


# Sane ranges for what inference divides by: a std of 1e-300 or a temperature of 1e-40 passes any "positive" check
# and turns every probability into NaN. Pixels are scaled to [0, 1], so a channel's mean lies in it and its std is
# well above 0.01; a temperature outside calibration's own limits is not one a run fits.
STD_RANGE = (0.01, 10.0)
# model.json's "files": weights file name -> sha256 of its bytes, written when the file is; a file whose bytes differ
# (another run's model.onnx, a swapped model.safetensors) is refused on load
HASHED = {"model.safetensors", "model.onnx"}
ARCH_TAG = "fastft_arch"  # model.safetensors' own metadata: the architecture its weights were trained as


# A plain timm name, with or without a pretrained tag ("resnet18", "convnext_tiny.fb_in22k"): never "hf-hub:..."
# or "local-dir:...", which would make loading a bundle fetch from the network or read files outside it.
PLAIN_ARCH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")
# model.json's keys: (is the value good?, what it must be). A hand-edited file is checked against this on load.
SCHEMA = {
    "format": (lambda v: v == FORMAT, f'"{FORMAT}"'),
    "arch": (lambda v: isinstance(v, str) and PLAIN_ARCH.fullmatch(v), 'a plain timm architecture name, e.g. "resnet18"'),
    "classes": (lambda v: isinstance(v, list) and v and all(isinstance(c, str) and c for c in v) and len(set(v)) == len(v),
                "a list of distinct, non-empty class names"),
    "input_size": (lambda v: _whole(v, 8, 4096), "a whole number of pixels from 8 to 4096"),
    "resize": (lambda v: _whole(v, 8, 8192), "a whole number of pixels from 8 to 8192"),
    "crop_pct": (lambda v: _number(v, 0.1, 1.0), "a number from 0.1 to 1"),
    "mean": (lambda v: _rgb(v, 0.0, 1.0), "a list of three numbers from 0 to 1, one per RGB channel"),
    "std": (lambda v: _rgb(v, *STD_RANGE),
            "a list of three numbers from {:g} to {:g}, one per RGB channel".format(*STD_RANGE)),
    "tta": (lambda v: isinstance(v, bool), "true or false"),
    "multi_label": (lambda v: isinstance(v, bool), "true or false"),
    "threshold": (lambda v: _number(v, 0.0, 1.0, open_low=True) and v < 1, "a number between 0 and 1"),
    "temperature": (lambda v: _temperature(v) or (isinstance(v, list) and v and all(map(_temperature, v))),
                    "a number from {:g} to {:g} (a list of them, one per label)".format(*TEMPERATURE_LIMITS)),
    "files": (lambda v: isinstance(v, dict) and set(v) <= HASHED and all(
        isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in v.values()),
              "a table of weights file names (model.safetensors, model.onnx) and their sha256"),
    "head": (lambda v: isinstance(v, dict), "a table of hidden, dropout and concat_pool"),
    "versions": (lambda v: isinstance(v, dict), "a table of version strings"),
}
HEAD_SCHEMA = {
    "hidden": (lambda v: _whole(v, 0, 65536), "a whole number from 0 (a linear head) to 65536"),
    "dropout": (lambda v: _number(v, 0.0, 1.0) and v < 1, "a number from 0 to below 1"),
    "concat_pool": (lambda v: isinstance(v, bool), "true or false"),
}
REQUIRED = ("format", "arch", "classes", "input_size", "crop_pct", "mean", "std")


def check_meta(meta, path: Path) -> dict:
    """`meta` if it is a model.json fastft can use, else a one-line error naming the first bad key."""
    if not isinstance(meta, dict):
        raise UsageError(f"{path} is not a fastft model.json (not a JSON object); re-export the model")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise UsageError(f"{path} is not a {FORMAT} model.json (missing: {', '.join(missing)}); re-export the model")
    if isinstance(meta.get("temperature"), list) and isinstance(meta.get("classes"), list) and (
            len(meta["temperature"]) != len(meta["classes"]) or not meta.get("multi_label")):
        raise UsageError(f"{path}: 'temperature' is a list, which only a multi-label model has, one per label; fix it "
                         "or re-export the model")
    for where, table, schema in (("", meta, SCHEMA), ("head.", meta.get("head", {}), HEAD_SCHEMA)):
        for key, value in table.items():
            if key not in schema:
                raise UsageError(f"{path}: '{where}{key}' is not a key of a fastft model.json (it knows "
                                 f"{', '.join(schema)}); remove it or re-export the model")
            good, expected = schema[key]
            if not good(value):
                raise UsageError(f"{path}: '{where}{key}' is {json.dumps(value)[:60]}, but must be {expected}; fix it "
                                 "or re-export the model")
    return meta


def _meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except RecursionError:  # a hand-made file nested thousands of levels deep
        raise UsageError(f"{path} is not a fastft model.json (nested too deeply to read); re-export the model") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not a readable fastft model.json ({e}); re-export the model") from None
    return check_meta(meta, path)


def file_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_file_hash(meta: dict, meta_path: Path, weights: Path) -> None:
    """Refuse a weights file that is not the one `meta` was written with: a model.onnx copied from another run, a
    swapped model.safetensors. Bundles written before fastft recorded hashes ("files" absent) are not checked."""
    recorded = meta.get("files")
    if recorded is None:
        return
    if weights.name not in recorded or recorded[weights.name] != file_hash(weights):
        made = "was not written with" if weights.name not in recorded else "is not the file written with"
        fix = (f"rebuild it with `fastft export {meta_path.parent}`" if weights.suffix == ".onnx" else
               "use a run folder's own pair")
        raise UsageError(f"{weights} {made} {meta_path} (its sha256 is not one {meta_path.name} records): it belongs "
                         f"to another model; {fix}")


def record_file_hash(meta_path: Path, weights: Path) -> None:
    """Add `weights`' sha256 to model.json's "files" (an export writes model.onnx after the bundle)."""
    meta = _meta(meta_path)
    write_json(meta_path, {**meta, "files": {**meta.get("files", {}), weights.name: file_hash(weights)}})


class Model:
    """A trained classifier: `predict(image)` -> (label, {class: probability}); `predict_batch(paths)`. A multi-label
    model's probabilities are per label (a sigmoid each); its results also list every label at or above the run's
    threshold."""

    classes: list[str]
    meta: dict

    @property
    def multi_label(self) -> bool:
        return bool(self.meta.get("multi_label"))

    @property
    def threshold(self) -> float:
        return float(self.meta.get("threshold", 0.5))

    @property
    def calibrated(self) -> bool:
        """Whether its probabilities are calibrated: its run fitted a temperature on held-out predictions."""
        return "temperature" in self.meta

    def preprocess(self, image) -> np.ndarray:
        """The run's test transform: RGB, resize + centre crop, scale to [0, 1], normalise. (3, H, W)."""
        im = open_rgb(image) if isinstance(image, (str, Path)) else image.convert("RGB")
        im = resize_center_crop(im, self.meta["input_size"], self.meta["crop_pct"])
        x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        mean, std = (np.array(self.meta[k], dtype=np.float32)[:, None, None] for k in ("mean", "std"))
        return (x - mean) / std

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def flip_tta(self, asked: bool | None) -> bool:
        """Average with the mirror image? As asked, or (None) as the run that trained the model did."""
        return self.meta.get("tta", False) if asked is None else asked

    def predict_arrays(self, batch: np.ndarray, tta: bool | None = None) -> np.ndarray:
        return mirror_averaged(self.probabilities, batch) if self.flip_tta(tta) else self.probabilities(batch)

    def predict(self, image, tta: bool | None = None) -> tuple[str, dict[str, float]]:
        probs = self.predict_arrays(self.preprocess(image)[None], tta)[0]
        return self.classes[int(probs.argmax())], dict(zip(self.classes, map(float, probs)))

    def predict_batch(self, images: Iterable, bs: int = 64, tta: bool | None = None) -> Iterator[dict]:
        """Yields {'path', 'label', 'probability', 'probabilities'} per image as each batch finishes.
        tta: average with the mirror image's prediction; None: as the run that trained the model did."""
        images = list(images)
        for start in range(0, len(images), bs):
            chunk = images[start:start + bs]
            probs = self.predict_arrays(np.stack([self.preprocess(i) for i in chunk]), tta)
            yield from (self.result(image, row) for image, row in zip(chunk, probs))

    def result(self, image, row: np.ndarray) -> dict:
        if not np.isfinite(row).all():  # never print NaN (and never emit it in JSON, which has no NaN)
            raise UsageError(f"the model gives probabilities that are not finite numbers for {image}: its weights or "
                             "model.json are broken; re-export the model, or train it again")
        best = int(row.argmax())
        result = {"path": str(image), "label": self.classes[best], "probability": float(row[best]),
                  "probabilities": dict(zip(self.classes, map(float, row))), "calibrated": self.calibrated}
        if self.multi_label:
            result["labels"] = [c for c, p in sorted(zip(self.classes, row), key=lambda cp: -cp[1]) if p >= self.threshold]
        return result


class BundleModel(Model):
    """model.safetensors + model.json in PyTorch."""

    def __init__(self, meta_path: Path):
        import torch
        from safetensors import SafetensorError, safe_open

        from fastft.deploy.network import build_network

        self.meta, self.classes = _meta(meta_path), None
        self.classes = list(self.meta["classes"])
        weights = meta_path.with_name(WEIGHTS)
        if not weights.is_file():
            raise UsageError(f"{weights} is missing beside {meta_path}; a bundle is model.json + model.safetensors")
        try:
            with safe_open(str(weights), "pt") as f:
                state = {name: f.get_tensor(name) for name in f.keys()}
                trained_as = (f.metadata() or {}).get(ARCH_TAG)
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"{weights} is corrupt or truncated ({str(e)[:100]}); re-export the model") from None
        check_file_hash(self.meta, meta_path, weights)
        if trained_as is not None and trained_as != self.meta["arch"]:
            # another architecture can have the very same tensor names and shapes (efficientnet_lite0 and
            # tf_efficientnet_lite0 differ only in padding) and would load, and answer wrongly, without a word
            raise UsageError(f"{meta_path}: 'arch' is {self.meta['arch']!r}, but {weights.name} was trained as "
                             f"{trained_as!r}; set \"arch\": \"{trained_as}\" or re-export the model")
        if not all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point()):
            raise UsageError(f"{weights} holds weights that are not finite numbers (NaN or inf: its run diverged); "
                             "train again with a lower --lr")
        import timm

        if not timm.is_model(self.meta["arch"].split(".")[0]):
            raise UsageError(f"{meta_path}: 'arch' {self.meta['arch']!r} is not an architecture timm {timm.__version__} "
                             "knows; fix it or re-export the model")
        self.network = build_network(self.meta["arch"], len(self.classes), self.meta.get("head"))
        try:
            self.network.load_state_dict(state, strict=True)
        except RuntimeError as e:
            detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1][:160]
            raise UsageError(f"{meta_path.name} and {weights.name} disagree (arch {self.meta['arch']}, "
                             f"{len(self.classes)} classes): {detail}") from None
        self.network.eval()
        self._torch = torch

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return probabilities_of(self.network, self.multi_label, self.meta.get("temperature"))(
                self._torch.from_numpy(batch)).numpy()


class OnnxModel(Model):
    """model.onnx (from `fastft export`) in ONNX Runtime, with the bundle's model.json beside it."""

    def __init__(self, onnx_path: Path):
        try:
            import onnxruntime
        except ImportError:
            raise UsageError("ONNX models need onnxruntime: pip install 'fastft[onnx]'") from None
        meta_path = onnx_path.with_name(META)
        self.meta = _meta(meta_path)
        self.classes = list(self.meta["classes"])
        check_file_hash(self.meta, meta_path, onnx_path)
        try:
            self.session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise UsageError(f"{onnx_path} is not a loadable ONNX model ({str(e)[:120]}); re-export it") from None
        size = self.meta["input_size"]
        shape = self.session.get_inputs()[0].shape  # [batch, 3, H, W]; a dimension is a name where it is dynamic
        if len(shape) != 4 or [d for d in shape[1:] if isinstance(d, int)] not in ([3, size, size], [3], []):
            raise UsageError(f"{onnx_path} takes inputs of shape {shape}, but {META} says {size}x{size} RGB; rebuild it "
                             f"with `fastft export {onnx_path.parent}`")

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": batch.astype(np.float32)})[0]


class PickleModel(Model):
    """fastai's model.pkl via load_learner: runs pickled code, so only on request."""

    def __init__(self, pkl_path: Path):

        from fastai.learner import load_learner

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.learn = load_learner(pkl_path, cpu=True)
        except Exception as e:
            raise UsageError(f"could not load {pkl_path} ({type(e).__name__}: {str(e)[:120]}); is it a fastai model.pkl?") from None
        self.classes = list(self.learn.dls.vocab)
        beside = pkl_path.with_name(META)  # in a run folder: predict as the run's bundle does (tta, threshold)
        # fastai's Learner gives its own (uncalibrated) probabilities: the bundle's temperature is not applied here
        self.meta = {k: v for k, v in _meta(beside).items() if k in ("tta", "multi_label", "threshold")} if beside.is_file() else {}

    def predict_batch(self, images: Iterable, bs: int = 64, tta: bool | None = None) -> Iterator[dict]:
        images = list(images)
        dl = self.learn.dls.test_dl(images, bs=bs, num_workers=0)
        with self.learn.no_bar():
            if self.flip_tta(tta):  # the bundle's flip TTA (fastai's own `tta` blends random training augmentations)
                import torch

                probabilities = probabilities_of(self.learn.model.eval(), self.multi_label)
                with torch.inference_mode():
                    probs = torch.cat([mirror_averaged(probabilities, xb) for xb, *_ in dl]).numpy()
            else:
                probs = self.learn.get_preds(dl=dl)[0].numpy()
        yield from (self.result(image, row) for image, row in zip(images, probs))

    def predict(self, image, tta: bool | None = None):
        result = next(self.predict_batch([image], tta=tta))
        return result["label"], result["probabilities"]


def unfinished(folder: Path) -> None:
    """A one-line error for a run folder whose run stopped before it wrote model.json, its last file: what to run to
    finish it, rather than what its other files (a model.pkl, a model.safetensors) would say on their own."""
    run = RunFolder(folder)
    if not run.finished and (run.checkpoint.is_file() or run.recipe.is_file()):  # a run folder's, not a hub export's
        raise UsageError(f"{folder} is an unfinished run (it stopped before writing {META}); finish it with "
                         f"`fastft resume {folder}`")


def load(path, trust_pickle: bool = False) -> Model:
    """Load a model for inference: a run folder, model.json / model.safetensors, model.onnx, or (with
    trust_pickle=True) a fastai model.pkl."""
    path = Path(path)
    unfinished(path if path.is_dir() else path.parent)
    if path.is_dir():
        if (path / META).is_file():
            return BundleModel(path / META)
        if (path / PICKLE).is_file():
            path = path / PICKLE
        else:
            raise UsageError(f"no trained model in {path}; pass a run folder (a run's --out) or a model file")
    if not path.is_file():
        raise UsageError(f"no trained model at {path}; pass a run folder (a run's --out) or a model file")
    if path.suffix == ".onnx":
        return OnnxModel(path)
    if path.suffix == ".pkl":
        if not trust_pickle:
            raise UsageError(f"{path} is a pickle, and loading a pickle runs whatever code it holds; use the run's "
                             "model.json bundle, or pass --trust-pickle if you trust where this file came from")
        return PickleModel(path)
    if path.suffix in (".json", ".safetensors"):
        return BundleModel(path.with_name(META))
    raise UsageError(f"{path} is not a model file fastft knows (model.json, model.safetensors, model.onnx, model.pkl)")
