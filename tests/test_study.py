"""study.py: its data sets are real shipped images, written once and the same each time; the transfer
regime's weights load into both arms; a small study runs, reports paired differences, and resumes."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import study
from errors import UserError
from models import create_model


def digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*.png")))).hexdigest()


@pytest.mark.parametrize("name, classes", [("digits", 10), ("textures", 6), ("tissue", 3), ("photos", 5)])
def test_each_set_is_600_real_images_in_balanced_classes_and_the_same_each_time(tmp_path, name, classes):
    folder = study.image_set(name, tmp_path / "a")
    counts = {c.name: len(list(c.glob("*.png"))) for c in folder.iterdir() if c.is_dir()}
    assert len(counts) == classes and set(counts.values()) == {study.PER_SET // classes}
    first = Image.open(next(folder.rglob("*.png")))
    assert first.size == (study.SIZE, study.SIZE)
    pixels = np.stack([np.asarray(Image.open(p).convert("L"), dtype=float) for p in sorted(folder.rglob("*.png"))])
    assert pixels.std() > 10  # photographs and scans, not blank tiles
    assert digest(study.image_set(name, tmp_path / "b")) == digest(folder)  # seeded: the same set anywhere


def test_the_set_is_written_once_and_a_half_written_one_again(tmp_path):
    folder = study.image_set("tissue", tmp_path)
    (folder / "cell" / "000.png").unlink()
    assert not (folder / "cell" / "000.png").exists()  # complete sets are not touched
    (folder / ".complete").unlink()
    study.image_set("tissue", tmp_path)
    assert (folder / "cell" / "000.png").exists()


def test_retina_tiles_lie_inside_the_fundus_and_too_few_tiles_is_an_error(tmp_path):
    folder = study.image_set("tissue", tmp_path)
    means = [np.asarray(Image.open(p)).mean() for p in (folder / "retina").glob("*.png")]
    assert min(means) > 40
    with pytest.raises(UserError, match="fewer than 10"):
        study.tiles(np.zeros((64, 64), np.uint8), 10, np.random.default_rng(0))


def test_transfer_weights_are_trained_on_photos_and_load_into_each_arm(tmp_path):
    photos = study.image_set("photos", tmp_path / "data")
    for arch in study.ARMS.values():
        path = study.transfer_weights(arch, photos, tmp_path / "transfer", epochs=1)
        saved = torch.load(path, weights_only=True)
        torch.manual_seed(0)
        fresh = create_model(arch, img_size=study.SIZE, num_classes=1000).state_dict()
        assert any(not torch.equal(saved[k], fresh[k]) for k in saved)  # trained, not the initialisation
        for classes in (1000, 3):  # CASS keeps the 1000-way head, fine-tuning replaces it
            loaded = create_model(arch, img_size=study.SIZE, num_classes=classes, weights=str(path)).state_dict()
            body = [k for k in saved if loaded[k].shape == saved[k].shape]
            assert all(torch.equal(loaded[k], saved[k]) for k in body)
        assert study.transfer_weights(arch, photos, tmp_path / "transfer", epochs=1) == path  # once


def test_a_small_study_reports_paired_differences_and_resumes(tmp_path, capsys):
    small = ["--out", str(tmp_path), "--sets", "digits", "--regimes", "random", "--rows", "cass", "--fracs", "0.1",
             "--epochs", "1", "--ft-epochs", "1", "--resamples", "50"]
    argv = [*small, "--seeds", "0", "1"]
    report = study.main(study.parse_args(argv))
    summary = json.loads((tmp_path / "digits" / "random" / "summary.json").read_text())
    none, cass = (summary["rows"][row]["vit"]["0.1"] for row in ("none", "cass"))
    assert "diff" not in none and cass["diff"] == pytest.approx(cass["mean"] - none["mean"])
    assert cass["low"] <= cass["diff"] <= cass["high"]
    text = report.read_text()
    assert study.command(study.parse_args(argv)) in text and f"{cass['diff']:+.3f} [" in text
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
    results = tmp_path / "digits" / "random" / "finetune" / "cass-vit-0.1" / "results.json"
    stamp = results.stat().st_mtime_ns
    (tmp_path / "digits" / "random" / "summary.json").unlink()
    study.main(study.parse_args(argv))  # the summary again, from the runs on disk: nothing retrained
    assert results.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "digits" / "random" / "summary.json").read_text())["rows"] == summary["rows"]
    with pytest.raises(UserError, match="pick another --out"):
        study.main(study.parse_args([*small, "--seeds", "0"]))
