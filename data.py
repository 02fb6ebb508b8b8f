"""What is on disk: the images, labels and groups of a data set, and which of them can be read. How
they are split is splits.py; how pixels reach a model, pixels.py; DICOM files, dicom.py.

Three layouts are read (see README, "Data layouts"):
  1. DIR/<class>/**/*.jpg             class folders (or a flat folder: unlabelled)
  2. DIR/{train,val,test}/<class>/... the curator's split is kept
  3. labels.csv (or DIR/labels.csv)   a path column + `label`, or one 0/1 column per class
Groups: a CSV's `group_col`, or groups.csv (columns path, group) in a folder.
The tools' --images (index_images) also take image files one by one.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from errors import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm"}
SPLIT_RATIOS = {"train": 0.7, "val": 0.1, "test": 0.2}  # Sec. 4.1 / App. C
PATH_COLUMNS = ("path", "file", "filename", "image", "image_id", "img")
# Larger files are skipped with a reason. This is where Pillow's own guard against decompression
# bombs turns from a warning into an error; Pillow's global limit is left as it is.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
# an image file -> what the duplicate check compares of its pixels as training decodes them (raises Unreadable
# when they cannot be decoded): fingerprints.file_fingerprint
Fingerprint = Callable[[Path], list]


class Unreadable(Exception):
    """A Fingerprint's answer for a file whose pixels do not decode; the message says why."""


@dataclass
class DataIndex:
    """Every usable image of a data set. `paths` are relative to `root` (posix);
    `targets` (N,) int64 class ids, (N, C) float32 multi-hot, or None; `groups` one id per image or None."""
    source: Path
    root: Path
    layout: str
    paths: list[str]
    targets: np.ndarray | None
    classes: list[str]
    multilabel: bool = False
    given_split: dict[str, list[int]] | None = None
    skipped: list[dict] = field(default_factory=list)
    groups: list[str] | None = None
    prints: list | None = None  # what index_data's `fingerprint` made of each image, when it was given one

    @property
    def labelled(self) -> bool:
        return self.targets is not None

    def describe(self) -> str:
        kind = ("multi-label" if self.multilabel else "multi-class") if self.labelled else "unlabelled"
        given = f", curator split {sorted(self.given_split)}" if self.given_split else ""
        return (f"{self.layout} at {self.source}: {len(self.paths)} images, "
                f"{len(self.classes)} classes, {kind}{given}, {len(self.skipped)} skipped")

    def label(self, i: int) -> str:
        """Image i's class name; for multi-label data its labels' names, ';'-joined (empty: none)."""
        if self.multilabel:
            return ";".join(c for c, on in zip(self.classes, self.targets[i]) if on > 0.5)
        return self.classes[int(self.targets[i])]

    def part(self, ids: list[int]) -> tuple[list[str], np.ndarray | None]:
        """(paths, targets) of the images at positions `ids`: what pixels.ImageDataset takes."""
        return [self.paths[i] for i in ids], None if self.targets is None else self.targets[ids]

    def class_counts(self, ids: list[int]) -> np.ndarray:
        """Examples (multi-class) or positives (multi-label) per class among `ids`."""
        if self.multilabel:
            return self.targets[ids].sum(0).astype(np.int64)
        return np.bincount(self.targets[ids], minlength=len(self.classes))


# ------------------------------------------------------------------- layouts
def _find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """{class name: images} for layout 1; {} if no sub-folder holds images."""
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {sub.name: _find_images(sub) for sub in subs}
    if not any(found.values()):
        return {}
    empty = [name for name, files in found.items() if not files]
    if empty:
        raise UserError(f"class folder {folder / empty[0]} holds no images "
                        f"(remove it or add images; {len(empty)} such folders)")
    return found


def _index_folder(root: Path) -> DataIndex:
    found = _class_folders(root)
    if found:
        paths = [f.relative_to(root).as_posix() for files in found.values() for f in files]
        targets = np.array([i for i, files in enumerate(found.values()) for _ in files], dtype=np.int64)
        return DataIndex(root, root, "class folders", paths, targets, list(found))
    files = _find_images(root)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {root}")
    return DataIndex(root, root, "unlabelled folder", [f.relative_to(root).as_posix() for f in files], None, [])


