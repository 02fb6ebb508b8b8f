"""How pixels reach a model: decoding any image to RGB (16-bit, float and
DICOM pixels under an intensity setting: intensity.py, dicom.py), the paper's
augmentations (App. C.5.2), a decode-once cache, the dataset, and loaders whose
order and augmentations depend only on (seed, epoch, image).

Every pipeline starts with a deterministic resize, so the resized uint8 pixels
can be computed once and memory-mapped by every later epoch, run and loader
worker without changing a single sample (`open_cache`). Batches leave the
loader as uint8; normalisation happens on the device (models.normalise).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2
from tqdm import tqdm

AUGMENTATIONS = ("paper", "blur", "solarize", "blur+solarize")  # Table 9


# ---------------------------------------------------------- intensity settings
# How pixels that are not 8-bit reach 0..255 (`--intensity`; the conversion
# itself is intensity.py, DICOM files dicom.py, imported when such an image is
# met). 8-bit RGB and grayscale images never pass through a setting. A setting
# is a plain tuple, so that it pickles into loader workers, loads from a
# weights_only checkpoint and survives JSON (as a list, which `parse_intensity`
# takes back):
#   ("auto",)           DICOM: the file's own VOI window, else min-max; other files: min-max
#   ("minmax",)         per image: its minimum -> 0, its maximum -> 255
#   ("percentile",)     per image: the 0.5th..99.5th percentiles, clipped outside
#   ("window", lo, hi)  fixed, in the image's own units (DICOM: after the rescale, e.g. HU)
Intensity = tuple
AUTO: Intensity = ("auto",)
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # Pillow modes a plain convert would clip


def parse_intensity(value: str | Sequence) -> Intensity:
    """`--intensity` words, or a setting read back from JSON (a list) -> the setting tuple."""
    words = value.split() if isinstance(value, str) else [str(v) for v in value]
    if len(words) == 1 and words[0] in ("auto", "minmax", "percentile"):
        return (words[0],)
    if len(words) == 3 and words[0] == "window":
        try:
            lo, hi = float(words[1]), float(words[2])
        except ValueError:
            lo = hi = float("nan")
        if np.isfinite([lo, hi]).all() and lo < hi:
            return ("window", lo, hi)
    raise ValueError("intensity must be auto, minmax, percentile or window LO HI (two numbers, LO < HI), "
                     f"got {' '.join(words)!r}")


class IntensityFlag(argparse.Action):
    """`--intensity` (nargs="+"): its words become the setting tuple, or a usage error."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_intensity(values))
        except ValueError as err:
            raise argparse.ArgumentError(self, str(err)) from None


def intensity_tag(setting: Intensity) -> str:
    """What a cache folder's tag ends with: "" for auto, whose pixels caches made
    before this setting existed hold, else e.g. "_window_m1000.0_400.0". No '-':
    data.drop_stale reads names up to their last '-' as the (data, tag) prefix."""
    setting = parse_intensity(setting)
    return "" if setting == AUTO else "".join(f"_{word}".replace("-", "m") for word in setting)


# ---------------------------------------------------------------- decoding
def to_rgb(img: Image.Image, intensity: Intensity = AUTO) -> Image.Image:
    """Any PIL mode to RGB. 16-bit and float grayscale reach 0..255 by
    `intensity` (a plain convert would clip them); palette/alpha go through RGBA."""
    if img.mode in HIGH_BIT_MODES:
        from plumbing.intensity import to_uint8  # only 16-bit and float images need it
        img = Image.fromarray(to_uint8(np.asarray(img), intensity))
    elif img.mode == "P" or img.mode == "LA":
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: Path, intensity: Intensity = AUTO) -> Image.Image:
    """Any image file, DICOM (.dcm) included, as RGB; `intensity`: see the settings above."""
    if Path(path).suffix.lower() == ".dcm":
        from plumbing.dicom import read_dicom  # only DICOM files need it (and pydicom)
        return read_dicom(path, intensity)
    with Image.open(path) as img:
        return to_rgb(ImageOps.exif_transpose(img), intensity)


