"""fastai transforms fastft adds: an RGB-converting image type, d2l's test resize, an exact batch flip.

They live at module level so an exported Learner (model.pkl) can unpickle them wherever fastft is
installed.
"""
from __future__ import annotations

from pathlib import Path

import torch
from fastai.vision.all import PILImage, RandTransform, TensorImage, Transform
from PIL import Image

from fastft.images import open_rgb, to_rgb


class RGBImage(PILImage):
    """A PILImage that opens any valid image mode as 8-bit RGB (see `fastft.images.to_rgb`)."""

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


class ResizeCenterCrop(Transform):
    """Resize the shorter side to round(size / crop_pct), then take the centre size x size square:
    torchvision's Resize(int) + CenterCrop, as d2l and timm evaluate (224 px from 256)."""

    order = 1

    def __init__(self, size: int, crop_pct: float = 1.0):
        self.size, self.crop_pct = size, crop_pct

    def encodes(self, im: PILImage):
        short = round(self.size / self.crop_pct)
        w, h = im.size
        scale = short / min(w, h)
        new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.BILINEAR, reducing_gap=None)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        return im.crop((left, top, left + self.size, top + self.size))


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
