"""Augmentation specs and the transforms they make: train-only randomness, exact flips, d2l's test crop."""
import pytest
import torch
from fastai.vision.all import PILImage, TensorImage
from PIL import Image

from fastft.augment import build_transforms, parse_aug
from fastft.errors import UsageError
from fastft.transforms import BatchFlip, ResizeCenterCrop


def test_spec_parsing_with_parameters():
    assert parse_aug("none") == []
    parsed = dict(parse_aug("crop:scale=0.1-1:ratio=0.5-2+flip:0.3"))
    assert parsed["crop"] == {"scale": (0.1, 1.0), "ratio": (0.5, 2.0)} and parsed["flip"] == {"p": 0.3}


@pytest.mark.parametrize("spec,message", [("flop", "unknown augmentation 'flop'.*flip"),
                                          ("flip:q=0.2", "unknown parameter 'q'.*p"),
                                          ("crop:scale=0.5", "range"), ("flip:lots", "not a number"),
                                          ("none:1", "takes no parameters")])
def test_bad_specs_are_clean_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_aug(spec)


def test_batch_flip_is_an_exact_mirror_of_training_batches_only():
    x = TensorImage(torch.rand(6, 3, 5, 7))
    assert torch.equal(BatchFlip(p=1.0)(x, split_idx=0), x.flip(-1))
    assert torch.equal(BatchFlip(p=1.0, dim=-2)(x, split_idx=0), x.flip(-2))
    assert torch.equal(BatchFlip(p=0.0)(x, split_idx=0), x)
    assert torch.equal(BatchFlip(p=1.0)(x, split_idx=1), x)  # the test split is never augmented
    torch.manual_seed(0)
    flipped = BatchFlip(p=0.5)(TensorImage(torch.rand(4000, 1, 1, 2)), split_idx=0)
    assert 0.45 < (flipped[:, 0, 0, 0] > flipped[:, 0, 0, 1]).float().mean() < 0.55


def test_test_items_resize_shorter_side_then_centre_crop():
    # an 80x60 gradient, so that any shift of the crop changes pixels
    im = PILImage(Image.new("RGB", (80, 60)))
    for xx in range(80):
        for yy in range(60):
            im.putpixel((xx, yy), (xx * 3, yy * 4, 0))
    out = ResizeCenterCrop(28, crop_pct=0.875)(im)
    assert out.size == (28, 28)
    # shorter side 60 -> 32 (= round(28 / 0.875)), width 80 -> 43; the crop keeps the middle
    reference = im.resize((43, 32), Image.BILINEAR, reducing_gap=None).crop((7, 2, 35, 30))
    assert list(out.getdata()) == list(reference.getdata())


def test_crop_is_training_only_and_test_items_are_deterministic():
    item_tfms, batch_tfms = build_transforms("crop+flip", size=16, crop_pct=0.875)
    assert [t.split_idx for t in item_tfms] == [0, 1] and all(t.split_idx == 0 for t in batch_tfms)
    item_tfms, _ = build_transforms("flip", size=16, crop_pct=1.0)
    assert len(item_tfms) == 1 and item_tfms[0].split_idx is None  # same resize for train and test
