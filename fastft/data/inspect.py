"""`fastft inspect DATA`: what a dataset holds, before any training.

Images per class and split (the split training would make: the same seed, --valid-pct and labels CSV rules),
unreadable files (the rules training uses), image sizes and modes, exact duplicates by content (within a
split, and across train and test: leakage that flatters test accuracy), and classes too small to learn from.
Written as text, JSON and a PNG grid of sample images per class. Light: PIL and NumPy, no fastai.
"""
from __future__ import annotations

import hashlib
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastft.data.folders import keep_readable
from fastft.data.split import Split

TINY_CLASS = 10  # fewer training images than this: a warning
SAMPLES_PER_CLASS = 6


def content_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def duplicates(split: Split) -> dict:
    """Exact duplicate files by content: {"within": {part: [[file, file, ...], ...]}, "across": [[train file,
    test file], ...]} (across: the same bytes in the training and the test split)."""
    parts = {part: [p for p, _ in split.items(part)] for part in split.parts}
    from fastft.data.cache import content_hashes

    every = [p for files in parts.values() for p in files]
    hashes = dict(zip(every, content_hashes(every, content_hash)))
    within = {}
    for part, files in parts.items():
        groups: dict[str, list[Path]] = {}
        for p in files:
            groups.setdefault(hashes[p], []).append(p)
        within[part] = [[str(p) for p in g] for g in groups.values() if len(g) > 1]
    train = {}
    for p in parts["train"]:
        train.setdefault(hashes[p], p)
    across = [[str(train[hashes[p]]), str(p)] for part in ("test", "valid") for p in parts.get(part, []) if hashes[p] in train]
    return {"within": within, "across": across}


def leakage_warning(split: Split) -> str:
    """One line when the test (or validation) split holds exact copies of training images, else ''."""
    across = duplicates(split)["across"]
    if not across:
        return ""
    return (f"warning: {len(across)} test/validation image(s) are exact copies of training images (e.g. {across[0][1]} "
            f"= {across[0][0]}): the test accuracy overstates; `fastft inspect` lists them all")


def _size_and_mode(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size, im.mode


def report(split: Split, data: Path) -> dict:
    """The whole report as plain data (what --json prints)."""
    counts = {part: {c: sum(len(files) for key, files in getattr(split, part).items() if c in split.labels_of(key))
                     for c in split.classes} for part in split.parts}
    files = [p for part in split.parts for p, _ in split.items(part)]
    readable, unreadable = keep_readable(files, quiet=True)
    with ThreadPoolExecutor(8) as pool:
        shapes = list(pool.map(_size_and_mode, readable))
    widths, heights = [w for (w, _), _ in shapes], [h for (_, h), _ in shapes]
    sizes = {"width": {"min": min(widths), "median": statistics.median(widths), "max": max(widths)},
             "height": {"min": min(heights), "median": statistics.median(heights), "max": max(heights)},
             "most_common": [[f"{w}x{h}", n] for (w, h), n in Counter(s for s, _ in shapes).most_common(5)]} if shapes else {}
    empty = sorted(c for c in split.classes if not any(counts[part][c] for part in split.parts))
    tiny = sorted(c for c, n in counts["train"].items() if n < TINY_CLASS and c not in empty)
    return {"data": str(data), "classes": split.classes, "multi_label": split.multi_label, "images": counts,
            "totals": {part: len(split.items(part)) for part in split.parts},
            "unreadable": [[str(p), why] for p, why in unreadable], "sizes": sizes,
            "modes": dict(Counter(m for _, m in shapes).most_common()), "duplicates": duplicates(split),
            "tiny_classes": tiny, "empty_classes": empty}


def as_text(r: dict) -> str:
    parts = list(r["images"])
    lines = [f"{r['data']}: {len(r['classes'])} {'labels (multi-label)' if r['multi_label'] else 'classes'}, "
             + ", ".join(f"{r['totals'][p]} {p}" for p in parts) + " images"]
    lines.append(f"{'class':<24}" + "".join(f"{p:>8}" for p in parts))
    lines += [f"{c:<24}" + "".join(f"{r['images'][p][c]:>8}" for p in parts) for c in r["classes"]]
    if r["sizes"]:
        w, h = r["sizes"]["width"], r["sizes"]["height"]
        lines.append(f"sizes: width {w['min']}-{w['max']} (median {w['median']:g}), height {h['min']}-{h['max']} "
                     f"(median {h['median']:g}); most common " + ", ".join(f"{s} ({n})" for s, n in r["sizes"]["most_common"]))
    lines.append("modes: " + ", ".join(f"{m} {n}" for m, n in r["modes"].items()))
    lines.append(f"unreadable: {len(r['unreadable'])}" + "".join(f"\n  {p} ({why})" for p, why in r["unreadable"][:10]))
    dup = r["duplicates"]
    within = {p: len(groups) for p, groups in dup["within"].items() if groups}
    lines.append("duplicates within a split: " + (", ".join(f"{n} group(s) in {p}" for p, n in within.items()) or "none"))
    lines.append(f"train/test duplicates (leakage): {len(dup['across'])}"
                 + "".join(f"\n  {a} = {b}" for a, b in dup["across"][:10]))
    if r["empty_classes"]:
        lines.append(f"warning: empty class folders (no images; training refuses them): {', '.join(r['empty_classes'])}")
    if r["tiny_classes"]:
        lines.append(f"warning: fewer than {TINY_CLASS} training images in: {', '.join(r['tiny_classes'])}")
    return "\n".join(lines)


def sample_grid(split: Split, path: Path, per_class: int = SAMPLES_PER_CLASS) -> None:
    """A PNG: one row per class, a few of its training images."""
    from fastft.atomic import subplots

    from fastft.atomic import save_figure
    from fastft.data.images import open_rgb

    rows = len(split.classes)
    fig, axes = subplots(rows, per_class, figsize=(per_class * 1.6, rows * 1.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, c in enumerate(split.classes):
        files = [p for key, ps in sorted(split.train.items()) if c in split.labels_of(key) for p in ps][:per_class]
        for ax, f in zip(axes[r], files):
            try:
                ax.imshow(open_rgb(f))
            except Exception:  # an unreadable file is listed in the report; the grid just leaves a gap
                continue
        axes[r][0].set_title(c, fontsize=9, loc="left")
    fig.tight_layout()
    save_figure(fig, path)
