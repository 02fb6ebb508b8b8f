"""PNG figures drawn with Pillow alone (no plotting library): heat maps with a
colour bar, overlays on images and side-by-side panels, for maps.py (the
report's charts, which need axes and legends, are in figures.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# A perceptually ordered colour map (dark blue -> teal -> green -> yellow), viridis-like.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float)
LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
                for c in range(3)], axis=1).astype(np.uint8)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours."""
    return LUT[np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)]


def overlay(image: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A map in [0, 1], resized to the (H, W, 3) uint8 image, blended over it."""
    heat = np.asarray(Image.fromarray(colorize(values)).resize(image.shape[1::-1], Image.BILINEAR))
    return np.rint((1 - alpha) * image + alpha * heat).astype(np.uint8)


def heatmap(values: np.ndarray, title: str, size: int = 256) -> Image.Image:
    """The map at `size` px with a title and a colour bar labelled 0..1."""
    body = Image.fromarray(colorize(values)).resize((size, size), Image.BILINEAR)
    canvas = Image.new("RGB", (size + 60, size + 24), "white")
    canvas.paste(body, (0, 20))
    bar = Image.fromarray(colorize(np.linspace(1, 0, size)[:, None].repeat(12, 1)))
    canvas.paste(bar, (size + 8, 20))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 4), title, fill="black")
    draw.text((size + 24, 20), "1.0", fill="black")
    draw.text((size + 24, 20 + size // 2 - 5), "0.5", fill="black")
    draw.text((size + 24, 10 + size), "0.0", fill="black")
    return canvas


def panels(images: list[tuple[str, Image.Image]]) -> Image.Image:
    """Figures side by side, each under its title."""
    height = max(img.height for _, img in images) + 20
    canvas = Image.new("RGB", (sum(img.width + 10 for _, img in images), height), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for title, img in images:
        draw.text((x + 2, 4), title, fill="black")
        canvas.paste(img, (x, 20))
        x += img.width + 10
    return canvas


def save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
