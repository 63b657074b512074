"""fastai transforms fastft adds: an RGB-converting image type, d2l's test resize, an exact batch flip.

They live at module level so an exported Learner (model.pkl) can unpickle them wherever fastft is
installed.
"""
from __future__ import annotations

from pathlib import Path

import torch
from fastai.vision.all import PILImage, RandTransform, TensorImage, TfmdDL, Transform, WeightedDL
from PIL import Image

from fastft.data.split import labels_in
from fastft.data.images import open_rgb, resize_center_crop, to_rgb


class RGBImage(PILImage):
    """A PILImage that opens any valid image mode as 8-bit RGB (see `fastft.data.images.to_rgb`)."""

    @classmethod
    def create(cls, fn, **kwargs):
        if isinstance(fn, (str, Path)):
            return cls(open_rgb(fn))
        if isinstance(fn, Image.Image):
            return cls(to_rgb(fn))
        return super().create(fn, **kwargs)


def image_of(item):
    """Items are [path, label] lists in training (lists, not tuples: fastai maps a transform over the
    elements of a tuple) and bare paths at prediction time."""
    return item[0] if isinstance(item, list) else item


def label_of(item):
    return item[1]


class LabelsOf:
    """A multi-label item's labels: its key split by the delimiter (a class, not a lambda, so model.pkl pickles)."""

    def __init__(self, delimiter: str):
        self.delimiter = delimiter

    def __call__(self, item):
        return labels_in(item[1], self.delimiter)


class CachedDL(TfmdDL):
    """fastai's TfmdDL, serving batches by indexing decoded pictures when `pixels` is set (fastft/data/cache.py):
    (N, 3, H, W) uint8 images and (N,) labels, in the dataset's item order. Order, shuffling, drop_last
    and batch transforms are the TfmdDL's own, so batches equal the per-item pipeline's exactly. The pictures
    may live on the GPU (`on_device`): batches are then cut there, with no copy from the host per batch. A DL
    made from this one (`new`, `test_dl`) has no pixels and reads files as usual."""

    pixels = None  # (images, labels) once `serve_decoded` is called

    def serve_decoded(self, images, labels) -> None:
        """Serve batches from these decoded pictures and their labels, in the dataset's item order."""
        self.pixels = (images, labels)

    def create_batches(self, samps):
        if self.pixels is None:
            yield from super().create_batches(samps)
            return
        images, labels = self.pixels  # labels: a TensorCategory (N,) or, multi-label, a TensorMultiCategory (N, C)
        order = torch.tensor(list(samps), dtype=torch.long, device=images.device)  # index where the pictures are
        stop = len(order) - len(order) % self.bs if self.drop_last else len(order)
        for start in range(0, stop, self.bs):
            idx = order[start:start + self.bs]
            yield TensorImage(images[idx]), labels[idx]


class WeightedCachedDL(CachedDL, WeightedDL):
    """--balance sampler: fastai's WeightedDL (training items drawn with replacement, in proportion to `wgts`),
    serving decoded pictures like CachedDL when they are there."""


class ResizeCenterCrop(Transform):
    """d2l's test transform (see `fastft.data.images.resize_center_crop`) as a fastai item transform."""

    order = 1

    def __init__(self, size: int, crop_pct: float = 1.0):
        self.size, self.crop_pct = size, crop_pct

    def encodes(self, im: PILImage):
        return PILImage(resize_center_crop(im, self.size, self.crop_pct))


class BatchFlip(RandTransform):
    """Mirror each training image with probability p, on the batch's device. An exact mirror
    (torch.flip), unlike an affine warp that resamples."""

    split_idx, order = 0, 15  # training batches only; after IntToFloatTensor (10), before Normalize (99)

    def __init__(self, p: float = 0.5, dim: int = -1):
        super().__init__(p=1.0)
        self.flip_p, self.dim = p, dim

    def before_call(self, b, split_idx):
        self.do = True
        x = b[0] if isinstance(b, tuple) else b
        self.mask = torch.rand(x.shape[0], device=x.device) < self.flip_p

    def encodes(self, x: TensorImage):
        return torch.where(self.mask[:, None, None, None], x.flip(self.dim), x)


