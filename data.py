"""Data: finding images and labels on disk, reading any image as RGB, seeded
stratified splits and label fractions, the paper's augmentations (App. C.5.2)
and a loader whose order and augmentations depend only on (seed, epoch, index).

Three layouts are read (see README, "Data layouts"):
  1. DIR/<class>/**/*.jpg             class folders (or a flat folder: unlabelled)
  2. DIR/{train,val,test}/<class>/... the curator's split is kept
  3. labels.csv (or DIR/labels.csv)   a path column + `label`, or one 0/1 column per class
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2
from tqdm import tqdm

from runtime import UserError, rank, world_size

# Deliberate limit on image size: PIL's default (about 89 M pixels, an error at
# twice that) guards against decompression bombs; whole-slide scans can be
# larger, so the limit is raised to 400 M pixels and larger files are skipped
# with a reason instead of crashing a run.
MAX_PIXELS = 400_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
SPLIT_RATIOS = {"train": 0.7, "val": 0.1, "test": 0.2}  # Sec. 4.1 / App. C
PATH_COLUMNS = ("path", "file", "filename", "image", "image_id", "img")
AUGMENTATIONS = ("paper", "blur", "solarize", "blur+solarize")  # Table 9


@dataclass
class DataIndex:
    """Every usable image of a data set. `paths` are relative to `root` (posix);
    `targets` is (N,) int64 class ids, (N, C) float32 multi-hot, or None."""
    source: Path
    root: Path
    layout: str
    paths: list[str]
    targets: np.ndarray | None
    classes: list[str]
    multilabel: bool = False
    given_split: dict[str, list[int]] | None = None
    skipped: list[dict] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.targets is not None

    def describe(self) -> str:
        kind = ("multi-label" if self.multilabel else "multi-class") if self.labelled else "unlabelled"
        given = f", curator split {sorted(self.given_split)}" if self.given_split else ""
        return (f"{self.layout} at {self.source}: {len(self.paths)} images, "
                f"{len(self.classes)} classes, {kind}{given}, {len(self.skipped)} skipped")

    def class_counts(self, indices: list[int]) -> np.ndarray:
        """Examples (multi-class) or positives (multi-label) per class among `indices`."""
        if self.multilabel:
            return self.targets[indices].sum(0).astype(np.int64)
        return np.bincount(self.targets[indices], minlength=len(self.classes))


# --------------------------------------------------------------------- images
def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB. 16-bit and float grayscale are min-max rescaled to
    0..255 (a plain convert would clip them); palette/alpha go through RGBA."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.rint(arr).astype(np.uint8))
    elif img.mode == "P" or img.mode == "LA":
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return to_rgb(ImageOps.exif_transpose(img))


def load_resized(path: Path, size: int | None) -> np.ndarray:
    """The deterministic first step of every pipeline: (size, size, 3) uint8
    pixels, bilinear resize as in App. C.5.2; size None keeps the original
    (DINO crops it). This is what the decode-once cache stores."""
    img = load_image(path)
    if size is not None:
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img)


def to_chw(pixels: np.ndarray | Image.Image) -> torch.Tensor:
    """(H, W, 3) pixels or an RGB image -> a (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)


