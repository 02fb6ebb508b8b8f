"""DICOM pixels as a viewer shows them: each look-up table and functional group
a reader must apply (VOI LUT Sequence, SIGMOID and LINEAR_EXACT windows,
Modality LUT Sequence, PALETTE COLOR, enhanced multi-frame functional groups),
built with pydicom and checked against the DICOM formulas (PS3.3 C.11) worked
out here; then every test file pydicom bundles, checked against pydicom's own
LUT functions; then a file we cannot show, skipped with its reason."""
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence

from data import unreadable_reason
from plumbing.pixels import load_image
from test_pixels_formats import write_dicom

VALUES = np.arange(0, 201).reshape(1, -1)  # every stored value 0..200 once
RAMP = VALUES.astype(np.uint16)
FIXED = ("window", -160.0, 240.0)


def shown(path, setting=("auto",)) -> np.ndarray:
    """Our reader's 8-bit output: (H, W) for gray, (H, W, 3) for colour."""
    rgb = np.asarray(load_image(path, setting)).astype(int)
    return rgb[..., 0] if (rgb == rgb[..., :1]).all() else rgb


def lut_item(data: list[int], first: int = 0, bits: int = 16) -> Dataset:
    item = Dataset()  # US, not the OW pydicom guesses for these ambiguous elements inside a sequence
    item.add_new("LUTDescriptor", "US", [len(data), first, bits])
    item.add_new("LUTData", "US", data)
    return item


def linear(values, lo: float, hi: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2 on screen: <= lo black, > hi white, straight between."""
    values = np.asarray(values, dtype=float)
    return np.rint(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(int)


# --------------------------------------------------------------- VOI functions
def test_a_voi_lut_sequence_without_a_window_is_applied_not_min_max(tmp_path):
    lut = [(i * 37 % 101) * 600 for i in range(150)]  # not monotone: min-max would be far off
    path = write_dicom(tmp_path / "voi.dcm", RAMP, VOILUTSequence=Sequence([lut_item(lut, first=20)]))
    expected = np.rint(np.take(lut, np.clip(VALUES - 20, 0, 149)) * 255 / 65535)  # below first: entry 0; past: the last
    assert np.abs(shown(path) - expected).max() == 0


def test_a_sigmoid_window_is_the_sigmoid(tmp_path):
    path = write_dicom(tmp_path / "s.dcm", RAMP, WindowCenter=100, WindowWidth=50, VOILUTFunction="SIGMOID")
    expected = np.rint(255 / (1 + np.exp(-4 * (VALUES - 100) / 50)))  # C.11.2.1.3.1
    assert np.abs(shown(path) - expected).max() == 0


def test_linear_exact_ends_at_centre_plus_half_the_width(tmp_path):
    # centre 100.3: no pixel lands on a rounding tie (x.5), where float noise may go either way
    path = write_dicom(tmp_path / "e.dcm", RAMP, WindowCenter=100.3, WindowWidth=50, VOILUTFunction="LINEAR_EXACT")
    assert np.abs(shown(path) - linear(VALUES, 75.3, 125.3)).max() == 0  # C.11.2.1.3.2; LINEAR would end at 124.3
    assert shown(path)[0, 124] == 248  # (124 - 75.3) / 50 * 255; LINEAR: 253


# ------------------------------------------------------------ modality and colour
def test_a_modality_lut_sequence_gives_the_units_a_fixed_window_is_in(tmp_path):
    lut = [100, 200, 300, 400]
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    path = write_dicom(tmp_path / "m.dcm", stored, ModalityLUTSequence=Sequence([lut_item(lut)]))
    assert shown(path, ("window", 0.0, 510.0)).tolist() == [[50, 100], [150, 200]]  # the LUT's values / 2
    assert shown(path).tolist() == [[0, 85], [170, 255]]  # no window: min-max of 100..400


def test_palette_colour_is_its_colours_not_gray_indices(tmp_path):
    red, green, blue = [0, 65535, 0, 257 * 7], [0, 0, 65535, 257 * 70], [65535, 0, 0, 257 * 200]
    attrs = {f"{c}PaletteColorLookupTable{part}": value for c, data in (("Red", red), ("Green", green), ("Blue", blue))
             for part, value in (("Descriptor", [4, 0, 16]), ("Data", np.array(data, "<u2").tobytes()))}
    path = write_dicom(tmp_path / "p.dcm", np.array([[0, 1], [2, 3]], dtype=np.uint8), "PALETTE COLOR", **attrs)
    assert shown(path).tolist() == [[[0, 0, 255], [255, 0, 0]], [[0, 255, 0], [7, 70, 200]]]


# ------------------------------------------------------ enhanced multi-frame
def window(centre: float, width: float) -> Sequence:
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = centre, width
    return Sequence([voi])


def enhanced(tmp_path, per_frame_windows=None):
    """Two frames of stored s, HU = s - 1024, the rescale in the shared functional groups, the window
    there too or, given `per_frame_windows`, each frame's in its own group."""
    shared, transform = Dataset(), Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = -1024, 1, "HU"
    shared.PixelValueTransformationSequence = Sequence([transform])
    per_frame = [Dataset() for _ in per_frame_windows or ()]
    for item, (centre, width) in zip(per_frame, per_frame_windows or ()):
        item.FrameVOILUTSequence = window(centre, width)
    if not per_frame:
        shared.FrameVOILUTSequence = window(40, 400)
    hu = np.arange(-301, 400, 6).reshape(1, -1)  # odd: none lands on a rounding tie (x.5) in the windows below
    groups = {"PerFrameFunctionalGroupsSequence": Sequence(per_frame)} if per_frame else {}
    path = write_dicom(tmp_path / "enh.dcm", np.stack([hu + 1024, hu + 1024]).astype(np.uint16), frames=2,
                       SharedFunctionalGroupsSequence=Sequence([shared]), **groups)
    return path, hu


def test_enhanced_multi_frame_takes_rescale_and_window_from_the_functional_groups(tmp_path):
    path, hu = enhanced(tmp_path)
    assert np.abs(shown(path) - linear(hu, -160, 239)).max() == 0  # C.11.2.1.2: 40 - 0.5 -+ 199.5
    assert np.abs(shown(path, FIXED) - linear(hu, -160, 240)).max() == 0  # the fixed window is in HU


def test_a_per_frame_window_is_the_first_frames(tmp_path):
    path, hu = enhanced(tmp_path, per_frame_windows=[(0.5, 101), (1000, 11)])
    assert np.abs(shown(path) - linear(hu, -50, 50)).max() == 0


# ------------------------------------------------------ pydicom's own test files
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"  # those in the package: nothing is downloaded


def first_frame(path):
    """pydicom's dataset and stored values of the first frame, or None where it cannot decode here."""
    try:
        ds = pydicom.dcmread(path)
        if int(ds.get("NumberOfFrames") or 1) > 1:
            ds.pixel_array_options(index=0)
        return ds, ds.pixel_array
    except Exception:  # no decoder here for its compression, no pixels, no file meta: not ours to judge
        return None


def pydicom_view(ds, stored) -> np.ndarray:
    """pydicom's rendering, scaled to 0..255 the way our reader scales: colour as it is (16-bit
    palette entries / 257), a VOI's output range (PS3.3: the modality output's bits) to 0..255,
    otherwise a whole stored range of 8 or fewer bits, else min-max; MONOCHROME1 inverted."""
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)[..., :3].astype(float)
        return np.rint(rgb / 257 if rgb.max() > 255 else rgb)
    if ds.SamplesPerPixel == 3:
        return stored if stored.dtype == np.uint8 else linear(stored, stored.min(), stored.max())
    values = apply_modality_lut(stored, ds)
    bits, signed = ds.BitsStored, ds.PixelRepresentation == 1
    if "WindowCenter" in ds:
        y_min, y_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        y_min, y_max = (y * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
                        for y in (y_min, y_max))
        gray = linear(apply_voi_lut(values, ds), y_min, y_max)
    elif bits <= 8 and not signed and np.array_equal(values, stored):
        gray = linear(stored, 0, 2**bits - 1)
    else:
        gray = linear(values, values.min(), values.max())
    return 255 - gray if ds.PhotometricInterpretation == "MONOCHROME1" else gray


