"""What is on disk: the images and labels of a data set, which of them can be read,
seeded stratified splits and label fractions. How pixels then reach a model is pixels.py.

Three layouts are read (see README, "Data layouts"):
  1. DIR/<class>/**/*.jpg             class folders (or a flat folder: unlabelled)
  2. DIR/{train,val,test}/<class>/... the curator's split is kept
  3. labels.csv (or DIR/labels.csv)   a path column + `label`, or one 0/1 column per class
Groups (patient, lesion: a CSV's `group_col`, or groups.csv in a folder) are split whole.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from errors import UserError

try:  # optional: only .dcm files need it (pixels.py reads them the same way)
    import pydicom
except ImportError:
    pydicom = None

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm"}
SPLIT_RATIOS = {"train": 0.7, "val": 0.1, "test": 0.2}  # Sec. 4.1 / App. C
PATH_COLUMNS = ("path", "file", "filename", "image", "image_id", "img")
# Larger files are skipped with a reason. This is where Pillow's own guard against decompression
# bombs turns from a warning into an error; Pillow's global limit is left as it is.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
NO_PYDICOM = "reading DICOM needs pydicom 3 or later: pip install -U 'pydicom>=3'"


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

    @property
    def labelled(self) -> bool:
        return self.targets is not None

    def describe(self) -> str:
        kind = ("multi-label" if self.multilabel else "multi-class") if self.labelled else "unlabelled"
        given = f", curator split {sorted(self.given_split)}" if self.given_split else ""
        return (f"{self.layout} at {self.source}: {len(self.paths)} images, "
                f"{len(self.classes)} classes, {kind}{given}, {len(self.skipped)} skipped")

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


def index_data(data: str | Path, workers: int = 2, check_images: bool = True,
               memo_dir: str | Path | None = None, group_col: str | None = None) -> DataIndex:
    """Find the layout of `data`, list its images, labels and groups (`group_col` of a CSV, or a
    folder's groups.csv), and drop (and record in `skipped`) every file Pillow or pydicom cannot fully
    decode (all .dcm files without pydicom). With `memo_dir` the check's verdicts are kept there
    (see `keyed_path`), so later runs on unchanged files do not decode them again."""
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
    index = _drop_unreadable(index, without_pydicom(index.paths))
    if check_images:
        index = _drop_unreadable(index, _check(index, workers, memo_dir))
    print(f"data: {index.describe()}", flush=True)
    for item in index.skipped[:10]:
        print(f"  skipped {item['path']}: {item['reason']}")
    return index


def _groups_csv(path: Path, paths: list[str]) -> list[str] | None:
    """The group of each of `paths` from a groups.csv (columns path, group); unlisted images are their own."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        given = {Path(r["path"].strip()).as_posix(): r["group"].strip() for r in csv.DictReader(f)}
    if alone := sum(p not in given for p in paths):
        print(f"note: {alone} images are not in {path.name}; each is its own group")
    return [given.get(p) or p for p in paths]


def without_pydicom(paths: list[str]) -> list[str | None]:
    """Why each of `paths` cannot be read for want of pydicom (None: it can), announced in one line."""
    reasons = [NO_PYDICOM if pydicom is None and p.lower().endswith(".dcm") else None for p in paths]
    if any(reasons):
        print(f"note: {sum(map(bool, reasons))} .dcm files found but skipped: {NO_PYDICOM}", flush=True)
    return reasons


def _report_ignored(root: Path) -> None:
    """Print how many files under `root` (dot-files aside) a folder layout passes over, by extension:
    a wrong extension (DICOMs without .dcm, say) never leaves a folder silently empty."""
    counts = Counter(p.suffix.lower() or "(no extension)" for p in sorted(root.rglob("*"))
                     if p.suffix.lower() not in IMAGE_EXTS and p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if counts:  # most common first; ties in path order, so the line is the same on every machine
        print(f"ignored {counts.total()} files: " + ", ".join(f"{ext} {n}" for ext, n in counts.most_common()))


# ------------------------------------------------------------- readability
def unreadable_reason(path: Path) -> str | None:
    """None if the whole file decodes (DICOM: through pydicom), else why not. JPEG decodes
    in draft (1/8 scale) mode, which still reads every byte, so truncation is caught."""
    try:
        if path.suffix.lower() == ".dcm":
            pydicom.dcmread(path).pixel_array  # decodes every frame: a truncated file raises
            return None
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                return f"too large: {img.width}x{img.height} pixels (limit data.MAX_PIXELS = {MAX_PIXELS})"
            img.draft("RGB", (64, 64))
            img.load()
    except Exception as err:  # Pillow and pydicom raise many types for bad files
        return f"{type(err).__name__}: {err}"
    return None


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


def _check(index: DataIndex, workers: int, memo_dir: str | Path | None) -> list[str | None]:
    """Why each image cannot be read (None: it can), remembered in `memo_dir`."""
    memo = keyed_path(memo_dir, index.root, index.paths, "checked") if memo_dir else None
    if memo is not None and memo.is_file():
        bad = json.loads(memo.read_text())
        return [bad.get(p) for p in index.paths]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(tqdm(pool.map(unreadable_reason, (index.root / p for p in index.paths)),
                            total=len(index.paths), desc="checking images", leave=False))
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")  # renamed whole: never half-written
        tmp.write_text(json.dumps({p: r for p, r in zip(index.paths, reasons) if r}))
        os.replace(tmp, memo)
        drop_stale(memo)
    return reasons


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
    return DataIndex(index.source, index.root, index.layout, [index.paths[i] for i in keep],
                     None if index.targets is None else index.targets[keep], index.classes,
                     index.multilabel, given, skipped, index.groups and [index.groups[i] for i in keep])


# ---------------------------------------------------------- splits, fractions
def _strata(index: DataIndex) -> np.ndarray:
    """Stratification key per image: the class, or for multi-label data the
    rarest label it holds (len(classes) when it holds none)."""
    if not index.labelled:
        return np.zeros(len(index.paths), dtype=np.int64)
    if not index.multilabel:
        return index.targets
    counts = index.targets.sum(0)
    rarity = np.where(index.targets > 0, counts[None, :], np.inf)
    return np.where(index.targets.any(1), rarity.argmin(1), len(index.classes))


def _units(index: DataIndex, ids: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """`ids` as units split whole (groups; else each image) with their images' most common stratum."""
    keys, names, members = _strata(index), index.groups or index.paths, {}  # paths: each image alone
    for i in ids:
        members.setdefault(names[i], []).append(int(i))
    units = list(members.values())
    return units, np.array([np.bincount(keys[u]).argmax() for u in units], dtype=np.int64)


def make_splits(index: DataIndex, seed: int) -> dict:
    """Seeded, stratified 70/10/20 train/val/test as relative paths. A curator's split is kept and
    only its missing parts are carved out of train, per stratum (round(f * n) units each, at least
    one left in train; see `_units`); unlabelled data is all train. Groups add {"groups": {path: group}}."""
    if not index.labelled:
        return {"train": index.paths[:], "val": [], "test": []}
    given = index.given_split or {}
    pool = np.array(given.get("train", range(len(index.paths))), dtype=np.int64)
    missing = [name for name in ("val", "test") if name not in given]
    share = SPLIT_RATIOS["train"] + sum(SPLIT_RATIOS[m] for m in missing)
    rng, (units, keys) = np.random.default_rng(seed), _units(index, pool)
    parts = {"train": [], **{name: idx for name, idx in given.items() if name != "train"}}
    parts.update({m: [] for m in missing})
    for key in np.unique(keys):
        group, start = rng.permutation(np.flatnonzero(keys == key)), 0
        for name in missing:
            n = max(0, min(int(round(SPLIT_RATIOS[name] / share * len(group))), len(group) - start - 1))
            parts[name] += [i for u in group[start:start + n] for i in units[u]]
            start += n
        parts["train"] += [i for u in group[start:] for i in units[u]]
    out = {name: [index.paths[i] for i in sorted(parts[name])] for name in SPLIT_RATIOS}
    return out | ({"groups": dict(zip(index.paths, index.groups))} if index.groups else {})


def select(index: DataIndex, splits: dict, apart: bool = False) -> dict[str, list[int]]:
    """Relative paths of a split back to positions in `index`; with `apart`, a
    group of `index` that has images in test and in train or val is an error."""
    position = {p: i for i, p in enumerate(index.paths)}
    skipped = {s["path"] for s in index.skipped}
    out = {}
    for name in SPLIT_RATIOS:
        unknown = [p for p in splits.get(name, []) if p not in position and p not in skipped]
        if unknown:
            raise UserError(f"the {name} split names {len(unknown)} images that are not in the data "
                            f"({unknown[0]!r}); is --data the data set this run was split on?")
        out[name] = [position[p] for p in splits.get(name, []) if p in position]
    for name in ("train", "val") if apart and index.groups else ():
        if shared := sorted({index.groups[i] for i in out["test"]} & {index.groups[i] for i in out[name]}):
            raise UserError(f"group {shared[0]!r} has images in both the {name} and the test split "
                            f"({len(shared)} such groups); split the data again with its groups")
    return out


def label_fraction(index: DataIndex, train: list[int], frac: float, seed: int) -> list[int]:
    """A seeded stratified subset of about `frac` of `train`'s units (`_units`), at least
    one per class (multi-label: one with a positive for each label present in train)."""
    if frac >= 1.0:
        return sorted(train)
    rng = np.random.default_rng(seed)
    train = np.asarray(train, dtype=np.int64)
    units, keys = _units(index, train)
    chosen = set()
    for key in np.unique(keys):
        group = np.flatnonzero(keys == key)
        chosen.update(i for u in rng.choice(group, max(1, int(round(frac * len(group)))), replace=False)
                      for i in units[u])
    if index.multilabel:
        unit_of = {i: u for u, members in enumerate(units) for i in members}
        for c in range(len(index.classes)):
            positives = train[index.targets[train, c] > 0]
            if len(positives) and not index.targets[sorted(chosen), c].any():
                chosen.update(units[unit_of[int(rng.choice(positives))]])
    return sorted(chosen)
