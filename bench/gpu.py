"""Speed on whatever device there is: a CUDA GPU when one is visible, else the CPU at smaller sizes.

    python bench/gpu.py                                  # CIFAR-10 from ../shared, the photos of ../shared/data/cat_breeds
    python bench/gpu.py --only loop --rounds 5
    python bench/gpu.py --only commands --epochs 10      # whole `fastft cifar` runs, cold and warm cache
    python bench/gpu.py --only decode,commands --baseline /tmp/before   # before and after, side by side

Tables (JSON to bench/results/gpu-<device>.json):
- loop: training images/s of the `cifar` recipe's loop (fastft), the d2l `train_ch13` loop (ImageFolder + flip +
  DataLoader with --workers workers) and plain fastai (ImageDataLoaders + vision_learner), each as a share of the
  limit measured in the same rounds: the same model's bare train step on a batch already on the device, stepped
  by torch's fused AdamW, in the same number format. Interleaved rounds; a ratio is the median of the rounds'.
- decode: seconds for fastft to find and decode all of CIFAR-10 into an empty cache folder (cold), and to read it
  back (warm), each in a fresh process; median of --repeats rounds.
- commands: whole `fastft cifar` commands: --epochs N on a cold cache (an empty cache folder) and a warm one, and
  the tiny run `--limit 1000 --epochs 1 --size 32 --no-pretrained` (--repeats times, median), with its fixed cost:
  wall time minus the epoch's seconds minus `python -c "import fastai.vision.all"` timed right after it; and the
  work outside training: the same against that import ending in gc.freeze() (as fastft's command ends), which
  spares it the interpreter's exit-time collections.
With --baseline (an earlier checkout: `git worktree add /tmp/before <commit>`), the decode table and the tiny run
measure that checkout too, interleaved with this one, and give this one's share of its time.
- photos: fine-tuning a small folder of photos at 224 px for 5 epochs, `fastft train` against the same job as a
  plain fastai script, both whole commands (imports included).
On a CPU every size shrinks (a CIFAR-10 subset, 1 epoch, 64 photos at 128 px) so the script runs in minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, SHARED, load_seconds, write_results

FASTFT = Path(sys.executable).with_name("fastft")


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def subset(source: Path, per_class: int, test_per_class: int) -> Path:
    root = Path(tempfile.mkdtemp()) / source.name
    for split, n in (("train", per_class), ("test", test_per_class)):
        for folder in sorted((source / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:n]:
                (root / split / folder.name / image.name).symlink_to(image.resolve())
    return root


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def autocast(device, precision: str):
    import contextlib

    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def fastft_learner(data: Path, bs: int, size: int, device):
    """The cifar recipe's Learner on `data`, on `device`, in its number format, every layer training."""
    from fastft.data.loaders import build_dataloaders, load_split
    from fastft.recipe import load_recipe
    from fastft.train.devices import resolve_precision, set_number_format
    from fastft.train.model import create_learner, normalization

    recipe = load_recipe("cifar").replace(data=str(data), bs=bs, size=size)
    dls = build_dataloaders(load_split(data, recipe, quiet=True), recipe, *normalization(recipe.arch), device)
    learn = create_learner(dls, recipe)
    precision = resolve_precision(recipe.precision, device)
    set_number_format(learn, precision, recipe.channels_last, device)
    learn.model.to(device)
    learn.unfreeze()
    return learn, precision


def epoch_rate(learn) -> float:
    """Training images/s of one epoch, validation excluded."""
    from fastai.callback.core import Callback

    class Clock(Callback):
        def before_train(self):
            synchronize()
            self.started, self.seen = time.perf_counter(), 0

        def after_batch(self):
            if self.training:
                self.seen += len(self.yb[0])

        def before_validate(self):
            synchronize()
            self.rate = self.seen / (time.perf_counter() - self.started)

    clock = Clock()
    with learn.no_bar(), learn.no_logging(), learn.added_cbs(clock):
        learn.fit(1, 1e-3)
    return clock.rate