def test_every_bundled_file_pydicom_decodes_is_shown_as_pydicom_renders_it():
    decoded = {p.name: frame for p in sorted(TEST_FILES.glob("*.dcm")) if (frame := first_frame(p)) is not None}
    assert {"CT_small.dcm", "MR_small.dcm"} <= set(decoded)  # (50 files with pydicom 3.0.2 and no JPEG plugins)
    worst = {}
    for name, frame in decoded.items():
        ours, theirs = shown(TEST_FILES / name), pydicom_view(*frame)
        worst[name] = int(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else 255  # gray for colour
    assert {name: d for name, d in worst.items() if d} == {}


@pytest.mark.parametrize("name", ["liver_1frame.dcm", "liver_expb_1frame.dcm"])
def test_bundled_1_bit_masks_are_black_and_white(name):
    if not (TEST_FILES / name).is_file():
        pytest.skip(f"this pydicom does not bundle {name}")
    assert set(np.unique(shown(TEST_FILES / name))) == {0, 255}  # BitsStored 1: a viewer shows 0 and 255


def test_the_bundled_palette_file_is_its_colours():
    if not (TEST_FILES / "examples_palette.dcm").is_file():
        pytest.skip("this pydicom does not bundle examples_palette.dcm")
    palette = shown(TEST_FILES / "examples_palette.dcm")
    assert palette.ndim == 3 and (palette[..., 0] != palette[..., 2]).mean() > 0.1


# -------------------------------------------------------------- what we cannot show
def test_a_file_we_cannot_show_is_skipped_with_its_reason_not_read_as_other_pixels(tmp_path):
    path = write_dicom(tmp_path / "w0.dcm", RAMP, WindowCenter=100, WindowWidth=0)  # LINEAR needs width >= 1
    reason = unreadable_reason(path)
    assert reason and "\n" not in reason and "Window Width" in reason
    with pytest.raises(ValueError, match="Window Width"):
        load_image(path)
    assert shown(path, FIXED).shape == RAMP.shape  # a chosen window does not need the file's
