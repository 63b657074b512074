"""Augmentation specs and the transforms they make: train-only randomness, exact flips, d2l's test crop."""
import numpy as np
import pytest
import torch
from fastai.vision.all import PILImage, TensorImage
from PIL import Image

from fastft.data.augment import parse_aug
from fastft.errors import UsageError
from fastft.data.transforms import BatchFlip, BatchShift, ColorJitter, ResizeCenterCrop, rgb_to_hsv


def test_spec_parsing_with_parameters():
    assert parse_aug("none").steps == ()
    parsed = parse_aug("crop:scale=0.1-1:ratio=0.5-2+flip:0.3+hue:0.25").params
    assert parsed["crop"] == {"scale": (0.1, 1.0), "ratio": (0.5, 2.0)} and parsed["flip"] == {"p": 0.3}
    assert parsed["hue"] == {"hue": 0.25}
    assert parse_aug("color:0.2").params["color"] == {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.2}
    assert [n for n, _ in parse_aug("d2l").steps] == ["flip", "color", "crop"]
    assert parse_aug("d2l").params["crop"]["scale"] == (0.1, 1.0)
    assert [n for n, _ in parse_aug("keras").steps] == ["flip", "rotate", "zoom"]


def test_every_preset_builds_and_leaves_test_batches_alone(dataset):
    from fastft.data.augment import PRESETS
    from fastft.data.loaders import build_dataloaders, load_split
    from fastft.recipe import Recipe

    for name in PRESETS:
        item_tfms, batch_tfms = parse_aug(name).transforms(size=24, crop_pct=0.875)
        assert all(t.split_idx == 0 for t in batch_tfms), name  # random batch work: training only
    recipe = Recipe(size=24, bs=4, workers=0, aug="color+crop+keras+fastai+trivial")
    dls = build_dataloaders(load_split(dataset, recipe), recipe, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    first, second = ([b[0].clone() for b in dls.valid] for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    train_a, train_b = dls.one_batch()[0], dls.one_batch()[0]
    assert train_a.shape == (4, 3, 24, 24) and not torch.equal(train_a, train_b)


@pytest.mark.parametrize("spec,message", [("flop", "unknown augmentation 'flop'.*flip"),
                                          ("flip:q=0.2", "unknown parameter 'q'.*p"),
                                          ("crop:scale=0.5", "range"), ("flip:lots", "not a number"),
                                          ("none:1", "no bare strength"), ("hue:0.7", "between 0 and 0.5"),
                                          ("d2l:0.3", "named combination"), ("flip+d2l", "flip twice"),
                                          ("crop:scale=1-0.5", "0 < a <= b")])
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


def test_batch_shift_moves_each_image_by_its_own_offset_within_px():
    torch.manual_seed(0)
    x = TensorImage(torch.rand(300, 3, 9, 11) + 1.0)  # no zeros: black pixels show where the image moved
    shifted = BatchShift(px=3)(x, split_idx=0)
    assert shifted.shape == x.shape and torch.equal(BatchShift(px=3)(x, split_idx=1), x)
    seen = set()
    for original, moved in zip(x, shifted):
        rows, cols = (moved[0] != 0).any(dim=1).nonzero(), (moved[0] != 0).any(dim=0).nonzero()
        top, left = int(rows[0]), int(cols[0])  # where the kept part starts in the output
        bottom, right = 9 - 1 - int(rows[-1]), 11 - 1 - int(cols[-1])
        assert 0 in (top, bottom) and 0 in (left, right)  # black on one side only
        dy, dx = top - bottom, left - right  # > 0: moved down / right
        assert abs(dy) <= 3 and abs(dx) <= 3
        source = original[:, max(0, -dy):9 - max(0, dy), max(0, -dx):11 - max(0, dx)]
        assert torch.equal(moved[:, max(0, dy):9 - max(0, -dy), max(0, dx):11 - max(0, -dx)], source)
        seen.add((dy, dx))
    assert len(seen) == 49  # every offset in [-3, 3]^2 occurs


def test_test_items_resize_shorter_side_then_centre_crop():
    # an 80x60 gradient, so that any shift of the crop changes pixels
    im = PILImage(Image.new("RGB", (80, 60)))
    for xx in range(80):
        for yy in range(60):
            im.putpixel((xx, yy), (xx * 3, yy * 4, 0))
    out = ResizeCenterCrop(28, crop_pct=0.875)(im)
    assert out.size == (28, 28)
    # exactly timm's eval transform: shorter side 60 -> 32 (= floor(28 / 0.875)), width 80 -> 42 (truncated, as
    # torchvision's Resize), then its CenterCrop (offsets rounded): the middle
    from torchvision import transforms

    reference = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.BILINEAR),
                                    transforms.CenterCrop(28)])(Image.fromarray(np.asarray(im)))
    assert list(out.getdata()) == list(reference.getdata())
    assert list(out.getdata()) == list(im.resize((42, 32), Image.BILINEAR, reducing_gap=None).crop((7, 2, 35, 30)).getdata())


