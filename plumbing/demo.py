"""The demo (--demo): a small generated image set and the settings that let a
pretraining run on it finish in about 10 s on two CPU cores. Imported only under --demo."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# What --demo puts in place of the paper's defaults (explicit flags still win);
# each pretraining script adds its tiny timm models.
DEMO_SETTINGS = dict(img_size=64, epochs=5, bs=16, pretrained=False, knn_every=1)
DEMO_CLASSES = ("stripes", "rings", "checks", "blobs")
DEMO_HUES = np.array([[220, 60, 60], [60, 200, 60], [70, 90, 230], [230, 200, 50]], dtype=float)


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float pattern in [0, 1]; position, scale and angle vary per image."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.2, 0.8, 2)
    freq = rng.uniform(4, 9)
    if kind == "stripes":
        angle = rng.uniform(0, np.pi)
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * np.hypot(xx - cx, yy - cy))
    if kind == "checks":
        return ((np.floor(xx * freq) + np.floor(yy * freq)) % 2).astype(float)
    blobs = np.zeros((size, size))
    for bx, by, r in rng.uniform([0, 0, 0.05], [1, 1, 0.15], (4, 3)):
        blobs += np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * r**2))
    return np.clip(blobs, 0, 1)


def make_demo_dataset(root: Path, per_class: int = 40, size: int = 96, seed: int = 0) -> Path:
    """Write `per_class` images of each of four learnable texture classes to
    root/<class>/ (PNG and JPEG alternately; a texture in a class tint over a
    dark random background) and return root. Reuses a complete earlier copy."""
    root = Path(root)
    marker = root / ".complete"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for kind, hue in zip(DEMO_CLASSES, DEMO_HUES):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fg, bg = np.clip(hue + rng.normal(0, 30, 3), 0, 255), rng.uniform(0, 90, 3)
            mix = _pattern(kind, size, rng)[..., None]
            img = mix * fg + (1 - mix) * bg + rng.normal(0, 12, (size, size, 3))
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / kind / f"{kind}_{i:03d}.{ext}")
    marker.write_text("demo data set complete\n")
    return root
