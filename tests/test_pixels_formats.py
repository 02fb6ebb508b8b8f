"""DICOM files and intensity windows (16-bit, float, DICOM), checked against
values worked out by hand, the --intensity flag, the cache keyed by the
setting, and the index step saying what it passed over (no pydicom, wrong
extensions) instead of going silently empty."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from plumbing import dicom
from plumbing import flags
from plumbing import runtime
from conftest import class_folders
from data import index_data, keyed_path, unreadable_reason
from errors import UserError
from plumbing.intensity import to_uint8
from plumbing.pixels import AUTO, ImageDataset, intensity_tag, load_image, load_resized, open_cache, parse_intensity

WINDOW = ("window", 0.0, 510.0)  # 255 / 510: every even value maps to a whole number


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", frames: int = 0, **attrs):
    """A small uncompressed DICOM file (Explicit VR Little Endian) of `pixels`:
    (H, W) or (frames, H, W) grayscale, (H, W, 3) uint8 RGB."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[1:3] if frames else pixels.shape[:2]
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(pixels.dtype.kind == "i")
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    if frames:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# A CT-like slice: stored s, rescaled HU = 2 s - 1024; the file's window
# (centre 128, width 256) is lo, hi = 128 - 0.5 -+ 127.5 = 0, 255 (PS3.3
# C.11.2.1.2), so on screen a pixel is its HU clipped to 0..255.
HU = np.array([[-24, 0, 100], [254, 300, 138]])
STORED = ((HU + 1024) // 2).astype(np.uint16)
CT = dict(RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=[128, 40], WindowWidth=[256, 400])


def gray(img: Image.Image) -> np.ndarray:
    x = np.asarray(img)
    assert x.dtype == np.uint8 and x.shape[2] == 3 and (x == x[..., :1]).all()
    return x[..., 0]


# ------------------------------------------------------------------ settings
def test_settings_parse_round_trip_through_json_pickle_and_checkpoints_and_name_caches(tmp_path):
    assert parse_intensity(["window", "-1000", "400"]) == ("window", -1000.0, 400.0)
    assert parse_intensity("percentile") == ("percentile",)
    for setting in (AUTO, ("minmax",), ("percentile",), ("window", -1000.0, 400.5)):
        assert parse_intensity(json.loads(json.dumps(setting))) == setting
        assert pickle.loads(pickle.dumps(setting)) == setting
        torch.save({"intensity": setting}, tmp_path / "c.pt")
        assert torch.load(tmp_path / "c.pt", weights_only=True)["intensity"] == setting
    for bad in (["window", "1"], ["window", "5", "1"], ["window", "a", "b"], ["window", "0", "inf"],
                ["minmax", "3"], ["gamma"], []):
        with pytest.raises(ValueError, match="intensity must be"):
            parse_intensity(bad)
    assert intensity_tag(AUTO) == ""  # the caches made before the setting hold auto's pixels
    assert intensity_tag(["window", -1000, 400]) == "_window_m1000.0_400.0"
    assert "-" not in intensity_tag(("window", -1e-5, 3.0))


def test_intensity_flag_parses_negative_bounds_and_rejects_bad_ones_with_a_usage_error(capsys):
    p = flags.new_parser("x")
    flags.add_common_args(flags.arg_groups(p), epochs=1, epochs_source="test", out_default="x")
    assert p.parse_args([]).intensity == AUTO
    assert p.parse_args(["--intensity", "window", "-1000", "400"]).intensity == ("window", -1000.0, 400.0)
    assert p.parse_args(["--intensity", "percentile", "--bs", "4"]).intensity == ("percentile",)
    with pytest.raises(SystemExit) as stop:
        p.parse_args(["--intensity", "window", "400", "-1000"])
    assert stop.value.code == 2
    assert "argument --intensity: intensity must be" in capsys.readouterr().err


def test_windows_by_hand():
    values = np.array([-5, 0, 100, 300, 510, 900])
    assert to_uint8(values, WINDOW).tolist() == [0, 0, 50, 150, 255, 255]
    # 201 values: the 0.5th and 99.5th percentiles are the 2nd and 200th (0 and 510), outliers clipped
    spread = np.array([-1e6, 0] + [100] * 197 + [510, 1e6])
    assert to_uint8(spread, ("percentile",))[[0, 1, 2, 199, 200]].tolist() == [0, 0, 50, 255, 255]
    assert to_uint8(np.array([0, 255, 510]), ("minmax",)).tolist() == [0, 128, 255]
    assert to_uint8(np.full(4, 7.0), ("minmax",)).tolist() == [0] * 4  # constant: black, not a division by 0
    assert to_uint8(np.array([3.0] * 300 + [9.0]), ("percentile",)).tolist() == [0] * 300 + [255]


def test_16_bit_and_float_files_follow_the_setting_and_8_bit_files_ignore_it(tmp_path):
    Image.fromarray(np.array([[0, 100, 300, 510]], dtype=np.uint16)).save(tmp_path / "a.png")
    assert gray(load_image(tmp_path / "a.png")).tolist() == [[0, 50, 150, 255]]  # auto: min-max
    assert gray(load_image(tmp_path / "a.png", ("window", 100.0, 355.0))).tolist() == [[0, 0, 200, 255]]
    spread = np.array([[-1e6, 0] + [100] * 197 + [510, 1e6]], dtype=np.float32)
    Image.fromarray(spread, "F").save(tmp_path / "f.tif")
    float_pixels = gray(load_image(tmp_path / "f.tif", ("percentile",)))
    assert float_pixels[0, [0, 1, 2, 199, 200]].tolist() == [0, 0, 50, 255, 255]
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    for setting in (("percentile",), ("minmax",), WINDOW):
        assert np.array_equal(load_image(tmp_path / "rgb.png", setting), rgb)
        assert np.array_equal(gray(load_image(tmp_path / "l.png", setting)), rgb[..., 0])


# --------------------------------------------------------------------- DICOM
def test_dicom_rescale_then_the_files_first_window_or_a_chosen_one(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm", STORED, **CT)
    assert gray(load_image(path)).tolist() == np.clip(HU, 0, 255).tolist()  # HU, clipped to the file's window
    assert gray(load_image(path, WINDOW)).tolist() == [[0, 0, 50], [127, 150, 69]]  # HU / 2, clipped
    assert gray(load_image(path, ("minmax",)))[[0, 1], [0, 1]].tolist() == [0, 255]  # -24 and 300 HU
    monochrome1 = write_dicom(tmp_path / "m1.dcm", STORED, "MONOCHROME1", **CT)
    assert gray(load_image(monochrome1)).tolist() == (255 - np.clip(HU, 0, 255)).tolist()
    plain = write_dicom(tmp_path / "plain.dcm", STORED, RescaleSlope=2, RescaleIntercept=-1024)
    assert gray(load_image(plain))[[0, 1], [0, 1]].tolist() == [0, 255]  # no window in the file: min-max
    assert unreadable_reason(path) is None


def test_dicom_8_bit_gray_and_rgb_are_kept_and_broken_files_are_reasons(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    assert np.array_equal(load_image(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB"), ("percentile",)), rgb)
    gray8 = np.array([[10, 20], [30, 40]], dtype=np.uint8)
    assert gray(load_image(write_dicom(tmp_path / "us.dcm", gray8))).tolist() == gray8.tolist()
    good = (tmp_path / "us.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(good[:-3])
    (tmp_path / "text.dcm").write_text("not a DICOM file")
    assert unreadable_reason(tmp_path / "cut.dcm") and unreadable_reason(tmp_path / "text.dcm")


def test_multi_frame_dicom_is_its_first_frame_with_one_note_per_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dicom, "_noted", set())
    frames = np.stack([np.array([[0, 100], [300, 510]]), np.full((2, 2), 7), np.full((2, 2), 9)]).astype(np.uint16)
    for name in ("a.dcm", "b.dcm"):
        write_dicom(tmp_path / name, frames, frames=3)
        assert gray(load_image(tmp_path / name)).tolist() == [[0, 50], [150, 255]]
    assert capsys.readouterr().out.count("multi-frame DICOM files are read as their first frame") == 1


def test_dicom_folders_are_indexed_and_reach_the_dataset_windowed(tmp_path):
    class_folders(tmp_path / "d", {"photo": 2})
    write_dicom(tmp_path / "d" / "ct" / "a.dcm", STORED, **CT)
    write_dicom(tmp_path / "d" / "ct" / "b.dcm", STORED, **CT)
    (tmp_path / "d" / "ct" / "c.dcm").write_text("truncated")
    index = index_data(tmp_path / "d", workers=1)
    assert index.classes == ["ct", "photo"] and index.paths[:2] == ["ct/a.dcm", "ct/b.dcm"]
    assert [s["path"] for s in index.skipped] == ["ct/c.dcm"]
    x, y = ImageDataset(index.root, index.paths, index.targets, None, intensity=WINDOW)[0]
    assert x[0].tolist() == [[0, 0, 50], [127, 150, 69]] and y == 0


# ---------------------------------------------------- what the index passes over
def test_without_pydicom_dcm_files_are_skipped_in_one_line_naming_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dicom, "pydicom", None)  # as if it were not installed
    class_folders(tmp_path / "d", {"photo": 2})
    for name in ("a.dcm", "b.DCM", "c.dcm"):
        (tmp_path / "d" / "ct" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / "ct" / name).write_bytes(b"DICM")
    class_folders(tmp_path / "d", {"ct": 1})  # so that the class keeps an image
    index = index_data(tmp_path / "d", workers=1)
    out = capsys.readouterr().out
    assert "note: 3 .dcm files found but skipped" in out and "pip install" in out and "pydicom" in out
    assert sorted(s["path"] for s in index.skipped) == ["ct/a.dcm", "ct/b.DCM", "ct/c.dcm"]
    assert all("pydicom" in s["reason"] for s in index.skipped) and len(index.paths) == 3
    only_dicom = tmp_path / "only"
    for i in range(2):
        (only_dicom / f"{i}.dcm").parent.mkdir(parents=True, exist_ok=True)
        (only_dicom / f"{i}.dcm").write_bytes(b"DICM")
    with pytest.raises(UserError, match="none of the 2 images.*pip install"):
        index_data(only_dicom, workers=1, check_images=False)


def test_ignored_files_are_counted_by_extension(tmp_path, capsys):
    class_folders(tmp_path / "d", {"a": 2})
    for name in ("a/notes.txt", "a/more.txt", "meta.json", "a/.DS_Store", ".git/config", "a/scan"):
        (tmp_path / "d" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / name).write_text("x")
    index_data(tmp_path / "d", workers=1)
    assert "ignored 4 files: .txt 2, (no extension) 1, .json 1" in capsys.readouterr().out
    for name in ("x.nii", "y.nii"):
        (tmp_path / "nifti" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "nifti" / name).write_text("x")
    with pytest.raises(UserError, match="no images"):
        index_data(tmp_path / "nifti", workers=1)
    assert "ignored 2 files: .nii 2" in capsys.readouterr().out


# --------------------------------------------------------------------- cache
def test_cache_is_built_and_named_per_setting_and_refuses_another(tmp_path):
    (tmp_path / "d").mkdir()
    Image.fromarray(np.array([[0, 100], [300, 510]], dtype=np.uint16)).save(tmp_path / "d" / "a.png")
    index = index_data(tmp_path / "d", workers=1)
    # auto last: its tag is a prefix of the window's, and its drop_stale must spare the window cache
    caches = {s: runtime.image_cache(index, "square", 2, str(tmp_path / "cache"), 1, s) for s in (WINDOW, AUTO)}
    assert len({c.folder for c in caches.values()}) == 2 and all(c.folder.exists() for c in caches.values())
    assert caches[WINDOW].folder.name.split("-")[2] == "square2_window_0.0_510.0"
    for setting, cache in caches.items():
        assert np.array_equal(cache["a.png"], load_resized(tmp_path / "d" / "a.png", 2, setting))
        ds = ImageDataset(index.root, index.paths, index.targets, 2, cache=cache, intensity=list(setting))
        assert torch.equal(pickle.loads(pickle.dumps(ds))[0][0], ImageDataset(index.root, index.paths, None, 2,
                                                                             intensity=setting)[0][0])
    assert caches[WINDOW]["a.png"][..., 0].tolist() == [[0, 50], [150, 255]]
    with pytest.raises(ValueError, match="intensity"):
        ImageDataset(index.root, index.paths, None, 2, cache=caches[AUTO], intensity=WINDOW)
    with pytest.raises(ValueError, match="intensity"):
        open_cache(caches[AUTO].folder, index.root, index.paths, "square", 2, 1, ("percentile",))
    tagged = keyed_path(tmp_path / "c2", index.root, index.paths, f"fit4{intensity_tag(WINDOW)}")
    assert open_cache(tagged, index.root, index.paths, "fit", 4, 1, WINDOW).intensity == WINDOW
