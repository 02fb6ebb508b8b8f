"""Pixels that are not 8-bit (16-bit, float, DICOM) to 0..255 under an
`--intensity` setting (pixels.parse_intensity). Only such images import this
module: 8-bit RGB and grayscale images never pass through a setting."""
from __future__ import annotations

import numpy as np

PERCENTILES = (0.5, 99.5)


def to_uint8(values: np.ndarray, setting: tuple) -> np.ndarray:
    """Numbers of any shape -> uint8 under `setting`: <= lo is 0, >= hi is 255,
    linear between. `auto` is min-max here: a DICOM file's own VOI LUT or window
    is dicom.py's, which calls this with the LUT's output range as the window."""
    values = np.asarray(values, dtype=np.float64)
    name = setting[0]
    if name == "window":
        lo, hi = setting[1], setting[2]
    elif name == "percentile":
        lo, hi = np.percentile(values, PERCENTILES)
    elif name in ("auto", "minmax"):
        lo, hi = values.min(), values.max()
    else:
        raise ValueError(f"unknown intensity setting {setting!r}")
    if hi <= lo:  # a constant image is black; percentiles that meet leave what is above white
        return np.where(values > lo, 255, 0).astype(np.uint8)
    return np.rint((np.clip(values, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
