"""Issue 7's performance suite: one entry point, one table, one JSON file.

    python bench/performance.py                          # pipeline, hotdog, cli, startup; ~15 min
    python bench/performance.py --only pipeline,cli      # a part of it
    python bench/performance.py --only precision        # fp32 vs bf16 vs channels_last, ~8 min
    python bench/performance.py --only batch            # the cifar recipe's loop at batch 256, 128, 64
    python bench/performance.py --only size             # 32 px against 40 px, fp32 against bf16
    python bench/performance.py --only optimizer        # one Adam step: fastai's vs fastft's fused, ~1 min
    python bench/performance.py --only accuracy --epochs 5  # time a whole `fastft cifar --epochs 5` run

Tables (each figure measured in the same run as its reference; throughput is the median of --repeats
interleaved repeats: limit, fastft, d2l, ..., limit, fastft, ...; a ratio is the median of each round's):
- pipeline: CIFAR-10 train subset at 32 px, ResNet-18, batch 256, fp32 throughout. Training images/s of each whole loop
  (read, augment, forward, backward, step), as a share of the limit: the same model's bare train step on a
  batch already in memory (torch's fused Adam). Rows: fastft (`fastft cifar`'s data path), fastft before issue 7 (decoding
  JPEGs every epoch in 2 workers: --no-cache), the d2l loop (ImageFolder + RandomHorizontalFlip +
  ToTensor + DataLoader(2 workers) + a hand-written step, as train_ch13) and plain fastai defaults.
- precision: the same subset and loop in each number format, fp32, bf16 autocast (`--precision bf16`) and
  channels_last, whole loop and bare step, to choose what `--precision auto` picks on a CPU.
- batch: the same subset through the cifar recipe's loop (fp32, 32 px) at batch 256, 128 and 64;
  a smaller batch takes more steps per epoch, which may train better and costs per-step overhead.
- size: the same subset through the cifar recipe's loop at 32 px and upscaled to 40 px, fp32 and bf16.
- optimizer: milliseconds per Adam step over ResNet-18's parameters, fastai's Adam vs FusedAdam.
- hotdog: the hotdog stand-in at 224 px, batch 32, every layer training: fastft's hotdog recipe path in
  the number format `--precision auto` picks on this machine, and in fp32, vs the d2l 13.2 loop
  (ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize, 2 workers, fp32), same model; the
  limit in fp32 and in bf16.
- cli: wall time of `fastft --help` and of an argument error (median of --repeats).
- startup: seconds to find and read all of CIFAR-10 before training: the old readability scan, the
  decode-once cache cold (empty cache folder) and warm.
- accuracy: one whole `fastft cifar --epochs N` (start-up included, all of CIFAR-10) against the d2l
  recipe's figures in bench/results/d2l_cifar.json (bench/d2l_cifar.py measures them, ~18 min).
Every pipeline runs in a process of its own, so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from common import ROOT, SHARED, load_seconds, write_results

FASTFT = Path(sys.executable).with_name("fastft")


def subset(source: Path, per_class: int, test_per_class: int = 10) -> Path:
    """train/ and test/ of symlinks to the first images of each class."""
    root = Path(tempfile.mkdtemp()) / source.name
    for split, n in (("train", per_class), ("test", test_per_class)):
        for folder in sorted((source / split).iterdir()):
            target = root / split / folder.name
            target.mkdir(parents=True)
            for image in sorted(folder.iterdir())[:n]:
                (target / image.name).symlink_to(image.resolve())
    return root


def train_phase_rate(learn) -> float:
    """Training images/s of one epoch through a fastai Learner, validation excluded."""
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


def fastft_learner(recipe_name: str, data: Path, **changes):
    """The recipe's Learner on `data`, with its number format (--precision, --channels-last) as `fastft` sets it."""
    import torch

    from fastft.data.loaders import build_dataloaders, load_split
    from fastft.train.devices import resolve_precision, set_number_format
    from fastft.train.model import create_learner, normalization
    from fastft.recipe import load_recipe

    recipe = load_recipe(recipe_name).replace(data=str(data), pretrained=False, **changes)
    split = load_split(data, recipe, quiet=True)
    cpu = torch.device("cpu")
    learn = create_learner(build_dataloaders(split, recipe, *normalization(recipe.arch), cpu), recipe)
    set_number_format(learn, resolve_precision(recipe.precision, cpu), recipe.channels_last, cpu)
    learn.unfreeze()  # every layer trains, as in fine-tuning's main phase and in the d2l loops
    return learn