def test_crop_is_training_only_and_test_items_are_deterministic():
    item_tfms, batch_tfms = parse_aug("crop+flip").transforms(size=16, crop_pct=0.875)
    assert sorted(t.split_idx for t in item_tfms) == [0, 1] and all(t.split_idx == 0 for t in batch_tfms)
    item_tfms, _ = parse_aug("flip").transforms(size=16, crop_pct=1.0)
    assert len(item_tfms) == 1 and item_tfms[0].split_idx is None  # same resize for train and test


@pytest.mark.parametrize("ours,theirs", [("adjust_brightness", "adjust_brightness"), ("adjust_contrast", "adjust_contrast"),
                                         ("adjust_saturation", "adjust_saturation"), ("adjust_hue", "adjust_hue")])
def test_colour_ops_match_torchvision_image_by_image(ours, theirs):
    from torchvision.transforms.v2 import functional as tvf

    import fastft.data.transforms as ft

    torch.manual_seed(0)
    x = torch.rand(6, 3, 9, 11)
    factors = torch.tensor([-0.5, -0.2, 0.0, 0.1, 0.3, 0.5]) if ours == "adjust_hue" else torch.tensor([0.0, 0.5, 1.0, 1.2, 1.5, 2.0])
    batch = getattr(ft, ours)(x, factors)
    one_by_one = torch.stack([getattr(tvf, theirs)(x[i], float(factors[i])) for i in range(6)])
    assert (batch - one_by_one).abs().max() < 2e-4


def test_brightness_factors_are_uniform_in_the_documented_range():
    torch.manual_seed(0)
    gray = TensorImage(torch.full((4000, 3, 2, 2), 0.4))
    out = ColorJitter(brightness=0.5)(gray, split_idx=0)
    factor = out[:, 0, 0, 0] / 0.4
    assert factor.min() >= 0.5 - 1e-6 and factor.max() <= 1.5 + 1e-6
    assert factor.min() < 0.52 and factor.max() > 1.48  # the whole range is used
    assert abs(factor.mean() - 1.0) < 0.02 and abs(factor.std() - 1 / 12 ** 0.5) < 0.02  # uniform on [0.5, 1.5]


def test_hue_shifts_stay_within_h_of_the_wheel():
    torch.manual_seed(0)
    pure = torch.zeros(4000, 3, 1, 1)
    pure[:, 0] = 1.0  # pure red: hue 0
    out = ColorJitter(hue=0.2)(TensorImage(pure), split_idx=0)
    hue = rgb_to_hsv(out)[:, 0, 0, 0]
    shift = torch.where(hue > 0.5, hue - 1, hue)
    assert shift.abs().max() <= 0.2 + 1e-5 and shift.min() < -0.19 and shift.max() > 0.19
    assert abs(shift.mean()) < 0.01


def test_random_resized_crop_respects_scale_and_ratio():
    from fastai.vision.all import RandomResizedCrop

    im = PILImage(Image.new("RGB", (400, 300)))
    crop = RandomResizedCrop(64, min_scale=0.1, max_scale=1.0, ratio=(0.5, 2.0))
    shares, ratios = [], []
    for _ in range(500):
        assert crop(im, split_idx=0).size == (64, 64)
        w, h = crop.cp_size
        shares.append(w * h / (400 * 300))
        ratios.append(w / h)
    assert min(shares) >= 0.1 * 0.95 and max(shares) <= 1.0
    assert min(ratios) >= 0.5 * 0.97 and max(ratios) <= 2.0 * 1.03
    assert min(shares) < 0.2 and max(shares) > 0.7  # the range is really explored


def test_augs_draws_a_grid(tmp_path):
    from conftest import fastft, write_image

    image = write_image(tmp_path / "cat.jpg", (200, 120, 40), size=(60, 40))
    out = tmp_path / "grid.png"
    result = fastft("augs", "flip+crop:scale=0.1-1:ratio=0.5-2+hue:0.5", image, "--out", out)
    assert result.returncode == 0, result.stderr
    with Image.open(out) as grid:
        assert grid.width >= 4 * 100 and grid.height >= 2 * 100
    bad = fastft("augs", "flip+wobble", image, "--out", tmp_path / "x.png")
    assert bad.returncode == 2 and "wobble" in bad.stderr and not (tmp_path / "x.png").exists()


def test_compare_augmentations_reports_overfitting_figures(dataset, tmp_path):
    import json
    from pathlib import Path

    from conftest import TINY, invoke

    out = tmp_path / "augs"
    result = invoke("compare", "cifar", "--data", dataset, *TINY, "--epochs", "1", "--aug", "none,flip+hue:0.2", "--out", out)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())
    assert [r["setting"] for r in rows] == ["none", "flip+hue:0.2"]
    assert "unaugmented train acc" in result.stdout and (out / "compare.png").exists()
    assert 'aug = "flip+hue:0.2"' in (out / "flip_hue_0.2" / "recipe.toml").read_text()
    # the un-augmented train accuracy is the model's accuracy on the training images, as predict sees them
    predicted = json.loads(invoke("predict", out / "none", dataset / "train", "--json").stdout)
    accuracy = sum(Path(r["path"]).parent.name == r["label"] for r in predicted) / len(predicted)
    assert rows[0]["train_acc_unaugmented"] == pytest.approx(accuracy)
