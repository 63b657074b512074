"""Augmentation throughput: fastft's presets (batch transforms on the device) vs the same augmentations
per image with torchvision.transforms.v2 in a DataLoader, side by side in one run.

    python bench/augment.py                  # hotdog stand-in at 128 px, batch 64, 2 workers, 5 repeats

Both pipelines read the same JPEGs and deliver normalised float batches of the same shape; the figure
is images/s over --batches batches, the median of --repeats interleaved repeats (fastft, torchvision,
fastft, ...), so machine drift cancels. Writes JSON to --json.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import ROOT, SHARED, write_results
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_pipeline(preset: str, size: int):
    """The per-image torchvision v2 equivalent of a fastft preset."""
    import torch
    from torchvision.transforms import v2

    augment = {
        "d2l": [v2.RandomResizedCrop(size, scale=(0.1, 1.0), ratio=(0.5, 2.0)), v2.RandomHorizontalFlip(),
                v2.ColorJitter(0.5, 0.5, 0.5, 0.5)],
        "keras": [v2.Resize(size), v2.CenterCrop(size), v2.RandomHorizontalFlip(),
                  v2.RandomAffine(degrees=36, scale=(0.9, 1.1))],
        "none": [v2.Resize(size), v2.CenterCrop(size)],
    }[preset]
    return v2.Compose([v2.ToImage(), *augment, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def fastft_loader(data: Path, preset: str, size: int, bs: int, workers: int):
    import torch

    from fastft.data.loaders import build_dataloaders, load_split
    from fastft.recipe import Recipe

    recipe = Recipe(aug=preset, size=size, crop_pct=1.0, bs=bs, workers=workers)
    return build_dataloaders(load_split(data, recipe), recipe, MEAN, STD, torch.device("cpu")).train


def torchvision_loader(data: Path, preset: str, size: int, bs: int, workers: int):
    import torch
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(data / "train"), transform=torchvision_pipeline(preset, size))
    return torch.utils.data.DataLoader(dataset, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def images_per_second(loader, batches: int) -> float:
    seen, started = 0, None
    while True:
        for i, (x, _) in enumerate(loader):
            if started is None:  # the first batch pays for worker start-up; not counted
                started = time.perf_counter()
                continue
            seen += x.shape[0]
            if seen >= batches * x.shape[0]:
                return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "hotdog")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--presets", default="d2l,keras,none")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "augment.json")
    args = parser.parse_args()

    rows = []
    for preset in args.presets.split(","):
        ours = fastft_loader(args.data, preset, args.size, args.bs, args.workers)
        theirs = torchvision_loader(args.data, preset, args.size, args.bs, args.workers)
        fast, ref = [], []
        for _ in range(args.repeats):
            fast.append(images_per_second(ours, args.batches))
            ref.append(images_per_second(theirs, args.batches))
        row = {"preset": preset, "fastft_img_s": statistics.median(fast), "torchvision_img_s": statistics.median(ref),
               "fastft_runs": fast, "torchvision_runs": ref}
        row["ratio"] = row["fastft_img_s"] / row["torchvision_img_s"]
        rows.append(row)
        print(f"{preset}: fastft {row['fastft_img_s']:.0f} img/s, torchvision v2 {row['torchvision_img_s']:.0f} img/s")

    print(f"\n{args.data.name} train, {args.size} px, batch {args.bs}, {args.workers} workers, CPU; "
          f"median of {args.repeats} interleaved repeats of {args.batches} batches")
    print(f"{'preset':<8} {'fastft img/s':>12} {'torchvision v2 img/s':>20} {'ratio':>6}")
    for r in rows:
        print(f"{r['preset']:<8} {r['fastft_img_s']:>12.0f} {r['torchvision_img_s']:>20.0f} {r['ratio']:>6.2f}")
    write_results(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
