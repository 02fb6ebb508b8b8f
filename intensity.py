"""How pixels that are not 8-bit reach 0..255 (`--intensity`), and DICOM files,
which are read here through pydicom (optional: only .dcm files need it).
8-bit RGB and grayscale images never pass through a setting. Imports nothing
of the project, so it is copied along with data.py and pixels.py.

A setting is a plain tuple, so that it pickles into loader workers, loads
from a weights_only checkpoint and survives JSON (as a list, which
`parse_intensity` takes back):
  ("auto",)           DICOM: the file's own VOI window, else min-max; other files: min-max
  ("minmax",)         per image: its minimum -> 0, its maximum -> 255
  ("percentile",)     per image: the 0.5th..99.5th percentiles, clipped outside
  ("window", lo, hi)  fixed, in the image's own units (DICOM: after the rescale, e.g. HU)
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

try:  # 3.0 or later: it decodes one frame alone and turns YBR colour into RGB
    import pydicom
    import pydicom.pixels
except ImportError:
    pydicom = None

Intensity = tuple
AUTO: Intensity = ("auto",)
PERCENTILES = (0.5, 99.5)
NO_PYDICOM = "reading DICOM needs pydicom 3 or later: pip install -U 'pydicom>=3'"
_noted: set[str] = set()  # notes already printed by this process: one per run, not one per file


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


def to_uint8(values: np.ndarray, setting: Intensity, voi: tuple[float, float] | None = None) -> np.ndarray:
    """Numbers of any shape -> uint8 under `setting`: <= lo is 0, >= hi is 255,
    linear between. `voi` is a DICOM file's own window, which `auto` prefers."""
    values = np.asarray(values, dtype=np.float64)
    name = setting[0]
    if name == "window":
        lo, hi = setting[1], setting[2]
    elif name == "auto" and voi is not None:
        lo, hi = voi
    elif name == "percentile":
        lo, hi = np.percentile(values, PERCENTILES)
    elif name in ("auto", "minmax"):
        lo, hi = values.min(), values.max()
    else:
        raise ValueError(f"unknown intensity setting {setting!r}")
    if hi <= lo:  # a constant image is black; percentiles that meet leave what is above white
        return np.where(values > lo, 255, 0).astype(np.uint8)
    return np.rint((np.clip(values, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# --------------------------------------------------------------------- DICOM
def without_pydicom(paths: list[str]) -> list[str | None]:
    """Why each of `paths` cannot be read for want of pydicom (None: it can);
    the .dcm files so skipped are announced in one line, not file by file."""
    reasons = [NO_PYDICOM if pydicom is None and p.lower().endswith(".dcm") else None for p in paths]
    if any(reasons):
        print(f"note: {sum(map(bool, reasons))} .dcm files found but skipped: {NO_PYDICOM}", flush=True)
    return reasons


def _number(ds, keyword: str, default: float | None) -> float | None:
    """A numeric attribute: its first value when it holds several, `default` when absent or empty."""
    value = ds.get(keyword)
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    return default if value is None or value == "" else float(value)


def _voi_window(ds) -> tuple[float, float] | None:
    """(lo, hi) of the file's first linear VOI window (DICOM PS3.3 C.11.2.1.2:
    lo, hi = centre - 0.5 -+ (width - 1) / 2), or None without a usable one."""
    centre, width = _number(ds, "WindowCenter", None), _number(ds, "WindowWidth", None)
    if centre is None or width is None or width < 1:
        return None
    return centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2


def read_dicom(path: Path, setting: Intensity = AUTO) -> Image.Image:
    """A DICOM file as an RGB image, as a viewer shows it: its first frame (a
    multi-frame file is noted once per process), the rescale slope and
    intercept applied (stored values -> e.g. Hounsfield units), then `setting`,
    then MONOCHROME1 (whose low values display bright) inverted. 8-bit colour
    stays as it is."""
    if pydicom is None:
        raise ImportError(f"{path}: {NO_PYDICOM}")
    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        if "frames" not in _noted:
            _noted.add("frames")
            print(f"note: multi-frame DICOM files are read as their first frame (e.g. {Path(path).name}, "
                  f"{frames} frames)", flush=True)
        ds.pixel_array_options(index=0)  # decodes that frame alone
    stored = ds.pixel_array
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return Image.fromarray(stored if stored.dtype == np.uint8 else to_uint8(stored, setting))
    slope, intercept, voi = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0), _voi_window(ds)
    if setting[0] == "auto" and voi is None and stored.dtype == np.uint8 and (slope, intercept) == (1.0, 0.0):
        gray = stored  # an 8-bit image, kept as a PNG's pixels would be
    else:
        gray = to_uint8(stored * slope + intercept, setting, voi)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray).convert("RGB")