def load_resized(path: Path, size: int | None, intensity: Intensity = AUTO) -> np.ndarray:
    """The deterministic first step of every pipeline: (size, size, 3) uint8
    pixels, bilinear resize as in App. C.5.2; size None keeps the original
    (DINO crops it). This is what the cache stores in `square` mode."""
    img = load_image(path, intensity)
    if size is not None:
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img)


def load_fitted(path: Path, max_side: int, intensity: Intensity = AUTO) -> np.ndarray:
    """The image with its aspect ratio kept and its longer side shrunk to at
    most `max_side`: the cache's `fit` mode, for DINO, which crops the image itself."""
    img = load_image(path, intensity)
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return np.asarray(img)


def to_chw(pixels: np.ndarray | Image.Image) -> torch.Tensor:
    """(H, W, 3) pixels or an RGB image -> a (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)


def gaussian_blur(image: Image.Image) -> Image.Image:
    """Pillow's Gaussian blur, as DINO's own code blurs, with sigma (Pillow's radius) drawn from U(0.1, 2) by
    torch's generator, so that each image's seeded draw decides it. Pillow's box approximation costs a few ms at
    384 px; torchvision's exact kernel of a tenth of the image (39 x 39) took about 100 times as long."""
    return image.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(()).uniform_(0.1, 2.0))))


def train_augment(variant: str = "paper") -> v2.Compose:
    """App. C.5.2 on a resized RGB image; `variant` adds Table 9's solarize
    and/or Gaussian blur (`gaussian_blur`, p 0.5; BYOL-like settings, the paper gives none). Applied to
    PIL images, as the published code did: Pillow's kernels are also about
    2.5x faster on the CPU than torchvision's tensor kernels at 384 px."""
    ops = [
        v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2), v2.RandomPerspective(0.2, p=1.0)], p=0.3),
        v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2), v2.RandomAffine(degrees=10)], p=0.3),
        v2.RandomVerticalFlip(0.3),
        v2.RandomHorizontalFlip(0.3),
    ]
    if "blur" in variant:
        ops.append(v2.RandomApply([v2.Lambda(gaussian_blur)], p=0.5))
    if "solarize" in variant:
        ops.append(v2.RandomSolarize(threshold=128, p=0.2))
    return v2.Compose(ops)