def _index_split_folders(root: Path) -> DataIndex:
    parts = {name: _class_folders(root / name) for name in SPLIT_RATIOS if (root / name).is_dir()}
    for name, found in parts.items():
        if not found:
            raise UserError(f"{root / name} has no class sub-folders with images")
    classes = sorted({c for found in parts.values() for c in found})
    paths, targets, given = [], [], {}
    for name, found in parts.items():
        start = len(paths)
        for cls, files in found.items():
            paths += [f.relative_to(root).as_posix() for f in files]
            targets += [classes.index(cls)] * len(files)
        given[name] = list(range(start, len(paths)))
    return DataIndex(root, root, "split folders", paths, np.array(targets, dtype=np.int64), classes,
                     given_split=given)


def _resolve_csv_path(root: Path, name: str) -> Path | None:
    path = root / name
    if path.is_file():
        return path
    if not path.suffix:  # ISIC's ground-truth CSV names images without extension
        return next((path.with_suffix(ext) for ext in (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".dcm")
                     if path.with_suffix(ext).is_file()), None)
    return None


def _index_csv(csv_path: Path, group_col: str | None) -> DataIndex:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"{csv_path} has no rows")
    columns = list(rows[0])
    lower = {c.lower(): c for c in columns}
    path_col = next((lower[c] for c in PATH_COLUMNS if c in lower), columns[0])
    if group_col is not None and group_col not in columns:
        raise UserError(f"--group-col {group_col}: {csv_path} has no such column (it has {', '.join(columns)})")
    root = csv_path.parent
    resolved = [_resolve_csv_path(root, row[path_col].strip()) for row in rows]
    missing = [row[path_col] for row, p in zip(rows, resolved) if p is None]
    if missing:
        raise UserError(f"{csv_path} names {len(missing)} files that do not exist "
                        f"(relative to {root}), e.g. {missing[0]!r}")
    seen, keep, skipped = set(), [], []
    for i, p in enumerate(resolved):
        if p in seen:
            skipped.append({"path": p.relative_to(root).as_posix(), "reason": "duplicate row in CSV"})
        else:
            seen.add(p)
            keep.append(i)
    paths = [resolved[i].relative_to(root).as_posix() for i in keep]
    more = {"skipped": skipped, "groups": [rows[i][group_col].strip() or p for i, p in zip(keep, paths)]
            if group_col else None}
    if "label" in lower:
        names = [rows[i][lower["label"]].strip() for i in keep]
        classes = sorted(set(names))
        targets = np.array([classes.index(n) for n in names], dtype=np.int64)
        return DataIndex(csv_path, root, "CSV with a label column", paths, targets, classes, **more)
    classes = [c for c in columns if c not in (path_col, group_col)]
    try:
        hot = np.array([[float(rows[i][c] or 0) for c in classes] for i in keep], dtype=np.float32)
    except ValueError:
        raise UserError(f"{csv_path}: without a 'label' column every column but {path_col!r} "
                        "must hold 0/1 values, one column per class") from None
    if not classes or not np.isin(hot, (0.0, 1.0)).all():
        raise UserError(f"{csv_path}: expected a 'label' column or 0/1 class columns")
    empty = [c for c, column in zip(classes, hot.T) if not column.any()]
    if empty:  # e.g. ISIC-2019's UNK: a class no image has would get a head and shift the class weights
        print(f"note: dropped the class column(s) {', '.join(empty)} of {csv_path.name}: no image has them")
        hot = hot[:, [c not in empty for c in classes]]
        classes = [c for c in classes if c not in empty]
        if not classes:
            raise UserError(f"{csv_path}: no class column has a positive")
    if (hot.sum(1) == 1).all():  # one-hot columns (ISIC-2019) are really multi-class
        return DataIndex(csv_path, root, "CSV with one-hot class columns", paths,
                         hot.argmax(1).astype(np.int64), classes, **more)
    return DataIndex(csv_path, root, "CSV with 0/1 class columns", paths, hot, classes,
                     multilabel=True, **more)


