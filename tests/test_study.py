"""study_sets.py: the study's data sets are real shipped images, written once and the same each time; the
transfer regime's weights load into both arms. study.py: a small study runs, reports paired differences,
and resumes."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from study import run as study
from study import sets as study_sets
from errors import UserError
from plumbing.models import create_model


def digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*.png")))).hexdigest()


@pytest.mark.parametrize("name, classes", [("digits", 10), ("textures", 6), ("tissue", 3), ("photos", 5)])
def test_each_set_is_600_real_images_in_balanced_classes_and_the_same_each_time(tmp_path, name, classes):
    folder = study_sets.image_set(name, tmp_path / "a")
    counts = {c.name: len(list(c.glob("*.png"))) for c in folder.iterdir() if c.is_dir()}
    assert len(counts) == classes and set(counts.values()) == {study_sets.PER_SET // classes}
    first = Image.open(next(folder.rglob("*.png")))
    assert first.size == (study_sets.SIZE, study_sets.SIZE)
    pixels = np.stack([np.asarray(Image.open(p).convert("L"), dtype=float) for p in sorted(folder.rglob("*.png"))])
    assert pixels.std() > 10  # photographs and scans, not blank tiles
    assert digest(study_sets.image_set(name, tmp_path / "b")) == digest(folder)  # seeded: the same set anywhere


def test_the_set_is_written_once_and_a_half_written_one_again(tmp_path):
    folder = study_sets.image_set("tissue", tmp_path)
    (folder / "cell" / "000.png").unlink()
    assert not (folder / "cell" / "000.png").exists()  # complete sets are not touched
    (folder / ".complete").unlink()
    study_sets.image_set("tissue", tmp_path)
    assert (folder / "cell" / "000.png").exists()


def test_retina_tiles_lie_inside_the_fundus_and_too_few_tiles_is_an_error(tmp_path):
    folder = study_sets.image_set("tissue", tmp_path)
    means = [np.asarray(Image.open(p)).mean() for p in (folder / "retina").glob("*.png")]
    assert min(means) > 40
    with pytest.raises(UserError, match="fewer than 10"):
        study_sets.tiles(np.zeros((64, 64), np.uint8), 10, np.random.default_rng(0))


def test_transfer_weights_are_trained_on_photos_and_load_into_each_arm(tmp_path):
    photos = study_sets.image_set("photos", tmp_path / "data")
    for arch in study.ARMS.values():
        path = study_sets.transfer_weights(arch, photos, tmp_path / "transfer", epochs=1)
        saved = torch.load(path, weights_only=True)
        torch.manual_seed(0)
        fresh = create_model(arch, img_size=study_sets.SIZE, num_classes=1000).state_dict()
        assert any(not torch.equal(saved[k], fresh[k]) for k in saved)  # trained, not the initialisation
        for classes in (1000, 3):  # CASS keeps the 1000-way head, fine-tuning replaces it
            loaded = create_model(arch, img_size=study_sets.SIZE, num_classes=classes, weights=str(path)).state_dict()
            body = [k for k in saved if loaded[k].shape == saved[k].shape]
            assert all(torch.equal(loaded[k], saved[k]) for k in body)
        assert study_sets.transfer_weights(arch, photos, tmp_path / "transfer", epochs=1) == path  # once


@pytest.mark.slow
def test_a_small_study_in_both_regimes_reports_paired_differences_and_resumes(tmp_path):
    settings = ["--out", str(tmp_path), "--sets", "digits", "--rows", "cass", "variance", "dino", "--epochs", "1",
                "--ft-epochs", "1", "--source-epochs", "1", "--resamples", "50"]
    argv = [*settings, "--seeds", "0", "1"]
    report = study.main(study.parse_args(argv))
    summaries = [json.loads((tmp_path / "digits" / regime / "summary.json").read_text()) for regime in study.REGIMES]
    best = study.chosen_row(summaries, ["cass", "variance", "dino"], "0.1")
    assert best in ("cass", "variance")  # a CASS setting, never DINO
    for summary in summaries:
        assert list(summary["rows"]) == ["none", "cass", "variance", "dino"]  # no pretraining first, always
        for row in ("cass", "variance", "dino"):
            for arm in study.ARMS:
                none, pretrained = summary["rows"]["none"][arm]["0.1"], summary["rows"][row][arm]["0.1"]
                assert "diff" not in none and pretrained["diff"] == pytest.approx(pretrained["mean"] - none["mean"])
                assert pretrained["low"] <= pretrained["diff"] <= pretrained["high"]
                assert pretrained["seeds_better"] == sum(a > b for a, b in zip(pretrained["scores"], none["scores"]))
                # all labels: no pretraining, CASS as published, the chosen setting and DINO only
                assert ("1" in summary["rows"][row][arm]) == (row in ("cass", best, "dino"))
        assert summary["rows"]["cass"]["pretraining_seconds"] > 0 and summary["rows"]["dino"]["collapse"] is None
    started = json.loads((tmp_path / "digits" / "transfer" / "cass" / "args.json").read_text())
    assert started["cnn_weights"].endswith("test_resnet.pth") and started["pretrained"]
    text = report.read_text()
    assert study.command(study.parse_args(argv)) in text and f"**{study.label(best)}**" in text
    assert f"{pretrained['diff']:+.3f} [" in text
    for figure in ("study-10.png", "study-100.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"

    results = tmp_path / "digits" / "random" / "finetune" / "cass-vit-0.1" / "results.json"
    stamp, before = results.stat().st_mtime_ns, summaries[1]["rows"]
    (tmp_path / "digits" / "transfer" / "summary.json").unlink()
    study.main(study.parse_args(argv))  # the summary again, from the runs on disk: nothing retrained
    assert results.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "digits" / "transfer" / "summary.json").read_text())["rows"] == before
    with pytest.raises(UserError, match="pick another --out"):
        study.main(study.parse_args([*settings, "--seeds", "0"]))
    with pytest.raises(UserError, match="pick another --out"):
        study.main(study.parse_args([*argv, "--epochs", "2"]))


def test_a_stopped_pretraining_run_is_resumed_not_restarted(tmp_path):
    data = study_sets.image_set("digits", tmp_path / "data")
    args = study.parse_args(["--epochs", "1", "--workers", "0"])
    ckpts = study.pretrain("cass", data, tmp_path, None, args)
    for path in ckpts.values():  # as if stopped after its last save of last.pt
        path.unlink()
    lines = (tmp_path / "cass" / "log.jsonl").read_text()
    assert study.pretrain("cass", data, tmp_path, None, args) == ckpts
    assert all(path.exists() for path in ckpts.values())
    assert (tmp_path / "cass" / "log.jsonl").read_text() == lines  # no epoch trained again


def test_collapse_epochs_read_as_runs():
    assert study.epochs_text([2, 3, 4, 7, 9, 10]) == "2-4, 7, 9-10"
    assert study.epochs_text([]) == "none"
