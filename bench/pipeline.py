"""Pipeline efficiency at 32 px (issue 7's first table): training images/s of whole training loops,
each as a share of the same model's bare train step on tensors already in memory (the limit).

    python bench/pipeline.py          # CIFAR-10 train subset (5,120 JPEGs), ResNet-18, batch 256, 2 workers

Pipelines, interleaved --repeats times (limit, fastft, d2l, fastai, limit, ...), medians reported:
- limit:  timm ResNet-18 + fastai head, Adam, forward/backward/step on one batch held in memory
- fastft: `fastft cifar` (flip, one-cycle) through fastft's own DataLoaders and Learner, train phase only
- d2l:    torchvision ImageFolder + RandomHorizontalFlip + ToTensor + DataLoader + a hand-written step (train_ch13)
- fastai: plain fastai ImageDataLoaders.from_folder + vision_learner + fit, train phase only
Writes JSON to --json.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, SHARED, write_results


def subset(source: Path, per_class: int) -> Path:
    """train/ and test/ of symlinks to the first `per_class` images of each class (test: 10 per class)."""
    root = Path(tempfile.mkdtemp()) / "cifar-subset"
    for split, n in (("train", per_class), ("test", 10)):
        for folder in sorted((source / split).iterdir()):
            target = root / split / folder.name
            target.mkdir(parents=True)
            for image in sorted(folder.iterdir())[:n]:
                (target / image.name).symlink_to(image.resolve())
    return root


def train_phase_rate(learn) -> float:
    """Training images/s of one epoch, validation excluded."""
    from fastai.callback.core import Callback

    class Clock(Callback):
        def before_train(self):
            self.started, self.seen = time.perf_counter(), 0

        def after_batch(self):
            if self.training:
                self.seen += len(self.yb[0])

        def before_validate(self):
            self.rate = self.seen / (time.perf_counter() - self.started)

    clock = Clock()
    with learn.no_bar(), learn.no_logging(), learn.added_cbs(clock):
        learn.fit(1, 1e-3)
    return clock.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "cifar10")
    parser.add_argument("--per-class", type=int, default=512)
    parser.add_argument("--bs", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    args = parser.parse_args()

    import timm
    import torch
    from fastai.vision.all import ImageDataLoaders, accuracy, vision_learner
    from torchvision import datasets, transforms

    from fastft.data import build_dataloaders, load_split
    from fastft.model import create_learner, normalization
    from fastft.recipe import load_recipe

    data = subset(args.data, args.per_class)
    recipe = load_recipe("cifar").replace(data=str(data), bs=args.bs, workers=args.workers)
    with contextlib.redirect_stdout(io.StringIO()):
        split = load_split(data, recipe)
        ours = create_learner(build_dataloaders(split, recipe, *normalization(recipe.arch), torch.device("cpu")), recipe)
        theirs = vision_learner(ImageDataLoaders.from_folder(data, train="train", valid="test", bs=args.bs,
                                                             num_workers=args.workers), "resnet18",
                                pretrained=False, metrics=accuracy)
    ours.unfreeze()

    model = ours.model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = torch.randn(args.bs, 3, 32, 32), torch.randint(0, 10, (args.bs,))

    def limit() -> float:
        model.train()
        steps = 8
        started = time.perf_counter()
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return steps * args.bs / (time.perf_counter() - started)

    d2l_net = timm.create_model("resnet18", num_classes=10)
    d2l_opt = torch.optim.Adam(d2l_net.parameters(), lr=1e-3)
    d2l_loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(data / "train"), transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()])),
        batch_size=args.bs, shuffle=True, num_workers=args.workers)

    def d2l() -> float:
        d2l_net.train()
        seen, started = 0, time.perf_counter()
        for x, y in d2l_loader:
            loss = torch.nn.functional.cross_entropy(d2l_net(x), y, reduction="none")
            d2l_opt.zero_grad()
            loss.sum().backward()  # as d2l's train_batch_ch13
            d2l_opt.step()
            seen += len(y)
        return seen / (time.perf_counter() - started)

    pipelines = {"limit": limit, "fastft": lambda: train_phase_rate(ours), "d2l loop": d2l,
                 "plain fastai": lambda: train_phase_rate(theirs)}
    for run in pipelines.values():  # warm-up: workers, allocator, first-call costs
        run()
    rates = {name: [] for name in pipelines}
    for _ in range(args.repeats):
        for name, run in pipelines.items():
            rates[name].append(run())
            print(f"{name}: {rates[name][-1]:.0f} img/s")

    best = {name: statistics.median(r) for name, r in rates.items()}
    rows = [{"pipeline": name, "images_per_s": best[name], "of_limit": best[name] / best["limit"], "runs": rates[name]}
            for name in pipelines]
    print(f"\nCIFAR-10 subset ({10 * args.per_class} train images), 32 px, ResNet-18, batch {args.bs}, "
          f"{args.workers} workers, CPU ({torch.get_num_threads()} threads); median of {args.repeats} interleaved repeats")
    print(f"{'pipeline':<14} {'img/s':>7} {'of limit':>8}")
    for r in rows:
        print(f"{r['pipeline']:<14} {r['images_per_s']:>7.0f} {r['of_limit']:>8.2f}")
    write_results(args.json, vars(args), rows)


if __name__ == "__main__":
    main()
