"""Bad input: each file is either read correctly or skipped with a logged reason,
and the run completes with the skip list saved."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from plumbing import checkpoint
import data
import finetune
import pretrain_cass
from conftest import TINY, class_folders, write_image
from data import index_data
from plumbing.pixels import load_image
from errors import UserError
from plumbing.splits import label_fraction, make_splits, select


def messy_dataset(root):
    class_folders(root, {"lesion": 6, "normal": 6})
    (root / "normal" / "zero.jpg").write_bytes(b"")
    png = (root / "lesion" / "lesion_0.png").read_bytes()
    (root / "lesion" / "cut.png").write_bytes(png[: len(png) // 2])
    (root / "lesion" / "text.jpg").write_text("not a JPEG")
    (root / "lesion" / "notes.txt").write_text("ignored")
    (root / "lesion" / ".DS_Store").write_bytes(b"\x00\x01")
    write_image(root / "lesion" / "naïve café 01.png")
    write_image(root / "lesion" / "deep" / "er" / "nested.png")
    write_image(root / "normal" / "cmyk.jpg", "CMYK")
    write_image(root / "normal" / "alpha.png", "RGBA")
    write_image(root / "normal" / "palette.png", "P")
    write_image(root / "normal" / "mri16.tif", "I;16")
    rotated = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees
    rotated.save(root / "normal" / "rotated.jpg", exif=exif)
    write_image(root / "normal" / "huge.png", size=(200, 150))
    return root


def test_messy_folder_is_read_or_skipped_with_reasons_and_a_run_completes(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_PIXELS", 20_000)  # the 200x150 image stands in for a gigapixel scan
    root = messy_dataset(tmp_path / "d")
    index = index_data(root, workers=2)
    skipped = {s["path"]: s["reason"] for s in index.skipped}
    assert set(skipped) == {"normal/zero.jpg", "lesion/cut.png", "lesion/text.jpg", "normal/huge.png"}
    assert "too large" in skipped["normal/huge.png"]
    assert {"lesion/naïve café 01.png", "lesion/deep/er/nested.png", "normal/cmyk.jpg",
            "normal/rotated.jpg"} <= set(index.paths)
    assert load_image(root / "normal" / "rotated.jpg").size == (20, 40)  # EXIF rotation applied
    out = pretrain_cass.main(pretrain_cass.parse_args(["--data", str(root), "--out", str(tmp_path / "r"),
                                                       "--epochs", "1", *TINY, "--bs", "4"]))
    saved = json.loads((out / "splits.json").read_text())
    assert {s["path"] for s in saved["skipped"]} == set(skipped)
    results = finetune.main(finetune.parse_args(["--ckpt", str(out / "cnn.pt"), "--epochs", "1", "--workers", "0",
                                                 "--resamples", "100"]))
    assert results["classes"] == ["lesion", "normal"]


def test_single_image_class_and_one_percent_of_a_hundred_images(tmp_path):
    class_folders(tmp_path / "d", {"common": 60, "rare": 39, "single": 1})
    index = index_data(tmp_path / "d", workers=2)
    parts = select(index, make_splits(index, 0))
    assert index.class_counts(parts["train"]).tolist()[2] == 1  # the lone image is kept for training
    chosen = label_fraction(index, parts["train"], 0.01, seed=0)
    assert index.class_counts(chosen).tolist() == [1, 1, 1]
    results = finetune.main(finetune.parse_args(
        ["--arch", "test_resnet", "--no-pretrained", "--data", str(tmp_path / "d"), "--img-size", "32", "--frac",
         "0.01", "--epochs", "1", "--workers", "0", "--resamples", "100", "--out", str(tmp_path / "ft")]))
    assert len(results["runs"][0]["labelled_files"]) == 3


def test_multilabel_csv_with_a_label_that_is_never_positive(tmp_path):
    rows = [f"{i}.png,{i % 2},{int(i % 3 == 0)},0" for i in range(20)]
    for i in range(20):
        write_image(tmp_path / f"{i}.png", size=(16, 16), seed=i)
    (tmp_path / "labels.csv").write_text("path,a,b,never\n" + "\n".join(rows) + "\n")
    results = finetune.main(finetune.parse_args(
        ["--arch", "test_vit", "--no-pretrained", "--data", str(tmp_path), "--img-size", "32", "--epochs", "1",
         "--workers", "0", "--resamples", "100", "--out", str(tmp_path / "ft"), "--class-weights", "inverse"]))
    test = results["runs"][0]["test"]
    assert results["classes"] == ["a", "b"]  # the label without a positive gets no head (ISIC's UNK)
    assert len(test["per_class_f1"]) == 2 and all(np.isfinite(v) for v in test["per_class_f1"])
    assert np.isfinite(results["runs"][0]["val_loss"])


class Payload:
    """Unpickling this would create a file: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": checkpoint.FORMAT, "kind": "model", "x": Payload(marker)}, f, protocol=2)
    with pytest.raises(UserError, match="refusing to unpickle"):
        checkpoint.load(tmp_path / "evil.pt", kind="model")
    assert not marker.exists()


def test_nothing_is_written_outside_out_and_the_cache(demo_data, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = {p: p.stat().st_mtime_ns for p in demo_data.rglob("*")}
    out = pretrain_cass.main(pretrain_cass.parse_args(
        ["--data", str(demo_data), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
         "--epochs", "1", *TINY]))
    finetune.main(finetune.parse_args(["--ckpt", str(out / "cnn.pt"), "--epochs", "1", "--workers", "0",
                                       "--resamples", "100", "--cache-dir", str(tmp_path / "cache")]))
    assert {p: p.stat().st_mtime_ns for p in demo_data.rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out", "work"]
    assert list(work.iterdir()) == []
    assert torch.load(out / "cnn.pt", weights_only=True)["method"] == "cass"
