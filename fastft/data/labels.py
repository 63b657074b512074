"""Labels from a CSV file instead of class folders: `--labels FILE.csv`.

The file has a header row, an image column (paths relative to the CSV's folder or to --data, or to an images/ folder in either) and a label
column; both are found by name (image/file/path..., label/class/tags...) or set with --image-col and
--label-col. A label cell holding several labels separated by --label-delim makes the run multi-label.
An optional split column decides the split: `split` (train / valid / test) or fastai's boolean `is_valid`.
Without one, each label (each combination of labels, multi-label) is split by a seeded --valid-pct, as
class folders are. Rows naming files that do not exist are skipped with one warning; every other problem
(no header, an unknown column, an empty label, a label only the test split has) is a one-line error that
names the row or column and the fix.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from fastft.data.split import Split, labels_in, seeded_split
from fastft.errors import UsageError

IMAGE_COLUMNS = ("image", "images", "file", "filename", "file_name", "fname", "path", "image_path", "img", "name", "image_id", "id")
LABEL_COLUMNS = ("label", "labels", "class", "classes", "category", "categories", "tag", "tags", "target", "y")
SPLIT_COLUMNS = ("split", "is_valid", "subset", "fold")
TRAIN, VALID, TEST = "train", "valid", "test"
SPLIT_VALUES = {"train": TRAIN, "training": TRAIN, "valid": VALID, "validation": VALID, "val": VALID, "dev": VALID,
                "test": TEST, "testing": TEST}
AUTO, NO_DELIMITER = "", "none"


def at_least_two_labels(source: Path, labels: list[str]) -> None:
    """A classifier needs two labels (a labels CSV)."""
    if len(labels) < 2:
        raise UsageError(f"{source} gives {'only the label ' + labels[0] if labels else 'no labels'}; a classifier "
                         "needs at least two")


def _column(header: list[str], given: str, known: tuple, what: str, option: str, table: Path) -> str:
    if given:
        if given not in header:
            raise UsageError(f"{table} has no column '{given}' (its columns: {', '.join(header)}); fix {option}")
        return given
    found = next((h for h in header if h.strip().lower() in known), None)
    if found is None:
        raise UsageError(f"{table}: no {what} column among {', '.join(header)}; name it with {option}")
    return found


def _has_header(first: list[str], folders: list[Path]) -> bool:
    """A first row that names files that exist is data, not a header."""
    return not any(cell and any((f / cell).is_file() for f in folders) for cell in first)


def choose_delimiter(cells: list[str], delimiter: str) -> str:
    """The multi-label delimiter: as given; 'none' for single-label; auto: ';' when a cell has one, else a space
    when every word of every cell with spaces is also a whole label of some other row ("cat dog" beside "cat"
    and "dog"), else none: "American Bobtail" is one label."""
    if delimiter == NO_DELIMITER:
        return ""
    if delimiter != AUTO:
        return delimiter
    if any(";" in c for c in cells):
        return ";"
    spaced = [c for c in cells if " " in c.strip()]
    whole = {c.strip() for c in cells if " " not in c.strip()}
    if spaced and all(word in whole for c in spaced for word in c.split()):
        return " "
    return ""


def read_labels(table: Path, data: Path | None, image_col: str, label_col: str, delimiter: str, valid_pct: float,
                seed: int, quiet: bool = False) -> Split:
    """The Split a labels CSV describes. Keys of Split.train/test/valid are label cells, normalised: one label,
    or several joined by the delimiter in sorted order (multi-label: Split.delimiter is set)."""
    table = Path(table)
    if not table.is_file():
        raise UsageError(f"labels file {table} does not exist; pass --labels with a CSV file of image paths and labels")
    # where a row's path may be relative to: the CSV's folder, --data, and an images/ folder in either (the
    # common layout of a CSV naming bare file names beside an images/ folder)
    bases = [table.parent] + ([Path(data)] if data else [])
    folders = [*bases, *(b / "images" for b in bases if (b / "images").is_dir())]
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{table} is not a readable CSV file ({e}); save it as UTF-8 CSV") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise UsageError(f"{table} has no rows of images and labels; expected a header (image,label) and one row per image")
    header = [h.strip() for h in rows[0]]
    if not _has_header(rows[0], folders):
        raise UsageError(f"{table} has no header row (its first row names an image); add one, e.g. image,label")
    image, label = (_column(header, image_col, IMAGE_COLUMNS, "image", "--image-col", table),
                    _column(header, label_col, LABEL_COLUMNS, "label", "--label-col", table))
    split_col = next((h for h in header if h.strip().lower() in SPLIT_COLUMNS and h not in (image, label)), None)
    at = {name: i for i, name in enumerate(header)}
    cells = []
    for number, row in enumerate(rows[1:], start=2):  # row 1 is the header
        row = row + [""] * (len(header) - len(row))
        if not row[at[label]].strip():
            raise UsageError(f"{table}, row {number}: the label cell ('{label}') is empty; give every image a label, "
                             "or remove the row")
        cells.append((number, row[at[image]].strip(), row[at[label]].strip(), row[at[split_col]].strip() if split_col else ""))
    delim = choose_delimiter([c for _, _, c, _ in cells], delimiter)

    parts: dict[str, dict[str, list[Path]]] = {TRAIN: {}, VALID: {}, TEST: {}}
    missing, outside, repeated, conflicting = [], [], [], []
    roots = [b.resolve() for b in bases]
    first_row: dict[Path, tuple[int, str]] = {}  # a file -> the row that labelled it first, and its label
    for number, name, cell, where in cells:
        path = next((f / name for f in folders if (f / name).is_file()), None)
        if path is None:
            missing.append(name)
            continue
        key = delim.join(sorted({t.strip() for t in cell.split(delim) if t.strip()})) if delim else cell
        real = path.resolve()
        if real in first_row:  # the first row wins: an image is trained on once, with one label
            (repeated if first_row[real][1] == key else conflicting).append(
                f"{name} (rows {first_row[real][0]} and {number}"
                + (f": {first_row[real][1]!r} and {key!r})" if first_row[real][1] != key else ")"))
            continue
        first_row[real] = (number, key)
        if not any(real.is_relative_to(root) for root in roots):
            outside.append(name)
        parts[_split_of(where, split_col, number, table) if split_col else TRAIN].setdefault(key, []).append(path)
    if not quiet:
        for problem, names in (("names {} file(s) that do not exist; training on the other rows", missing),
                               ("names {} file(s) outside its folder and --data (an absolute or ../ path); they are "
                                "used: check that they are meant", outside),
                               ("lists {} file(s) twice with the same label; each is used once", repeated),
                               ("lists {} file(s) twice with different labels; the first row's label is used: fix the "
                                "others", conflicting)):
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                print(f"warning: {table} {problem.format(len(names))}: {shown}", file=sys.stderr)
    if not any(parts[TRAIN].values()):
        raise UsageError(f"none of the training images {table} names exist (looked beside it"
                         + (f" and in {data}" if data else "") + "); fix the paths, or pass --data with their folder")
    if not split_col:
        parts[TRAIN], parts[TEST] = seeded_split(parts[TRAIN], valid_pct, seed, strict=not delim)
    elif not parts[TEST]:  # train and valid only (fastai's is_valid): the valid rows serve as the test split
        parts[TEST], parts[VALID] = parts[VALID], {}
    vocabulary = _vocabulary(parts[TRAIN], delim)
    for part in (TEST, VALID):
        if unknown := sorted(_vocabulary(parts[part], delim) - vocabulary):
            raise UsageError(f"{table}: label(s) {', '.join(unknown)} appear in the {part} split but in no training row; "
                             "add training images of them, or remove those rows")
    at_least_two_labels(table, sorted(vocabulary))
    split = Split(sorted(vocabulary), {k: sorted(v) for k, v in parts[TRAIN].items()},
                  {k: sorted(v) for k, v in parts[TEST].items()}, {k: sorted(v) for k, v in parts[VALID].items()})
    split.delimiter = delim
    return split


def _vocabulary(by_key: dict, delim: str) -> set[str]:
    return {label for key in by_key for label in labels_in(key, delim)}


def _split_of(value: str, column: str, number: int, table: Path) -> str:
    lowered = value.strip().lower()
    if column.lower() == "is_valid":
        if lowered in ("true", "1", "yes"):
            return VALID
        if lowered in ("false", "0", "no", ""):
            return TRAIN
    elif lowered in SPLIT_VALUES:
        return SPLIT_VALUES[lowered]
    raise UsageError(f"{table}, row {number}: '{value}' in column '{column}' is not a split; use train, valid or test"
                     + (" (or true/false for is_valid)" if column.lower() == "is_valid" else ""))
