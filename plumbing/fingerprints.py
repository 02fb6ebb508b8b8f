"""The duplicate check (ours, beyond the paper; docs/data.md): images that
show one picture twice (the same pixels, or the same picture resized,
recompressed or re-exposed) in train and test inflate a test score as a leaked
patient does. Each image is fingerprinted while the data is indexed
(data.index_data(..., fingerprint=file_fingerprint) decodes every pixel then,
as training does: pixels.load_image's uint8 RGB, whatever the file's mode or
depth); the sets are counted and listed in splits.json,
and with --duplicates together kept in one split (splits.make_splits' `join`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from data import SPLIT_RATIOS, DataIndex, Unreadable
from errors import UserError
from plumbing.pixels import load_image
from plumbing.splits import connect

# Perceptual hashes at most this many of their 64 bits apart mark near duplicates. Measured on 21
# real pictures of scikit-image's data module (docs/data.md): copies resized, recompressed,
# brightened or made grey lay within 4 bits in 172 of 176 cases (median 0); different pictures, and
# quarter crops of one picture, 20 or more apart.
NEAR_BITS = 4
_DCT = np.cos(np.pi * np.arange(32)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)  # DCT-II, (freq, pos)
_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def fingerprint(pixels: np.ndarray) -> list:
    """[exact, near] of an image as training decodes it (pixels.load_image: (H, W, 3) uint8): a hash of
    every value (equal: the same pixels) and a 64-bit perceptual hash, the 8x8 lowest 2-D DCT frequencies
    of a 32x32 grey thumbnail above their median (a few bits apart: one picture resized, recompressed or
    re-exposed)."""
    exact = hashlib.blake2b(f"{pixels.shape} {pixels.dtype}".encode(), digest_size=16)
    exact.update(np.ascontiguousarray(pixels).tobytes())
    grey = pixels.astype(np.float32).mean(-1)
    thumb = np.asarray(Image.fromarray(np.ascontiguousarray(grey)).resize((32, 32), Image.Resampling.BOX))
    low = (_DCT @ thumb.astype(np.float64) @ _DCT.T)[:8, :8]
    return [exact.hexdigest(), int.from_bytes(np.packbits(low > np.median(low)).tobytes(), "big")]


def file_fingerprint(path: Path) -> list:
    """fingerprint of an image file's pixels as training decodes them (pixels.load_image, intensity auto); a
    file that cannot be decoded raises data.Unreadable, saying why."""
    try:
        pixels = np.asarray(load_image(path))
    except Exception as err:  # Pillow and pydicom raise many types for bad files
        raise Unreadable(f"{type(err).__name__}: {err}") from err
    return fingerprint(pixels)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 of `x` (same shape): np.bitwise_count, which NumPy only has from 2.0 on."""
    return _BYTE_BITS[np.ascontiguousarray(x, dtype=np.uint64).view(np.uint8)].reshape(*x.shape, 8).sum(-1)


def duplicate_sets(index: DataIndex, near_bits: int = NEAR_BITS) -> list[list[int]]:
    """Positions of the images that show one picture: equal exact hashes, or perceptual hashes at most
    `near_bits` apart, joined transitively; sets of two or more. Needs `index.prints`
    (data.index_data(..., fingerprint=file_fingerprint))."""
    if index.prints is None:
        raise UserError("finding duplicates needs fingerprints: data.index_data(..., fingerprint=file_fingerprint)")
    exact = [p[0] for p in index.prints]
    near = np.array([p[1] for p in index.prints], dtype=np.uint64)
    first: dict[str, int] = {}
    pairs = [(first.setdefault(h, i), i) for i, h in enumerate(exact)]
    step = max(1, 2**22 // max(1, len(near)))  # rows per block: about 32 MB of XORs at a time
    for start in range(0, len(near), step):
        a, b = np.nonzero(popcount(near[start:start + step, None] ^ near[None, :]) <= near_bits)
        pairs += [(start + i, j) for i, j in zip(a.tolist(), b.tolist()) if start + i < j]
    members: dict[int, list[int]] = {}
    for i, r in enumerate(connect(list(range(len(exact))), pairs)):
        members.setdefault(r, []).append(i)
    return [m for m in members.values() if len(m) > 1]


def list_duplicates(index: DataIndex, splits: dict, sets: list[list[int]] | None = None) -> dict:
    """`splits` with "duplicates": each set of `duplicate_sets` (`sets`, when already found) as {"identical": all
    the same pixels, "images": {path: its split}}, and one printed line counting them and those that span
    splits. Unchanged without fingerprints."""
    if index.prints is None:
        return splits
    where = {p: name for name in SPLIT_RATIOS for p in splits.get(name, [])}
    found = [{"identical": len({index.prints[i][0] for i in s}) == 1,
              "images": {index.paths[i]: where.get(index.paths[i]) for i in s}}
             for s in (duplicate_sets(index) if sets is None else sets)]
    across = sum(len(set(d["images"].values())) > 1 for d in found)
    same = sum(d["identical"] for d in found)
    print(f"duplicates: {same} sets of identical images and {len(found) - same} of near-identical ones "
          f"({sum(len(d['images']) for d in found)} of {len(index.paths)} images), {across} of the sets "
          "across splits; listed in splits.json" + (" (--duplicates together keeps each set in one split)"
                                                     if across else ""), flush=True)
    return splits | {"duplicates": found}