def hand_written_loop(model, loader):
    """d2l's train_batch_ch13: forward, summed loss, backward, Adam step."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def run() -> float:
        model.train()
        seen, started = 0, time.perf_counter()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
            seen += len(y)
        return seen / (time.perf_counter() - started)
    return run


def bare_step(model, bs: int, size: int, classes: int, steps: int, variant: str = ""):
    """The limit: the model's train step on one batch held in memory, with torch's fastest Adam (the fused
    kernel). Variants: channels_last memory format, or bf16 autocast (what --precision bf16 does)."""
    import contextlib

    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(bs, 3, size, size), torch.randint(0, classes, (bs,))
    if variant == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)

    def context():
        return torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bf16" else contextlib.nullcontext()

    def run() -> float:
        model.train()
        started = time.perf_counter()
        for _ in range(steps):
            with context():
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return steps * bs / (time.perf_counter() - started)
    return run


def d2l_loader(folder: Path, transform, bs: int, workers: int):
    import torch
    from torchvision import datasets

    return torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transform), batch_size=bs, shuffle=True,
                                       num_workers=workers, drop_last=True)


FORMATS = {"fastft fp32": {"precision": "fp32", "channels_last": False},
           "fastft bf16": {"precision": "bf16", "channels_last": False},
           "fastft channels_last": {"precision": "fp32", "channels_last": True},
           "fastft bf16 channels_last": {"precision": "bf16", "channels_last": True}}
# The cifar recipe's loop (channels-last) at CIFAR's own 32 px and upscaled to 40 px: there the stock ImageNet
# stem leaves 2x2 maps in the last stage instead of 1x1, at about twice the arithmetic.
INPUT_SIZES = {"fastft 32 px": {"size": 32, "precision": "fp32"}, "fastft 32 px bf16": {"size": 32, "precision": "bf16"},
               "fastft 40 px": {"size": 40, "precision": "fp32"}, "fastft 40 px bf16": {"size": 40, "precision": "bf16"}}


def build(pipeline: str, s: dict):
    """The pipeline named `pipeline` as a function returning images/s of one pass."""
    import timm
    from torchvision import transforms as T

    data, bs, workers = Path(s["data"]), s["bs"], s["workers"]

    def learner(**changes):  # the recipe's Learner at the table's batch, input size and number format
        return fastft_learner(s["recipe"], data, **{"bs": bs, "size": s["size"], "precision": s["precision"], **changes})

    if pipeline.startswith("limit"):  # "limit", "limit channels_last", "limit bf16"
        learn = learner()
        return bare_step(learn.model, bs, s["size"], learn.dls.c, steps=s["steps"], variant=pipeline[6:])
    if pipeline == "fastft":
        return lambda learn=learner(): train_phase_rate(learn)
    if pipeline.startswith("fastft batch "):  # the recipe's own loop at another batch size
        return lambda learn=learner(bs=int(pipeline.split()[-1])): train_phase_rate(learn)
    if pipeline in FORMATS | INPUT_SIZES:  # fastft's loop in one number format or at one input size
        return lambda learn=learner(**(FORMATS | INPUT_SIZES)[pipeline]): train_phase_rate(learn)
    if pipeline == "fastft --no-cache":
        return lambda learn=learner(cache=False, workers=workers): train_phase_rate(learn)
    if pipeline == "d2l loop" and s["size"] == 32:
        loader = d2l_loader(data / "train", T.Compose([T.RandomHorizontalFlip(), T.ToTensor()]), bs, workers)
        return hand_written_loop(timm.create_model("resnet18", num_classes=10), loader)
    if pipeline == "d2l loop":  # d2l 13.2's train_augs, the fastft model
        normalize = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        loader = d2l_loader(data / "train", T.Compose([T.RandomResizedCrop(s["size"]), T.RandomHorizontalFlip(),
                                                       T.ToTensor(), normalize]), bs, workers)
        return hand_written_loop(learner(precision="fp32").model, loader)
    if pipeline == "plain fastai":
        from fastai.vision.all import ImageDataLoaders, accuracy, vision_learner

        dls = ImageDataLoaders.from_folder(data, train="train", valid="test", bs=bs, num_workers=workers)
        learn = vision_learner(dls, "resnet18", pretrained=False, metrics=accuracy)
        learn.unfreeze()
        return lambda: train_phase_rate(learn)
    raise ValueError(pipeline)


def serve(pipeline: str, settings: dict, conn) -> None:
    """A pipeline's own process: build it, warm it up, then time one pass per request."""
    import contextlib
    import io
    import resource
    import warnings

    # A spawned process inherits "spawn" as its default start method; DataLoader workers must fork, as
    # they do under a plain `python train.py`, or each epoch pays for re-importing torch in every worker.
    multiprocessing.set_start_method("fork", force=True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    with contextlib.redirect_stdout(io.StringIO()):
        run = build(pipeline, settings)
        run()  # warm-up: allocator, worker start, first-call costs
    while conn.recv() == "run":
        conn.send(run())
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MiB (Linux reports KiB)


def interleaved(pipelines: list[str], settings: dict, repeats: int) -> list[dict]:
    """Median images/s of each pipeline over `repeats` rounds, one pass each per round, its median ratio to
    the first pipeline's pass in the same round, the rounds it was faster than that pass, and its peak RSS."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name in pipelines:  # built one at a time: setting up must not overlap anyone's timing
        parent, child = context.Pipe()
        process = context.Process(target=serve, args=(name, settings, child))
        process.start()
        parent.send("run")
        parent.recv()
        workers[name] = (process, parent)
    rates = {name: [] for name in pipelines}
    for round_ in range(repeats):
        for name, (_, conn) in workers.items():
            conn.send("run")
            rates[name].append(conn.recv())
        print(f"  round {round_ + 1}/{repeats}: " + ", ".join(f"{n} {r[-1]:.0f}" for n, r in rates.items()), flush=True)
    rows = []
    for name, (process, conn) in workers.items():
        conn.send("stop")
        rss = conn.recv()
        process.join()
        rows.append({"pipeline": name, "images_per_s": statistics.median(rates[name]), "peak_rss_mib": rss,
                     "runs": rates[name]})
    for row in rows:  # against the first pipeline, round by round
        row["of_limit"] = median_ratio(row["runs"], rows[0]["runs"])
        row["faster_rounds"] = faster_rounds(row["runs"], rows[0]["runs"])
    return rows


def median_ratio(runs: list[float], reference: list[float]) -> float:
    """The median of each round's ratio to the reference measured beside it: the machine's drift cancels."""
    return statistics.median(rate / ref for rate, ref in zip(runs, reference))


def faster_rounds(runs: list[float], reference: list[float]) -> int:
    """In how many rounds a pipeline beat the reference measured beside it."""
    return sum(rate > ref for rate, ref in zip(runs, reference))


def timed_command(args: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one command."""
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    return time.perf_counter() - started, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def cli_rows(repeats: int) -> list[dict]:
    commands = {"fastft --help": [str(FASTFT), "--help"],
                "fastft cifar --epochs x (argument error)": [str(FASTFT), "cifar", "--epochs", "x"]}
    rows = []
    for name, args in commands.items():
        runs = [timed_command(args) for _ in range(repeats)]
        rows.append({"command": name, "seconds": statistics.median(r[0] for r in runs),
                     "peak_rss_mib": max(r[1] for r in runs), "exit_code": runs[0][2]})
    return rows


def accuracy_row(data: Path, epochs: int, seed: int) -> dict:
    """One whole `fastft cifar` run, start-up included, as a user would time it."""
    out = Path(tempfile.mkdtemp()) / "run"
    seconds, rss, code = timed_command([str(FASTFT), "cifar", "--data", str(data), "--epochs", str(epochs),
                                        "--seed", str(seed), "--out", str(out)])
    if code:
        raise SystemExit(f"fastft cifar exited {code}")
    final = json.loads((out / "metrics.json").read_text())["final"]
    return {"epochs": epochs, "seed": seed, "wall_seconds": seconds, "test_acc": final["test_acc"],
            "test_acc_tta": final.get("test_acc_tta"), "train_acc": final["train_acc"], "peak_rss_mib": rss,
            "recipe": (out / "recipe.toml").read_text()}


def run_settings(row: dict) -> tuple:
    """What tells one accuracy run from another: epochs, seed, and the resolved recipe's size and number format."""
    recipe = tomllib.loads(row["recipe"])
    return row["epochs"], row["seed"], recipe["size"], recipe["precision"]


def optimizer_rows(repeats: int, steps: int = 20) -> list[dict]:
    """Milliseconds per optimizer step over ResNet-18's parameters (10 classes, the stage groups of a
    Learner): fastai's Adam against fastft's FusedAdam, interleaved, same gradients."""
    import timm
    import torch
    from fastai.optimizer import Adam

    from fastft.train.optimizer import FusedAdam

    model = timm.create_model("resnet18", num_classes=10)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    groups = [list(model.conv1.parameters()) + list(model.bn1.parameters())] + \
             [list(getattr(model, f"layer{i}").parameters()) for i in range(1, 5)] + [list(model.fc.parameters())]
    optimizers = {"fastai Adam": Adam(groups, lr=1e-3, wd=0.2), "fastft FusedAdam": FusedAdam(groups, lr=1e-3, wd=0.2)}
    times = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, opt in optimizers.items():
            opt.step()  # warm-up
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[name].append((time.perf_counter() - start) / steps * 1000)
    reference = times["fastai Adam"]
    return [{"optimizer": name, "ms_per_step": statistics.median(t), "of_fastai": median_ratio(t, reference)}
            for name, t in times.items()]


def startup_rows(data: Path) -> list[dict]:
    """Seconds to find and read all of `data` before training: the readability scan of decoding per
    batch (--no-cache), the decode-once cache cold (empty cache folder) and warm (read back)."""
    cache = tempfile.mkdtemp()
    return [{"step": name, "seconds": load_seconds(data, cached, cache)}
            for name, cached in (("scan only (--no-cache)", False), ("decode once, cold", True), ("decode once, warm", True))]


def print_table(title: str, rows: list[dict], columns: dict) -> None:
    print(f"\n{title}")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(fmt.format(row[key]) for key, fmt in columns.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="pipeline,hotdog,cli,startup",
                        help="comma-separated: pipeline, precision, batch, size, optimizer, hotdog, cli, startup, accuracy")
    parser.add_argument("--cifar", type=Path, default=SHARED / "data" / "cifar10")
    parser.add_argument("--hotdog", type=Path, default=SHARED / "data" / "hotdog")
    parser.add_argument("--per-class", type=int, default=512, help="CIFAR train images per class in the pipeline table")
    parser.add_argument("--hotdog-images", type=int, default=128, help="hotdog train images per class at 224 px")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loops")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5, help="accuracy: fastft cifar --epochs")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "performance.json")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    results = json.loads(args.json.read_text())["results"] if args.json.is_file() else {}
    if "cli" in parts:  # first, while this process is small: Linux counts a child's RSS from before exec too
        results["cli"] = {"date": time.strftime("%Y-%m-%d"), "rows": cli_rows(args.repeats)}
    import torch

    threads = torch.get_num_threads()
    if parts & {"pipeline", "precision", "batch", "size"}:  # one CIFAR subset for all four
        cifar_settings = {"recipe": "cifar", "data": str(subset(args.cifar, args.per_class)), "bs": 256, "size": 32,
                          "precision": "fp32", "workers": args.workers, "steps": 8}
    if "pipeline" in parts:
        rows = interleaved(["limit", "fastft", "fastft --no-cache", "d2l loop", "plain fastai", "limit channels_last",
                            "limit bf16"], cifar_settings, args.repeats)
        results["pipeline"] = {"date": time.strftime("%Y-%m-%d"), "threads": threads, "rows": rows,
                               "setup": f"CIFAR-10 subset, {10 * args.per_class} train JPEGs, 32 px, ResNet-18, batch 256"}
    if "precision" in parts:  # the same loop in each number format: which is fastest on this device?
        rows = interleaved(["limit", *FORMATS, "limit bf16", "limit channels_last"], cifar_settings, args.repeats)
        fp32 = next(row["runs"] for row in rows if row["pipeline"] == "fastft fp32")
        for row in rows:  # against fastft's own fp32 loop, round by round
            row["of_fp32"] = median_ratio(row["runs"], fp32)
            row["faster_rounds"] = faster_rounds(row["runs"], fp32)
        results["precision"] = {"date": time.strftime("%Y-%m-%d"), "threads": threads, "rows": rows,
                                "setup": f"number formats, CIFAR-10 subset, {10 * args.per_class} train JPEGs, 32 px, "
                                         "ResNet-18, batch 256"}
    if "batch" in parts:  # images/s per batch size, against the d2l batch of 256
        rows = interleaved(["fastft batch 256", "fastft batch 128", "fastft batch 64"], cifar_settings, args.repeats)
        results["batch"] = {"date": time.strftime("%Y-%m-%d"), "threads": threads, "rows": rows,
                            "setup": f"batch sizes, CIFAR-10 subset, {10 * args.per_class} train JPEGs, 32 px, ResNet-18, "
                                     "channels-last, fp32"}
    if "size" in parts:  # images/s per input size and number format, against CIFAR's own 32 px in fp32
        rows = interleaved(list(INPUT_SIZES), cifar_settings, args.repeats)
        results["size"] = {"date": time.strftime("%Y-%m-%d"), "threads": threads, "rows": rows,
                           "setup": f"input sizes, CIFAR-10 subset, {10 * args.per_class} train JPEGs, ResNet-18, batch 256, "
                                    "channels-last"}
    if "optimizer" in parts:
        results["optimizer"] = {"date": time.strftime("%Y-%m-%d"), "threads": threads, "rows": optimizer_rows(args.repeats)}
    if "hotdog" in parts:
        settings = {"recipe": "hotdog", "data": str(subset(args.hotdog, args.hotdog_images)), "bs": 32, "size": 224,
                    "precision": "auto", "workers": args.workers, "steps": 4}
        rows = interleaved(["limit", "fastft", "d2l loop", "fastft fp32", "limit bf16"], settings, args.repeats)
        results["hotdog"] = {"date": time.strftime("%Y-%m-%d"), "threads": threads, "rows": rows,
                             "setup": f"hotdog stand-in, {2 * args.hotdog_images} train JPEGs, 224 px, ResNet-18, batch 32, every layer training"}
    if "startup" in parts:
        results["startup"] = {"date": time.strftime("%Y-%m-%d"), "rows": startup_rows(args.cifar)}
    if "accuracy" in parts:
        row = accuracy_row(args.cifar, args.epochs, args.seed)
        # a re-run replaces its row; rows run under earlier defaults (another size or number format) stay
        runs = [r for r in results.get("accuracy", {}).get("rows", []) if run_settings(r) != run_settings(row)]
        results["accuracy"] = {"date": time.strftime("%Y-%m-%d"), "rows": sorted(runs + [row], key=lambda r: r["epochs"])}

    for part in ("pipeline", "precision", "batch", "size", "hotdog"):
        if part in results:
            reference = {"batch": "batch 256", "size": "32 px"}.get(part, "limit")
            columns = {"pipeline": ("pipeline", "{}"), "img/s": ("images_per_s", "{:.0f}"), f"of {reference}": ("of_limit", "{:.2f}")}
            if part == "precision":
                columns |= {"vs fastft fp32": ("of_fp32", "{:.2f}"), "rounds faster": ("faster_rounds", "{}")}
            if part in ("batch", "size"):
                columns |= {"rounds faster": ("faster_rounds", "{}")}
            print_table(f"{part}: {results[part]['setup']}; CPU, {results[part]['threads']} threads; "
                        f"median of {len(results[part]['rows'][0]['runs'])} interleaved repeats ({results[part]['date']})",
                        results[part]["rows"], columns | {"peak RSS MiB": ("peak_rss_mib", "{:.0f}")})
    if "optimizer" in results:
        print_table(f"optimizer: one step over ResNet-18's parameters, {results['optimizer']['threads']} threads, median of "
                    f"interleaved repeats ({results['optimizer']['date']})", results["optimizer"]["rows"],
                    {"optimizer": ("optimizer", "{}"), "ms/step": ("ms_per_step", "{:.1f}"), "of fastai Adam": ("of_fastai", "{:.2f}")})
    if "cli" in results:
        print_table(f"cli ({results['cli']['date']})", results["cli"]["rows"],
                    {"command": ("command", "{}"), "seconds": ("seconds", "{:.2f}"), "peak RSS MiB": ("peak_rss_mib", "{:.0f}")})
    if "startup" in results:
        print_table(f"start-up: find and read all of CIFAR-10 (60,000 JPEGs), one run each ({results['startup']['date']})",
                    results["startup"]["rows"], {"step": ("step", "{}"), "seconds": ("seconds", "{:.1f}")})
    if "accuracy" in results:
        d2l = json.loads((ROOT / "bench" / "results" / "d2l_cifar.json").read_text())
        rows = [{"run": f"d2l recipe, {d2l['epochs']} epochs ({d2l['measured']})", "wall_seconds": d2l["wall_seconds"],
                 "test_acc": d2l["test_acc"], "test_acc_tta": "-", "of_d2l": 1.0}]
        if issue := d2l.get("issue_figures"):  # the figures issue 7 set its targets by, from an earlier run
            rows.append({"run": f"d2l recipe, {d2l['epochs']} epochs ({issue['measured']})", "wall_seconds": issue["wall_seconds"],
                         "test_acc": issue["test_acc"], "test_acc_tta": "-", "of_d2l": issue["wall_seconds"] / d2l["wall_seconds"]})
        rows += [{"run": "fastft cifar --epochs {} --seed {} ({} px, {})".format(*run_settings(r)), "wall_seconds": r["wall_seconds"], "test_acc": r["test_acc"],
                  "test_acc_tta": f"{r['test_acc_tta']:.3f}" if r.get("test_acc_tta") else "-",
                  "of_d2l": r["wall_seconds"] / d2l["wall_seconds"]} for r in results["accuracy"]["rows"]]
        print_table(f"time to accuracy, all of CIFAR-10 ({results['accuracy']['date']})", rows,
                    {"run": ("run", "{}"), "wall s": ("wall_seconds", "{:.0f}"), "test acc": ("test_acc", "{:.3f}"),
                     "with flip TTA": ("test_acc_tta", "{}"), f"time vs d2l ({d2l['measured']})": ("of_d2l", "{:.2f}")})
    write_results(args.json, vars(args), results)


if __name__ == "__main__":
    main()
