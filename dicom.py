"""DICOM files (.dcm), read through pydicom: optional, only these files need
it, and only they import this module (pixels.load_image, data.index_data).
Copy it with pixels.py and data.py when your data holds DICOM files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from intensity import to_uint8

try:  # 3.0 or later: it decodes one frame alone and turns YBR colour into RGB
    import pydicom
    import pydicom.pixels
except ImportError:
    pydicom = None

NO_PYDICOM = "reading DICOM needs pydicom 3 or later: pip install -U 'pydicom>=3'"
_noted: set[str] = set()  # notes already printed by this process: one per run, not one per file


def without_pydicom(paths: list[str]) -> list[str | None]:
    """Why each of `paths` cannot be read for want of pydicom (None: it can), announced in one line."""
    reasons = [NO_PYDICOM if pydicom is None and p.lower().endswith(".dcm") else None for p in paths]
    if any(reasons):
        print(f"note: {sum(map(bool, reasons))} .dcm files found but skipped: {NO_PYDICOM}", flush=True)
    return reasons


def _dataset(path: Path):
    if pydicom is None:
        raise ImportError(f"{path}: {NO_PYDICOM}")
    return pydicom.dcmread(path)


def stored_values(path: Path) -> np.ndarray:
    """Every frame's stored values, (H, W[, C]) or (F, H, W[, C]): decoding them
    all is what proves a file whole (a truncated one raises)."""
    return _dataset(path).pixel_array


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


def read_dicom(path: Path, setting: tuple) -> Image.Image:
    """A DICOM file as an RGB image, as a viewer shows it: its first frame (a
    multi-frame file is noted once per process), the rescale slope and
    intercept applied (stored values -> e.g. Hounsfield units), then the
    intensity `setting`, then MONOCHROME1 (whose low values display bright)
    inverted. 8-bit colour stays as it is."""
    ds = _dataset(path)
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