class BatchShift(RandTransform):
    """Translate each training image by its own whole-pixel offset in [-px, px] along x and y, black
    where the image moved away: torchvision's RandomCrop(size, padding=px), the ResNet paper's CIFAR
    augmentation, done on the batch so the decode-once cache still applies."""

    split_idx, order = 0, 12  # training batches only; after IntToFloatTensor (10), before Normalize (99)

    def __init__(self, px: int = 4):
        super().__init__(p=1.0)
        self.px = px

    def before_call(self, b, split_idx):
        self.do = self.px > 0
        x = b[0] if isinstance(b, tuple) else b
        self.offsets = torch.randint(0, 2 * self.px + 1, (x.shape[0], 2)).tolist()

    def encodes(self, x: TensorImage):
        h, w, px = x.shape[-2], x.shape[-1], self.px
        padded = torch.nn.functional.pad(x, (px, px, px, px))
        return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(self.offsets)])


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as torchvision's rgb_to_grayscale: (B, 1, H, W)."""
    r, g, b = x.unbind(dim=-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1], in one pass (lerp)."""
    return torch.lerp(other.expand_as(x), x, factor).clamp_(0, 1)


def adjust_brightness(x, factor):
    """Per-image factor (B,): torchvision's adjust_brightness, a blend with black."""
    return (x * factor[:, None, None, None]).clamp_(0, 1)


def adjust_contrast(x, factor):
    """Blend with the image's mean gray level, as torchvision's adjust_contrast."""
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor[:, None, None, None])


def adjust_saturation(x, factor):
    """Blend with the grayscale image, as torchvision's adjust_saturation."""
    return _blend(x, _gray(x), factor[:, None, None, None])


def rgb_to_hsv(x):
    """(B, 3, H, W) RGB in [0, 1] -> HSV, hue in [0, 1) turns; torchvision's formulas, fewer passes."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    grey = delta == 0
    saturation = delta / torch.where(maxc > 0, maxc, 1.0)
    is_r, is_g = maxc == r, maxc == g
    numerator = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    sector = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    hue = ((numerator / torch.where(grey, 1.0, delta) + sector) / 6.0).remainder_(1.0)
    hue = hue.masked_fill_(grey, 0.0)
    return torch.stack((hue, saturation, maxc), dim=1)


def hsv_to_rgb(x):
    """Branch-free: channel n (5, 3, 1 for r, g, b) is v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + h * 6.0) % 6.0
    return v - v * s * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def adjust_hue(x, shift):
    """Rotate hue by `shift` (B,) of a full turn, as torchvision's adjust_hue."""
    hsv = rgb_to_hsv(x)
    hsv[:, 0].add_(shift[:, None, None]).remainder_(1.0)
    return hsv_to_rgb(hsv)


class ColorJitter(RandTransform):
    """torchvision's ColorJitter on a whole batch on its device, each image with its own random factors:
    brightness, contrast and saturation factors uniform in [1-s, 1+s], hue shifted by up to +-h of the
    colour wheel. Applied in that fixed order (torchvision shuffles it per call)."""

    split_idx, order = 0, 40  # training only; on [0, 1] floats, before Normalize (99)

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
        super().__init__(p=1.0)
        self.strengths = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}

    def before_call(self, b, split_idx):
        self.do = True
        x = b[0] if isinstance(b, tuple) else b
        n, device = x.shape[0], x.device

        def uniform(low, high):
            return torch.empty(n, device=device).uniform_(low, high)

        self.factors = {name: (uniform(-s, s) if name == "hue" else uniform(max(0.0, 1 - s), 1 + s))
                        for name, s in self.strengths.items() if s}

    def encodes(self, x: TensorImage):
        ops = {"brightness": adjust_brightness, "contrast": adjust_contrast,
               "saturation": adjust_saturation, "hue": adjust_hue}
        for name, factor in self.factors.items():
            x = ops[name](x, factor.to(x.dtype))
        return x


class TrainOnlyItem(Transform):
    """Wrap a torchvision transform of PIL images as a training-only fastai item transform."""

    split_idx, order = 0, 2  # after the crop (1), before ToTensor (5)

    def __init__(self, transform):
        self.transform = transform

    def encodes(self, im: PILImage):
        return PILImage(self.transform(im))
