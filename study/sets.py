"""The study's image sets and the transfer regime's starting point (study.py; docs/study.md).

Three real sets of different kinds, cut from the scans and photographs that
scikit-learn and scikit-image ship (nothing downloaded, nothing generated), 600
images each at 32 px, written once as PNG files in class folders:
  digits    scikit-learn's scans of handwritten digits, 10 classes
  textures  tiles of scikit-image's grey-scale photographs, 6 classes
  tissue    grey tiles of its histology, fundus and cell-microscopy images, 3 classes
and a fourth, photos (tiles of its colour photographs, 5 classes), on which
transfer_weights trains a tiny backbone with labels, standing in for ImageNet weights.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from plumbing import checkpoint
from errors import UserError
from plumbing.models import create_model, model_norm, normalise

SIZE = 32  # image and tile size
PER_SET = 600  # images per set


def tiles(image: np.ndarray, count: int, rng: np.random.Generator,
          keep: Callable[[np.ndarray], bool] = lambda tile: True) -> list[np.ndarray]:
    """`count` non-overlapping SIZE-px tiles of one image, drawn at random from its grid among those `keep` accepts."""
    h, w = image.shape[:2]
    found = [tile for y in range(0, h - SIZE + 1, SIZE) for x in range(0, w - SIZE + 1, SIZE)
             if keep(tile := image[y:y + SIZE, x:x + SIZE])]
    if len(found) < count:
        raise UserError(f"an image of {h}x{w} px has {len(found)} usable tiles, fewer than {count}")
    return [found[i] for i in sorted(rng.choice(len(found), count, replace=False))]


def skimage_images(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        from skimage import data
    except ImportError:
        raise UserError("the study's photographs ship with scikit-image: pip install scikit-image") from None
    return {name: getattr(data, name)() for name in names}


def digits(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """scikit-learn's 8x8 scans of handwritten digits (0..16 ink), 60 a class drawn at random, upscaled."""
    from sklearn.datasets import load_digits
    found = load_digits()
    images = (found.images * 16).clip(0, 255).astype(np.uint8)
    return {str(c): [np.asarray(Image.fromarray(images[i]).resize((SIZE, SIZE), Image.BILINEAR))
                     for i in sorted(rng.choice(np.flatnonzero(found.target == c), PER_SET // 10, replace=False))]
            for c in range(10)}


def textures(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Tiles of six grey-scale photographs: brick, grass, gravel, the moon, a man with a camera, coins."""
    images = skimage_images(("brick", "grass", "gravel", "moon", "camera", "coins"))
    return {name: tiles(image, PER_SET // 6, rng) for name, image in images.items()}


def tissue(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Tiles of an immunohistochemistry-stained tissue section, a fundus photograph (inside its disc) and a
    light-microscopy image of a cell, in grey-scale (as most medical images are) so that colour alone does not
    name the class."""
    images = skimage_images(("immunohistochemistry", "retina", "cell"))
    grey = {name: np.asarray(Image.fromarray(image).convert("L")) for name, image in images.items()}
    return {name: tiles(image, PER_SET // 3, rng, keep=lambda t: name != "retina" or t.mean() > 40)
            for name, image in grey.items()}


def photos(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Tiles of five colour photographs: an astronaut, a cat, a cup of coffee, a rocket, the Hubble deep field."""
    images = skimage_images(("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"))
    return {name: tiles(image, PER_SET // 5, rng) for name, image in images.items()}


BUILDERS = {"digits": digits, "textures": textures, "tissue": tissue, "photos": photos}


def image_set(name: str, root: Path) -> Path:
    """The set as PNG files in class folders under root/name, written once (seeded)."""
    folder = root / name
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for label, images in BUILDERS[name](np.random.default_rng(0)).items():
        (folder / label).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / label / f"{i:03d}.png")
    (folder / ".complete").write_text("ok\n")
    return folder


def transfer_weights(arch: str, photos_dir: Path, out: Path, epochs: int) -> Path:
    """`arch` trained with every label of the photos set (cross-entropy, Adam 1e-3, batch 32, random flips and
    4-px shifts) with a 1000-way head, as ImageNet weights come with one; saved as a timm weights file."""
    path = out / f"{arch}.pth"
    if path.exists():
        return path
    classes = sorted(p.name for p in photos_dir.iterdir() if p.is_dir())
    files = [(f, y) for y, c in enumerate(classes) for f in sorted((photos_dir / c).glob("*.png"))]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f, _ in files])
    y = torch.tensor([label for _, label in files])
    torch.manual_seed(0)
    model = create_model(arch, img_size=SIZE, num_classes=1000)
    mean, std = model_norm(model, "model")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(epochs):
        for batch in torch.randperm(len(x)).split(32):
            padded = F.pad(x[batch], (4, 4, 4, 4), mode="replicate")
            images = torch.stack([image[:, dy:dy + SIZE, dx:dx + SIZE]
                                  for image, (dy, dx) in zip(padded, torch.randint(0, 9, (len(batch), 2)).tolist())])
            images = torch.where(torch.rand(len(batch), 1, 1, 1) < 0.5, images.flip(3), images)
            loss = F.cross_entropy(model(normalise(images, mean, std)), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{arch} on photos, epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(path, lambda f: torch.save(model.state_dict(), f))
    return path