def unreadable_reason(path: Path) -> str | None:
    """None if PIL decodes the whole file, else why not. JPEG decodes in draft
    (1/8 scale) mode, which still reads every byte, so truncation is caught."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                return f"too large: {img.width}x{img.height} pixels (limit data.MAX_PIXELS = {MAX_PIXELS})"
            img.draft("RGB", (64, 64))
            img.load()
    except Exception as err:  # PIL raises many types for bad files
        return f"{type(err).__name__}: {err}"
    return None


# ------------------------------------------------------------------- indexing
def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def _find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if _is_image(p) and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """{class name: images} for layout 1; {} if no sub-folder holds images."""
    found = {sub.name: _find_images(sub) for sub in _subfolders(folder)}
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
        classes = list(found)
        paths = [f.relative_to(root).as_posix() for files in found.values() for f in files]
        targets = np.array([i for i, files in enumerate(found.values()) for _ in files], dtype=np.int64)
        return DataIndex(root, root, "class folders", paths, targets, classes)
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
        for ext in (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"):
            if path.with_suffix(ext).is_file():
                return path.with_suffix(ext)
    return None


def _index_csv(csv_path: Path) -> DataIndex:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"{csv_path} has no rows")
    columns = list(rows[0])
    lower = {c.lower(): c for c in columns}
    path_col = next((lower[c] for c in PATH_COLUMNS if c in lower), columns[0])
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
    if "label" in lower:
        names = [rows[i][lower["label"]].strip() for i in keep]
        classes = sorted(set(names))
        targets = np.array([classes.index(n) for n in names], dtype=np.int64)
        return DataIndex(csv_path, root, "CSV with a label column", paths, targets, classes, skipped=skipped)
    classes = [c for c in columns if c != path_col]
    try:
        hot = np.array([[float(rows[i][c] or 0) for c in classes] for i in keep], dtype=np.float32)
    except ValueError:
        raise UserError(f"{csv_path}: without a 'label' column every column but {path_col!r} "
                        "must hold 0/1 values, one column per class") from None
    if not classes or not np.isin(hot, (0.0, 1.0)).all():
        raise UserError(f"{csv_path}: expected a 'label' column or 0/1 class columns")
    if (hot.sum(1) == 1).all():  # one-hot columns (ISIC-2019) are really multi-class
        return DataIndex(csv_path, root, "CSV with one-hot class columns", paths,
                         hot.argmax(1).astype(np.int64), classes, skipped=skipped)
    return DataIndex(csv_path, root, "CSV with 0/1 class columns", paths, hot, classes,
                     multilabel=True, skipped=skipped)


def index_data(data: str | Path, workers: int = 2, check_images: bool = True,
               memo_dir: str | Path | None = None) -> DataIndex:
    """Find the layout of `data`, list its images and labels, and drop (and
    record in `skipped`) every file PIL cannot fully decode. With `memo_dir`
    (the cache folder) the check's verdicts are kept there, keyed by
    file_signature, so later runs on unchanged files do not decode them again."""
    path = Path(data).expanduser().resolve()
    if not path.exists():
        raise UserError(f"--data {data} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise UserError(f"--data {data} is a file but not a .csv label file")
        index = _index_csv(path)
    elif (path / "labels.csv").is_file():
        index = _index_csv(path / "labels.csv")
    elif (path / "train").is_dir():
        index = _index_split_folders(path)
    else:
        index = _index_folder(path)
    if check_images:
        index = _drop_unreadable(index, workers, memo_dir)
    print(f"data: {index.describe()}", flush=True)
    for item in index.skipped[:10]:
        print(f"  skipped {item['path']}: {item['reason']}")
    return index


def file_signature(root: Path, paths: list[str]) -> str:
    """A hash of the root and every file's path, byte size and modification
    time: it changes when any file is changed, added or removed."""
    h = hashlib.sha256(str(root).encode())
    for rel in paths:
        st = (root / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _check(index: DataIndex, workers: int, memo_dir: str | Path | None) -> list[str | None]:
    """Why each image cannot be read (None: it can), remembered in `memo_dir`."""
    prefix = f"checked-{hashlib.sha256(str(index.root).encode()).hexdigest()[:8]}"
    memo = Path(memo_dir) / f"{prefix}-{file_signature(index.root, index.paths)}.json" if memo_dir else None
    if memo is not None and memo.is_file():
        bad = json.loads(memo.read_text())
        return [bad.get(p) for p in index.paths]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(tqdm(pool.map(unreadable_reason, (index.root / p for p in index.paths)),
                            total=len(index.paths), desc="checking images", leave=False))
    if memo is not None and rank() == 0:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(memo.name + ".tmp")
        tmp.write_text(json.dumps({p: r for p, r in zip(index.paths, reasons) if r}))
        for stale in memo.parent.glob(f"{prefix}-*.json"):  # verdicts on an older state of the files
            stale.unlink()
        os.replace(tmp, memo)
    return reasons


def _drop_unreadable(index: DataIndex, workers: int, memo_dir: str | Path | None) -> DataIndex:
    reasons = _check(index, workers, memo_dir)
    bad = [i for i, r in enumerate(reasons) if r]
    if not bad:
        return index
    keep = [i for i, r in enumerate(reasons) if not r]
    if not keep:
        raise UserError(f"none of the {len(reasons)} images under {index.root} could be read")
    new_pos = {old: new for new, old in enumerate(keep)}
    given = None
    if index.given_split:
        given = {name: [new_pos[i] for i in idx if i in new_pos] for name, idx in index.given_split.items()}
    skipped = index.skipped + [{"path": index.paths[i], "reason": reasons[i]} for i in bad]
    return DataIndex(index.source, index.root, index.layout, [index.paths[i] for i in keep],
                     None if index.targets is None else index.targets[keep], index.classes,
                     index.multilabel, given, skipped)


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


def _carve(pool: np.ndarray, keys: np.ndarray, fractions: dict[str, float],
           rng: np.random.Generator) -> dict[str, list[int]]:
    """Split `pool` per stratum; each named part takes round(f * n), at least one image stays in train."""
    parts = {"train": [], **{name: [] for name in fractions}}
    for key in np.unique(keys[pool]):
        group = rng.permutation(pool[keys[pool] == key])
        start = 0
        for name, frac in fractions.items():
            n = max(0, min(int(round(frac * len(group))), len(group) - start - 1))
            parts[name] += group[start:start + n].tolist()
            start += n
        parts["train"] += group[start:].tolist()
    return parts


def make_splits(index: DataIndex, seed: int) -> dict[str, list[str]]:
    """Seeded, stratified 70/10/20 train/val/test as relative paths. A curator's
    split is kept and only its missing parts are carved out of train; unlabelled
    data is all train (there is nothing to evaluate)."""
    everything = np.arange(len(index.paths))
    if not index.labelled:
        return {"train": index.paths[:], "val": [], "test": []}
    given = index.given_split or {}
    pool = np.array(given.get("train", everything), dtype=np.int64)
    missing = [name for name in ("val", "test") if name not in given]
    share = SPLIT_RATIOS["train"] + sum(SPLIT_RATIOS[m] for m in missing)
    parts = _carve(pool, _strata(index), {m: SPLIT_RATIOS[m] / share for m in missing},
                   np.random.default_rng(seed))
    parts.update({name: idx for name, idx in given.items() if name != "train"})
    return {name: [index.paths[i] for i in sorted(parts[name])] for name in SPLIT_RATIOS}


def select(index: DataIndex, splits: dict[str, list[str]]) -> dict[str, list[int]]:
    """Relative paths of a split back to positions in `index`."""
    position = {p: i for i, p in enumerate(index.paths)}
    skipped = {s["path"] for s in index.skipped}
    out = {}
    for name in SPLIT_RATIOS:
        unknown = [p for p in splits.get(name, []) if p not in position and p not in skipped]
        if unknown:
            raise UserError(f"the {name} split names {len(unknown)} images that are not in the data "
                            f"({unknown[0]!r}); is --data the data set this run was split on?")
        out[name] = [position[p] for p in splits.get(name, []) if p in position]
    return out


def label_fraction(index: DataIndex, train: list[int], frac: float, seed: int) -> list[int]:
    """A seeded subset of about `frac` of `train`, stratified, at least one
    example per class (multi-label: one positive per label present in train)."""
    if frac >= 1.0:
        return sorted(train)
    rng = np.random.default_rng(seed)
    train = np.asarray(train, dtype=np.int64)
    keys = _strata(index)[train]
    chosen = set()
    for key in np.unique(keys):
        group = train[keys == key]
        n = max(1, int(round(frac * len(group))))
        chosen.update(rng.choice(group, n, replace=False).tolist())
    if index.multilabel:
        for c in range(len(index.classes)):
            positives = train[index.targets[train, c] > 0]
            if len(positives) and not index.targets[sorted(chosen), c].any():
                chosen.add(int(rng.choice(positives)))
    return sorted(chosen)


# -------------------------------------------------------- augmentations, loader
def train_augment(size: int, variant: str = "paper") -> v2.Compose:
    """App. C.5.2 on a resized RGB image; `variant` adds Table 9's solarize
    and/or Gaussian blur (BYOL-like settings; the paper gives none). Applied to
    PIL images, as the published code did: Pillow's kernels are also about
    2.5x faster on the CPU than torchvision's tensor kernels at 384 px."""
    ops = [
        v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2), v2.RandomPerspective(0.2, p=1.0)], p=0.3),
        v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2), v2.RandomAffine(degrees=10)], p=0.3),
        v2.RandomVerticalFlip(0.3),
        v2.RandomHorizontalFlip(0.3),
    ]
    if "blur" in variant:
        ops.append(v2.RandomApply([v2.GaussianBlur(2 * int(0.05 * size) + 1, sigma=(0.1, 2.0))], p=0.5))
    if "solarize" in variant:
        ops.append(v2.RandomSolarize(threshold=128, p=0.2))
    return v2.Compose(ops)


