"""Fingerprints are taken of the pixels training decodes (pixels.load_image), whatever the file's mode:
big-endian 16-bit TIFFs were fingerprinted after a plain RGB convert, which saturates them, so different
scans were listed as identical and an 8-bit copy of one was missed."""
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import index_data
from plumbing.fingerprints import duplicate_sets, file_fingerprint, fingerprint, list_duplicates
from plumbing.pixels import load_image


def picture(seed: int) -> np.ndarray:
    """(96, 128) uint8 smooth random shapes using the whole 0..255 range: a stand-in for a scan."""
    coarse = np.random.default_rng(seed).random((6, 8)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse).resize((128, 96), Image.Resampling.BICUBIC))
    return np.rint(255 * (smooth - smooth.min()) / (smooth.max() - smooth.min())).astype(np.uint8)


def big_endian_16_bit(pixels: np.ndarray) -> Image.Image:
    """The 8-bit `pixels` as a scanner's values 1000 to 52,000, stored big-endian (mode I;16B)."""
    img = Image.fromarray((pixels.astype(np.uint16) * 200 + 1000).astype(">u2"))
    assert img.mode == "I;16B"
    return img


def test_big_endian_16_bit_scans_differ_and_their_8_bit_copies_are_found(tmp_path):
    for seed in range(3):
        big_endian_16_bit(picture(seed)).save(tmp_path / f"scan{seed}.tif")
    Image.fromarray(picture(0)).save(tmp_path / "scan0_8bit.png")  # what training makes of scan0.tif
    Image.fromarray(picture(0)).save(tmp_path / "scan0_8bit.jpg", quality=80)
    good = (tmp_path / "scan1.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(good[: len(good) // 2])
    index = index_data(tmp_path, workers=1, fingerprint=file_fingerprint)
    assert [s["path"] for s in index.skipped] == ["cut.tif"]  # decoding for the fingerprint still checks
    assert [sorted(index.paths[i] for i in s) for s in duplicate_sets(index)] == \
        [["scan0.tif", "scan0_8bit.jpg", "scan0_8bit.png"]]
    prints = dict(zip(index.paths, index.prints))
    assert prints["scan0.tif"][0] == prints["scan0_8bit.png"][0]  # the same pixels reach the model
    assert len({prints[f"scan{seed}.tif"][0] for seed in range(3)}) == 3
    (found,) = list_duplicates(index, {"train": index.paths})["duplicates"]
    assert found["identical"] is False  # the JPEG's pixels differ


def mode_files(root: Path) -> list[Path]:
    """One picture saved in each Pillow mode a data set may hold, and a 16-bit DICOM file."""
    g = picture(4)
    images = {"I;16B.tif": big_endian_16_bit(g),
              "I;16L.tif": Image.frombytes("I;16L", (128, 96), (g.astype("<u2") * 200 + 1000).tobytes()),
              "I;16.png": Image.fromarray(g.astype(np.uint16) * 200 + 1000),
              "I.tif": Image.fromarray(g.astype(np.int32) * 1000 - 5000),
              "F.tif": Image.fromarray(g.astype(np.float32) / 7),
              "1.png": Image.fromarray(g > 128),
              "P.png": Image.fromarray(g).convert("P"),
              "L.png": Image.fromarray(g),
              "LA.png": Image.fromarray(np.stack([g, 255 - g], -1), "LA"),
              "CMYK.jpg": Image.fromarray(np.stack([g, g, 255 - g, g // 2], -1), "CMYK")}
    for name, img in images.items():
        img.save(root / name.replace(";", "_"))
    if find_spec("pydicom"):  # optional: without it .dcm files are skipped
        from test_pixels_formats import write_dicom
        write_dicom(root / "ct.dcm", g.astype(np.uint16) * 8, RescaleSlope=1, RescaleIntercept=-1024,
                    WindowCenter=0, WindowWidth=1200)
    return sorted(root.iterdir())


def test_every_mode_is_fingerprinted_as_training_decodes_it(tmp_path):
    files = mode_files(tmp_path)
    index = index_data(tmp_path, workers=1, fingerprint=file_fingerprint)
    assert sorted(index.paths) == sorted(f.name for f in files) and not index.skipped
    for path, found in zip(index.paths, index.prints):
        assert found == fingerprint(np.asarray(load_image(tmp_path / path))), path


def test_an_error_of_the_fingerprint_itself_is_raised_not_recorded_as_an_unreadable_file(tmp_path):
    Image.fromarray(picture(0)).save(tmp_path / "a.png")

    def broken(path):
        return fingerprint(path)  # a path where pixels belong: a bug, not a bad file

    with pytest.raises(AttributeError):
        index_data(tmp_path, workers=1, fingerprint=broken)