def loop_table(args, device) -> list[dict]:
    import timm
    import torch
    from torchvision import datasets, transforms as T

    cuda = device.type == "cuda"
    data = args.data if cuda else subset(args.data, 256, 10)
    learn, precision = fastft_learner(data, args.bs, args.size, device)
    model = learn.model
    steps = 50 if cuda else 8

    def limit():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        x = torch.randn(args.bs, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.bs,), device=device)
        model.train()
        synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            with autocast(device, precision):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize()
        return steps * args.bs / (time.perf_counter() - started)

    d2l_model = timm.create_model("resnet18", num_classes=10).to(device).to(memory_format=torch.channels_last)
    transform = T.Compose([T.Resize(args.size), T.RandomHorizontalFlip(), T.ToTensor()])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(data / "train"), transform), batch_size=args.bs,
                                         shuffle=True, num_workers=args.workers, drop_last=True, pin_memory=cuda,
                                         persistent_workers=args.workers > 0)

    def d2l_loop():
        optimizer = torch.optim.AdamW(d2l_model.parameters(), lr=1e-3, fused=True)
        d2l_model.train()
        synchronize()
        seen, started = 0, time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device, precision):
                loss = torch.nn.functional.cross_entropy(d2l_model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
        synchronize()
        return seen / (time.perf_counter() - started)

    def plain_fastai():
        from fastai.vision.all import ImageDataLoaders, Resize, accuracy, vision_learner

        dls = ImageDataLoaders.from_folder(data, train="train", valid="test", item_tfms=Resize(args.size), bs=args.bs,
                                           num_workers=args.workers, device=device)
        fastai_learn = vision_learner(dls, "resnet18", pretrained=False, metrics=accuracy)
        if cuda:
            fastai_learn = fastai_learn.to_fp16()
        return epoch_rate(fastai_learn)

    pipelines = {"limit": limit, "fastft": lambda: epoch_rate(learn), "d2l loop": d2l_loop, "plain fastai": plain_fastai}
    rounds = {name: [] for name in pipelines}
    for pipeline in pipelines.values():  # warm-up: kernels chosen, workers started, caches filled
        pipeline()
    for _ in range(args.rounds):
        for name, pipeline in pipelines.items():
            rounds[name].append(pipeline())
    rows = []
    for name, rates in rounds.items():
        ratios = [r / lim for r, lim in zip(rates, rounds["limit"])]
        rows.append({"pipeline": name, "img_per_s": statistics.median(rates), "of_limit": statistics.median(ratios),
                     "rounds": [round(r) for r in rates]})
    return rows


def timed(command: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return time.perf_counter() - started, done.stdout


def checkouts(args) -> dict:
    """{label: fastft checkout (None: this one)} to measure side by side."""
    return {"now": None, **({f"baseline ({args.baseline})": args.baseline} if args.baseline else {})}


def decode_table(args, device) -> list[dict]:
    """Cold (an empty cache folder) then warm, per checkout, --repeats rounds interleaved; medians."""
    runs: dict = {}
    for _ in range(args.repeats):
        for label, tree in checkouts(args).items():
            cache = tempfile.mkdtemp(prefix="fastft-bench-cache-")
            for state in ("cold", "warm"):
                runs.setdefault((label, state), []).append(load_seconds(args.data, True, cache, tree))
    rows = [{"fastft": label, "cache": state, "seconds": statistics.median(times), "runs": [round(t, 2) for t in times]}
            for (label, state), times in runs.items()]
    for row in rows:  # against the last checkout's figure in the same state: the baseline's, when there is one
        row["of_baseline"] = row["seconds"] / next(r["seconds"] for r in reversed(rows) if r["cache"] == row["cache"])
    return rows


def fastft_cifar(tree: Path | None, args: list[str], cache: str, run: Path) -> tuple[float, dict]:
    """(wall seconds, metrics.json) of one whole `fastft cifar` command of checkout `tree` (None: this one)."""
    command = [str(FASTFT)] if tree is None else [sys.executable, "-m", "fastft"]
    env = {"FASTFT_CACHE": cache, **({"PYTHONPATH": str(tree)} if tree else {})}
    wall, _ = timed([*command, "cifar", *args, "--out", str(run)], env=env, cwd=tree)
    return wall, json.loads((run / "metrics.json").read_text())


def importing_fastai(frozen: bool = False) -> float:
    """`python -c "import fastai.vision.all"`, the fixed cost's reference; `frozen`: ending with gc.freeze() as
    fastft's command does, so the interpreter's exit skips its collections (about 1.3 s of the plain import on 2
    cores): against it, the fixed cost is only the work fastft does outside training."""
    return timed([sys.executable, "-c", "import fastai.vision.all" + ("; import gc; gc.freeze()" if frozen else "")])[0]


def command_table(args, device) -> list[dict]:
    cuda = device.type == "cuda"
    data = args.data if cuda else subset(args.data, 500, 100)
    epochs = args.epochs if cuda else 1
    cache = tempfile.mkdtemp(prefix="fastft-bench-cache-")
    work = Path(tempfile.mkdtemp())
    rows = []
    for name in ("cold cache", "warm cache"):
        wall, metrics = fastft_cifar(None, ["--data", str(data), "--epochs", str(epochs)], cache, work / name.replace(" ", "-"))
        training = sum(e["seconds"] for e in metrics["epochs"])
        rows.append({"command": f"fastft cifar --epochs {epochs} ({name})", "fastft": "now", "wall_s": wall,
                     "epochs_s": training, "test_acc": metrics["final"]["test_acc"]})
    tiny = ["--data", str(data), "--limit", "1000", "--epochs", "1", "--size", "32", "--no-pretrained"]
    runs = {label: [] for label in checkouts(args)}
    for repeat in range(args.repeats):  # interleaved: a busy moment of the machine hits both checkouts alike
        for which, (label, tree) in enumerate(checkouts(args).items()):
            wall, metrics = fastft_cifar(tree, tiny, cache, work / f"tiny-{which}-{repeat}")
            training = sum(e["seconds"] for e in metrics["epochs"])
            importing, importing_frozen = importing_fastai(), importing_fastai(frozen=True)
            runs[label].append({"wall_s": wall, "epochs_s": training, "import_fastai_s": importing,
                                "fixed_cost_s": wall - training - importing, "import_fastai_frozen_s": importing_frozen,
                                "work_outside_training_s": wall - training - importing_frozen})
    for label, measured in runs.items():
        rows.append({"command": "fastft cifar --limit 1000 --epochs 1 --size 32 --no-pretrained (tiny run)",
                     "fastft": label, **{key: statistics.median(r[key] for r in measured) for key in measured[0]},
                     "fixed_cost_runs": [round(r["fixed_cost_s"], 2) for r in measured]})
    return rows


PLAIN_FASTAI_SCRIPT = """
import sys
from fastai.vision.all import ImageDataLoaders, Resize, accuracy, aug_transforms, vision_learner
dls = ImageDataLoaders.from_folder(sys.argv[1], train="train", valid="test", item_tfms=Resize(int(sys.argv[2])),
                                   batch_tfms=aug_transforms(), bs=32)
learn = vision_learner(dls, "tf_efficientnet_lite0", metrics=accuracy, pretrained_cfg_overlay=dict(file=sys.argv[3]))
learn.fine_tune(4, freeze_epochs=1)
print(learn.validate()[1])
"""


def photos_table(args, device) -> list[dict]:
    import csv
    import random

    cuda = device.type == "cuda"
    per_class, size = (49, 224) if cuda else (10, 128)  # 5 breeds: 245 photos on a GPU
    root = Path(tempfile.mkdtemp()) / "photos"
    rows = list(csv.DictReader(open(args.photos / "labels.csv")))
    random.Random(0).shuffle(rows)
    taken: dict = {}
    for row in rows:
        split = "train" if len(taken.get(row["label"], [])) < per_class else "test"
        if len(taken.get(row["label"], [])) >= per_class + per_class // 4:
            continue
        taken.setdefault(row["label"], []).append(row)
        target = root / split / row["label"].replace(" ", "_") / row["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to((args.photos / "images" / row["image"]).resolve())
    weights = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    out = []
    for workers in args.photo_workers.split(","):
        wall, _ = timed([str(FASTFT), "train", str(root), "--arch", "tf_efficientnet_lite0", "--weights", str(weights),
                         "--size", str(size), "--epochs", "5", "--workers", workers, "--out", str(root.parent / f"run-{workers}")])
        accuracy = json.loads((root.parent / f"run-{workers}" / "metrics.json").read_text())["final"]["test_acc"]
        out.append({"command": f"fastft train (--workers {workers})", "wall_s": wall, "test_acc": accuracy})
    script = root.parent / "plain_fastai.py"
    script.write_text(PLAIN_FASTAI_SCRIPT)
    wall, printed = timed([sys.executable, str(script), str(root), str(size), str(weights)])
    out.append({"command": "plain fastai script", "wall_s": wall, "test_acc": float(printed.strip().splitlines()[-1])})
    for row in out:
        row["vs_plain_fastai"] = row["wall_s"] / out[-1]["wall_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="loop,decode,commands,photos")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "cifar10")
    parser.add_argument("--photos", type=Path, default=SHARED / "data" / "cat_breeds")
    parser.add_argument("--photo-workers", default="auto,2", help="comma list: --workers values for the photos table")
    parser.add_argument("--bs", type=int, default=128)
    parser.add_argument("--size", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=3, help="decode rounds and tiny runs per checkout")
    parser.add_argument("--baseline", type=Path, default=None, help="an earlier fastft checkout to measure side by side")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = device_name()
    tables = {}
    for part, build in (("loop", loop_table), ("decode", decode_table), ("commands", command_table),
                        ("photos", photos_table)):
        if part in args.only.split(","):
            tables[part] = build(args, device)
            print(f"\n{part} on {name}")
            for row in tables[part]:
                print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    path = args.json or ROOT / "bench" / "results" / f"gpu-{'cuda' if device.type == 'cuda' else 'cpu'}.json"
    write_results(path, {**vars(args), "device": name}, tables)


if __name__ == "__main__":
    main()