# --------------------------------------------------------------------- cache
class ImageCache:
    """cache[relative path] -> (H, W, 3) uint8 pixels, from a folder holding
    `pixels.u8` (all images back to back) and `index.json` (paths, shapes,
    offsets, the intensity setting). The memory map is opened lazily in each
    process, so loader workers share the page cache instead of pickled copies."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "index.json").read_text())
        self.rows = {p: i for i, p in enumerate(meta["paths"])}
        self.shapes, self.offsets = meta["shapes"], meta["offsets"]
        self.intensity = parse_intensity(meta.get("intensity", AUTO))  # older caches hold auto's pixels
        self._pixels = None

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, path: str) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="r")
        i = self.rows[path]
        h, w, c = self.shapes[i]
        start = self.offsets[i]
        return np.array(self._pixels[start:start + h * w * c]).reshape(h, w, c)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}


def open_cache(folder: Path, root: Path, paths: list[str], mode: str, size: int, workers: int,
               intensity: Intensity = AUTO) -> ImageCache:
    """The cache of `paths` (relative to `root`) at `folder`, built with a
    progress bar if missing: `square` mode stores load_resized(path, size,
    intensity), exactly what the plain path computes; `fit` stores
    load_fitted(path, size, intensity). The caller names `folder` after the
    setting too (data.keyed_path tag); a folder made with another is refused.
    Built in a temporary folder and renamed, so a killed build leaves nothing."""
    folder, intensity = Path(folder), parse_intensity(intensity)
    if (folder / "index.json").is_file():
        return _same_intensity(ImageCache(folder), intensity)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    load = (lambda p: load_resized(p, size, intensity)) if mode == "square" else \
        (lambda p: load_fitted(p, size, intensity))
    shapes, offsets, offset = [], [], 0
    with open(tmp / "pixels.u8", "wb") as f, ThreadPoolExecutor(max(1, workers)) as pool:
        images = pool.map(load, (root / p for p in paths))
        for x in tqdm(images, total=len(paths), desc=f"caching images ({mode} {size})"):
            f.write(x.tobytes())
            shapes.append(list(x.shape))
            offsets.append(offset)
            offset += x.size
    (tmp / "index.json").write_text(json.dumps({"paths": paths, "shapes": shapes, "offsets": offsets,
                                                "intensity": intensity}))
    os.replace(tmp, folder)
    return ImageCache(folder)


def _same_intensity(cache: ImageCache, intensity: Intensity) -> ImageCache:
    """Guards against a cache tag that does not name the setting: pixels of another would pass unnoticed."""
    if cache.intensity != intensity:
        raise ValueError(f"{cache.folder} holds pixels made with intensity {cache.intensity}, not {intensity}")
    return cache


# ------------------------------------------------------- dataset and loaders
class ImageDataset(Dataset):
    """dataset[i] = (uint8 image (3, size, size), target): image i of `paths`
    (relative to `root`) under the `intensity` setting, read from `cache` when
    one is given (made with the same setting), and passed through `augment`
    (PIL image in, PIL image or a list of them out: DINO's multi-crop) if one
    is given. Unlabelled targets (None) are -1."""

    def __init__(self, root: Path, paths: list[str], targets: np.ndarray | None, size: int | None,
                 augment: Callable | None = None, cache: ImageCache | None = None, intensity: Intensity = AUTO):
        self.root, self.paths, self.size, self.augment, self.cache = Path(root), list(paths), size, augment, cache
        self.intensity = parse_intensity(intensity)
        if cache is not None:
            _same_intensity(cache, self.intensity)
        self.targets = torch.full((len(paths),), -1) if targets is None else torch.from_numpy(targets)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        pixels = self.cache[path] if self.cache is not None else \
            load_resized(self.root / path, self.size, self.intensity)
        if self.augment is None:
            return to_chw(pixels), self.targets[i]
        views = self.augment(Image.fromarray(pixels))
        x = [to_chw(v) for v in views] if isinstance(views, list) else to_chw(views)
        return x, self.targets[i]


class SeededItems(Dataset):
    """Wraps a dataset so that item (i, seed) is dataset[i] drawn under its own
    torch seed: an image's augmentation no longer depends on which worker
    loads it or what that worker loaded before."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[i]


class SeededSampler(Sampler):
    """Yields (index, seed) pairs for SeededItems: the order and every image's
    seed are a function of (seed, epoch, index) only, whatever the worker count,
    so a resumed run sees exactly the samples an uninterrupted one would. With
    `world` > 1, process `rank` takes positions rank, rank + world, ... of the
    same global order (the tail that does not divide is dropped), so W processes
    at batch B see, step by step, the images one process sees at batch W * B."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world, self.epoch = n, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        seeds = torch.randint(2**62, (self.n,), generator=g)
        mine = order[: len(self) * self.world][self.rank::self.world]
        return iter([(int(i), int(seeds[i])) for i in mine])


def train_loader(dataset: Dataset, bs: int, *, seed: int, workers: int, rank: int = 0, world: int = 1,
                 drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    """Shuffled, seeded batches of `dataset`; call `loader.sampler.set_epoch(epoch)` before each epoch.
    A last batch of one image is dropped as well (a different image each epoch): BatchNorm cannot train on it."""
    sampler = SeededSampler(len(dataset), seed, rank, world)
    drop = (drop_last and len(dataset) >= bs) or (len(sampler) % bs == 1 and len(sampler) > 1)
    return DataLoader(SeededItems(dataset), batch_size=bs, sampler=sampler, num_workers=workers, drop_last=drop,
                      pin_memory=pin_memory, persistent_workers=workers > 0, worker_init_fn=leave_ctrl_c_to_main)


def leave_ctrl_c_to_main(worker: int) -> None:
    """A loader worker ignores Ctrl-C: the main process finishes the epoch under way (and the kNN monitor's
    pass after it) and saves it (pretraining.Saves), which needs its workers alive."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def eval_loader(dataset: Dataset, bs: int, *, workers: int, pin_memory: bool = False) -> DataLoader:
    """Every image of `dataset` once, in order."""
    return DataLoader(dataset, batch_size=bs, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, worker_init_fn=leave_ctrl_c_to_main)
