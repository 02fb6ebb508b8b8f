"""DICOM files (.dcm), read through pydicom: optional, only these files need
it, and only they import this module (pixels.load_image, data.index_data).
Copy it with pixels.py and data.py when your data holds DICOM files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from plumbing.intensity import to_uint8

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
    all is what proves a file whole (a truncated one raises), and showing the
    first under `auto` (its LUTs, window or palette) that we show it as a viewer
    would: a file we cannot raises why, so the index skips it with that reason."""
    ds = _dataset(path)
    values = ds.pixel_array
    _render(ds, values[0] if int(ds.get("NumberOfFrames") or 1) > 1 else values, ("auto",))
    return values


def read_dicom(path: Path, setting: tuple) -> Image.Image:
    """A DICOM file as an RGB image, as a viewer shows it: its first frame (a
    multi-frame file is noted once per process), the modality LUT or rescale
    applied (stored values -> e.g. Hounsfield units), then the intensity
    `setting` (under `auto` the file's VOI LUT or window), then MONOCHROME1
    (whose low values display bright) inverted. Colour, palette colour included,
    is shown as its colours."""
    ds = _dataset(path)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        if "frames" not in _noted:
            _noted.add("frames")
            print(f"note: multi-frame DICOM files are read as their first frame (e.g. {Path(path).name}, "
                  f"{frames} frames)", flush=True)
        ds.pixel_array_options(index=0)  # decodes that frame alone
    return _render(ds, ds.pixel_array, setting)


def _render(ds, stored: np.ndarray, setting: tuple) -> Image.Image:
    """One frame's stored values, (H, W[, C]), as read_dicom describes; pydicom's
    LUT functions do every DICOM step, we only choose the setting and scale to 0..255."""
    photometric = ds.get("PhotometricInterpretation")
    if photometric == "PALETTE COLOR":  # stored values are indices into the file's colour table
        rgb = pydicom.pixels.apply_color_lut(stored, ds)[..., :3]  # an alpha table aside: shown opaque
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])  # entries are 0 .. 2**depth - 1 in any word size
        return Image.fromarray(to_uint8(rgb, ("window", 0, 2**depth - 1)))
    if int(ds.get("SamplesPerPixel", 1)) == 3:  # pydicom has made YBR into RGB
        return Image.fromarray(stored if stored.dtype == np.uint8 else to_uint8(stored, setting))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"cannot show photometric interpretation {photometric!r} with one sample per pixel")
    _first_frame_groups(ds)
    for keyword, identity in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        if ds.get(keyword) in (None, ""):  # pydicom rescales only with both; one alone still applies
            setattr(ds, keyword, identity)
    values = pydicom.pixels.apply_modality_lut(stored, ds)
    if setting[0] != "auto":
        gray = to_uint8(values, setting)
    elif (gray := _voi(values, ds)) is None:
        # no VOI: up to 8 unsigned bits, left as stored, span their whole range (8 bits as a PNG's
        # pixels, a 1-bit mask 0 and 255, as viewers show them); anything else, min-max
        bits = int(ds.get("BitsStored") or 8 * stored.itemsize)
        whole = stored.dtype.kind == "u" and bits <= 8 and np.array_equal(values, stored)
        gray = to_uint8(values, ("window", 0, 2**bits - 1) if whole else setting)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray).convert("RGB")


def _first_frame_groups(ds) -> None:
    """An enhanced multi-frame file keeps its rescale and window in functional
    groups (PS3.3 C.7.6.16: shared, or per frame), where pydicom's LUT functions
    do not look: copy the first frame's to the top level."""
    for groups in (ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")):
        for keyword in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if groups and groups[0].get(keyword):
                ds.update(groups[0].get(keyword)[0])


def _voi(values: np.ndarray, ds) -> np.ndarray | None:
    """The file's first VOI LUT (preferred, as by pydicom) or window (LINEAR,
    LINEAR_EXACT or SIGMOID) applied to modality `values` by pydicom, its output
    range scaled to 0..255; None when the file has neither."""
    if ds.get("VOILUTSequence"):
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])  # the LUT's output is 0 .. 2**depth - 1
        return to_uint8(pydicom.pixels.apply_voi(np.rint(values).astype(np.int64), ds), ("window", 0, 2**depth - 1))
    if ds.get("WindowCenter") in (None, "") or ds.get("WindowWidth") in (None, ""):
        return None
    lo, hi = pydicom.pixels.apply_windowing(np.array([-np.inf, np.inf]), ds)  # its output range
    return to_uint8(pydicom.pixels.apply_windowing(values, ds), ("window", lo, hi))
