"""Decode-once image cache. Every pipeline starts with a deterministic resize
(App. C.5.2), so the resized uint8 pixels can be computed once and memory-mapped
by every later epoch, run and loader worker without changing a single sample.

A cache folder holds `pixels.u8` (all images back to back, (H, W, 3) uint8 each)
and `index.json` (shapes and offsets). Its name carries a hash of the data root,
the mode, the size, and every file's path, byte size and modification time: a
changed, added or removed file gives a new cache, and the stale one is removed.

Modes: `square` stores load_resized(path, size), exactly what the plain path
computes; `fit` (DINO, which crops the image itself) keeps the aspect ratio and
shrinks the longer side to at most `size`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data import DataIndex, file_signature, load_image, load_resized

DEFAULT_DIR = "runs/cache"


def _fit(path: Path, max_side: int) -> np.ndarray:
    img = load_image(path)
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return np.asarray(img)


def _key(index: DataIndex, mode: str, size: int) -> tuple[str, str]:
    """(prefix naming root, mode and size; full name adding the content hash)."""
    root_hash = hashlib.sha256(str(index.root).encode()).hexdigest()[:8]
    prefix = f"{index.root.name or 'data'}-{root_hash}-{mode}{size}"
    return prefix, f"{prefix}-{file_signature(index.root, index.paths)}"


class ImageCache:
    """Read side: cache[i] is image i of the index it was built for, (H, W, 3)
    uint8 pixels. The memory map is opened lazily in each process, so
    loader workers share the page cache instead of pickled copies."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "index.json").read_text())
        self.shapes, self.offsets = meta["shapes"], meta["offsets"]
        self._pixels = None

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="r")
        h, w, c = self.shapes[i]
        start = self.offsets[i]
        return np.array(self._pixels[start:start + h * w * c]).reshape(h, w, c)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}


def open_cache(index: DataIndex, mode: str, size: int, cache_dir: str | Path, workers: int) -> ImageCache:
    """The cache for `index` at this mode and size, built (with a progress bar) if missing or stale."""
    cache_dir = Path(cache_dir)
    prefix, name = _key(index, mode, size)
    folder = cache_dir / name
    if (folder / "index.json").is_file():
        return ImageCache(folder)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    load = (lambda p: load_resized(p, size)) if mode == "square" else (lambda p: _fit(p, size))
    shapes, offsets, offset = [], [], 0
    with open(tmp / "pixels.u8", "wb") as f, ThreadPoolExecutor(max(1, workers)) as pool:
        images = pool.map(load, (index.root / p for p in index.paths))
        for x in tqdm(images, total=len(index.paths), desc=f"caching images ({mode} {size})"):
            f.write(x.tobytes())
            shapes.append(list(x.shape))
            offsets.append(offset)
            offset += x.size
    (tmp / "index.json").write_text(json.dumps({"paths": index.paths, "shapes": shapes, "offsets": offsets}))
    for stale in cache_dir.glob(f"{prefix}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, folder)
    return ImageCache(folder)