def index_data(data: str | Path, workers: int = 2, check_images: bool = True, memo_dir: str | Path | None = None,
               group_col: str | None = None, fingerprint: Fingerprint | None = None) -> DataIndex:
    """Find the layout of `data`, list its images, labels and groups (`group_col` of a CSV, or a
    folder's groups.csv), and drop (and record in `skipped`) every file Pillow or pydicom cannot fully
    decode (all .dcm files without pydicom). `fingerprint` (fingerprints.file_fingerprint, the duplicate
    check): decode every pixel (no draft mode) and keep what it makes of each image in `prints`. With
    `memo_dir` the verdicts are kept there (see `keyed_path`), so later runs on unchanged files do not decode
    them again."""
    path = Path(data).expanduser().resolve()
    if not path.exists():
        raise UserError(f"--data {data} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise UserError(f"--data {data} is a file but not a .csv label file")
        index = _index_csv(path, group_col)
    elif (path / "labels.csv").is_file():
        index = _index_csv(path / "labels.csv", group_col)
    else:
        _report_ignored(path)
        index = _index_split_folders(path) if (path / "train").is_dir() else _index_folder(path)
        index.groups = _groups_csv(path / "groups.csv", index.paths) if (path / "groups.csv").is_file() else None
    return _readable(index, workers, check_images, memo_dir, fingerprint)


def index_images(given: list[str | Path], workers: int = 2) -> DataIndex:
    """What a tool's --images names: one folder or labels CSV (index_data), or image files one by one (e.g.
    predict.py --images a.jpg b.dcm), unlabelled, relative to the deepest folder holding them all, the
    unreadable ones skipped with their reason as index_data skips them."""
    first = Path(given[0]).expanduser()
    if len(given) == 1 and (first.is_dir() or first.is_file() and first.suffix.lower() == ".csv"):
        return index_data(first, workers=workers)
    paths = [Path(f).expanduser().resolve() for f in given]
    for name, path in zip(given, paths):
        if not path.exists():
            raise UserError(f"{name} does not exist")
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTS:
            raise UserError(f"{name} is not an image file ({', '.join(sorted(IMAGE_EXTS))}); give one folder or "
                            "labels CSV, or image files")
    root = Path(os.path.commonpath([p.parent for p in paths]))
    index = DataIndex(root, root, "image files", [p.relative_to(root).as_posix() for p in paths], None, [])
    return _readable(index, workers, True, None, None)


def _readable(index: DataIndex, workers: int, check_images: bool, memo_dir: str | Path | None,
              fingerprint: Fingerprint | None) -> DataIndex:
    """`index` without the images that cannot be decoded (see index_data), described in a line."""
    if any(p.lower().endswith(".dcm") for p in index.paths):
        from plumbing.dicom import without_pydicom  # only DICOM files need it
        index = _drop_unreadable(index, without_pydicom(index.paths))
    if check_images or fingerprint:
        verdicts = _check(index, workers, memo_dir, fingerprint)
        index.prints = verdicts if fingerprint else None  # the unreadable ones' reasons go next
        index = _drop_unreadable(index, [v if isinstance(v, str) else None for v in verdicts])
    print(f"data: {index.describe()}", flush=True)
    for item in index.skipped[:10]:
        print(f"  skipped {item['path']}: {item['reason']}")
    return index


def _groups_csv(path: Path, paths: list[str]) -> list[str] | None:
    """The group of each of `paths` from a groups.csv (columns path, group); unlisted images are their own."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.DictReader(f)
        if not {"path", "group"} <= set(rows.fieldnames or ()):
            raise UserError(f"{path} needs the columns path and group (it has {', '.join(rows.fieldnames or ())})")
        given = {Path(r["path"].strip()).as_posix(): (r["group"] or "").strip() for r in rows}
    named = [given[p] for p in paths if given.get(p)]
    print(f"{path.name}: {len(set(named))} groups applied to {len(named)} images")
    if alone := sum(p not in given for p in paths):
        print(f"note: {alone} images are not in {path.name}; each is its own group")
    return [given.get(p) or p for p in paths]


def _report_ignored(root: Path) -> None:
    """Print how many files under `root` (dot-files and the groups.csv _groups_csv reads aside) a folder layout
    passes over, by extension: a wrong extension (DICOMs without .dcm, say) never leaves a folder silently empty."""
    counts = Counter(p.suffix.lower() or "(no extension)" for p in sorted(root.rglob("*"))
                     if p.suffix.lower() not in IMAGE_EXTS and p.is_file() and p != root / "groups.csv"
                     and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if counts:  # most common first; ties in path order, so the line is the same on every machine
        print(f"ignored {counts.total()} files: " + ", ".join(f"{ext} {n}" for ext, n in counts.most_common()))


# ------------------------------------------------------------- readability
def unreadable_reason(path: Path) -> str | None:
    """None if the whole file decodes (DICOM: through pydicom), else why not. JPEG decodes
    in draft (1/8 scale) mode, which still reads every byte, so truncation is caught."""
    return _look(path, fingerprint=None)


def _look(path: Path, fingerprint: Fingerprint | None) -> str | list | None:
    """Why `path` cannot be read; else None, or with `fingerprint` what it makes of the file: of the (H, W, 3)
    uint8 pixels training decodes (fingerprints.file_fingerprint), so that what the model sees is what is
    compared, whatever the mode. The intensity is auto whatever a run's --intensity, so that copies stored in
    other units (an 8-bit export of a 16-bit scan) still show one picture."""
    try:
        if path.suffix.lower() == ".dcm":
            from plumbing.dicom import stored_values  # only DICOM files need it
            stored_values(path)  # every frame: training reads the first, but a broken later one is a broken file
        else:
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    return f"too large: {img.width}x{img.height} pixels (limit data.MAX_PIXELS = {MAX_PIXELS})"
                if not fingerprint:  # the fingerprint below decodes every pixel itself
                    img.draft("RGB", (64, 64))
                    img.load()
    except Exception as err:  # Pillow and pydicom raise many types for bad files
        return f"{type(err).__name__}: {err}"
    try:
        return fingerprint(path) if fingerprint else None  # decoded in full as training decodes it
    except Unreadable as err:  # any other error of the fingerprint is a bug: it is raised, not recorded
        return str(err)


def keyed_path(folder: str | Path, root: Path, paths: list[str], tag: str) -> Path:
    """folder/<root name>-<root hash>-<tag>-<content hash>: the name changes when any file under
    `root` is changed (byte size, modification time), added or removed. Files made from the data
    (image checks, pixel caches) live at such paths, so stale ones are never read; `drop_stale` removes them."""
    h = hashlib.sha256(str(root).encode())
    for rel in paths:
        st = (root / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    root_hash = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return Path(folder) / f"{root.name or 'data'}-{root_hash}-{tag}-{h.hexdigest()[:16]}"


def drop_stale(path: Path) -> None:
    """Remove the siblings of a keyed path made for older states of the same data and tag."""
    for stale in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*"):
        if stale != path and not stale.name.startswith("."):
            stale.unlink(missing_ok=True) if stale.is_file() else shutil.rmtree(stale, ignore_errors=True)


CHECK_VERSION = 2


def _check(index: DataIndex, workers: int, memo_dir: str | Path | None, fingerprint: Fingerprint | None) -> list:
    """What `_look` says of each image (a reason, None or a fingerprint), remembered in `memo_dir`."""
    # the version changes whenever the check decides differently (DICOM rendering, fingerprints of the
    # pixels training decodes), so that verdicts of an older check are not reused
    tag = f"{'fingerprinted' if fingerprint else 'checked'}{CHECK_VERSION}"
    memo = keyed_path(memo_dir, index.root, index.paths, tag) if memo_dir else None
    if memo is not None and memo.is_file():
        known = json.loads(memo.read_text())
        return [known.get(p) for p in index.paths]
    look = partial(_look, fingerprint=fingerprint) if fingerprint else unreadable_reason
    with ThreadPoolExecutor(max(1, workers)) as pool:
        verdicts = list(tqdm(pool.map(look, (index.root / p for p in index.paths)),
                             total=len(index.paths), desc=f"checking images{' (fingerprints)' * bool(fingerprint)}",
                             leave=False))
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")  # renamed whole: never half-written
        tmp.write_text(json.dumps({p: v for p, v in zip(index.paths, verdicts) if v}))
        os.replace(tmp, memo)
        drop_stale(memo)
    return verdicts


def _drop_unreadable(index: DataIndex, reasons: list[str | None]) -> DataIndex:
    keep = [i for i, r in enumerate(reasons) if not r]
    if len(keep) == len(reasons):
        return index
    if not keep:
        raise UserError(f"none of the {len(reasons)} images under {index.root} could be read ({reasons[0]})")
    new_pos = {old: new for new, old in enumerate(keep)}
    given = index.given_split and {name: [new_pos[i] for i in idx if i in new_pos]
                                   for name, idx in index.given_split.items()}
    skipped = index.skipped + [{"path": index.paths[i], "reason": r} for i, r in enumerate(reasons) if r]
    return replace(index, paths=[index.paths[i] for i in keep], given_split=given, skipped=skipped,
                   targets=None if index.targets is None else index.targets[keep],
                   groups=index.groups and [index.groups[i] for i in keep],
                   prints=index.prints and [index.prints[i] for i in keep])