class ImageDataset(Dataset):
    """Items are (uint8 image (3, size, size), target), the image passed through
    `augment` (PIL image in, PIL image or list of them out: DINO's multi-crop)
    if one is given. Normalisation happens on the device, per model
    (models.normalise). Unlabelled targets are -1. With a `cache`
    (cache.ImageCache of the whole index) the decoded, resized pixels come from
    its memory map instead of the image files."""

    def __init__(self, index: DataIndex, indices: list[int], size: int | None, augment=None, cache=None):
        self.root, self.size, self.augment, self.cache = index.root, size, augment, cache
        self.ids = list(indices)
        self.paths = [index.paths[i] for i in indices]
        if index.targets is None:
            self.targets = torch.full((len(indices),), -1, dtype=torch.int64)
        else:
            self.targets = torch.from_numpy(index.targets[indices])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        i, sample_seed = key
        if self.cache is not None:
            pixels = self.cache[self.ids[i]]
        else:
            pixels = load_resized(self.root / self.paths[i], self.size)
        if self.augment is None:
            return to_chw(pixels), self.targets[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            views = self.augment(Image.fromarray(pixels))
        x = [to_chw(v) for v in views] if isinstance(views, list) else to_chw(views)
        return x, self.targets[i]


class SeededSampler(Sampler):
    """Yields (index, sample seed): the order and every image's augmentation are
    a function of (seed, epoch, index) only, whatever the worker count, so a
    resumed run sees exactly the samples an uninterrupted one would. Under
    torchrun, process r of W takes positions r, r + W, ... of the same global
    order (the tail that does not divide by W is dropped), so W processes at
    batch B see, step by step, the images one process sees at batch W * B."""

    def __init__(self, n: int, seed: int, shuffle: bool, shard: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.rank, self.world = (rank(), world_size()) if shard else (0, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(2**62, (self.n,), generator=g)
        mine = order[: len(self) * self.world][self.rank::self.world]
        return iter([(int(i), int(seeds[i])) for i in mine])


def make_loader(dataset: ImageDataset, bs: int, *, shuffle: bool, seed: int, workers: int,
                drop_last: bool = False, pin_memory: bool = False, shard: bool = True) -> DataLoader:
    """Call `loader.sampler.set_epoch(epoch)` before each epoch. `shard=False`:
    every process sees every image (evaluation under torchrun)."""
    return DataLoader(dataset, batch_size=bs, sampler=SeededSampler(len(dataset), seed, shuffle, shard),
                      num_workers=workers, drop_last=drop_last and len(dataset) >= bs,
                      pin_memory=pin_memory, persistent_workers=workers > 0)
