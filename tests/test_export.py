"""export.py: timm alone rebuilds any checkpoint from the exported folder (and
from our .pt through checkpoint_path=), with the same outputs; embed.py: one
row of features per image, aligned with its CSV, equal to a hand-run forward."""
import csv
import json

import numpy as np
import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config

from plumbing import checkpoint
from tools import embed
from tools import export
from conftest import write_image
from data import index_data
from errors import UserError
from plumbing.models import from_checkpoint, normalise
from plumbing.pixels import load_image, load_resized, to_chw


@pytest.fixture
def fine_tuned(finetuned):
    return finetuned[0]  # the fine-tuned CNN


def same_outputs(a: torch.nn.Module, b: torch.nn.Module, size: int) -> bool:
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def exported(path, tmp_path) -> tuple[dict, torch.nn.Module]:
    export.main(export.parse_args(["--ckpt", str(path), "--out", str(tmp_path / "hf")]))
    # "local-dir:" reads the exported folder: pretrained=True here needs no network
    return checkpoint.load(path, kind="model"), timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True)


@pytest.mark.parametrize("name", ["cnn.pt", "vit.pt"])
def test_timm_rebuilds_a_pretrained_backbone_from_the_export(cass_run, tmp_path, name):
    ckpt, model = exported(cass_run / name, tmp_path)
    cfg = model.pretrained_cfg
    assert (cfg["architecture"], model.num_classes) == (ckpt["arch"], ckpt["num_classes"])
    assert tuple(cfg["input_size"]) == (3, ckpt["img_size"], ckpt["img_size"])
    assert (list(cfg["mean"]), list(cfg["std"])) == (ckpt["mean"], ckpt["std"])
    assert "label_names" not in cfg  # a backbone's outputs are not classes
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert same_outputs(model, from_checkpoint(ckpt), ckpt["img_size"])


def test_vit_export_records_its_image_size_for_the_position_embeddings(cass_run, tmp_path):
    ckpt, model = exported(cass_run / "vit.pt", tmp_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_args"]["img_size"] == [32, 32]
    assert model.pos_embed.shape == from_checkpoint(ckpt).pos_embed.shape  # at timm's default 160 px it would differ


def test_fine_tuned_export_names_its_classes(fine_tuned, tmp_path):
    ckpt, model = exported(fine_tuned, tmp_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert model.num_classes == len(ckpt["classes"]) == 4
    assert model.pretrained_cfg["label_names"] == ckpt["classes"]
    assert config["cass"] == {"method": "cass", "role": "cnn", "finetuned": True, "multilabel": False,
                              "epoch": ckpt["epoch"]}
    assert config["pretrained_cfg"]["tag"] == "cass" and "license" not in model.pretrained_cfg
    assert same_outputs(model, from_checkpoint(ckpt), ckpt["img_size"])


def test_timm_preprocessing_of_the_export_gives_our_inputs(fine_tuned, tmp_path):
    """The exported data config (squash, no crop, bilinear, mean/std) makes
    timm's own eval transform feed the model what our loaders feed it, also
    for an image that is not square (where a centre crop would differ)."""
    ckpt, model = exported(fine_tuned, tmp_path)
    image = write_image(tmp_path / "wide.jpg", size=(57, 31))
    ours = normalise(to_chw(load_resized(image, ckpt["img_size"]))[None], ckpt["mean"], ckpt["std"])[0]
    theirs = create_transform(**resolve_data_config(model=model))(load_image(image))
    assert theirs.shape == ours.shape
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_timm_loads_our_pt_through_checkpoint_path(cass_run, fine_tuned):
    """The README one-liners: timm's load_checkpoint reads our dict's
    'state_dict' (weights_only, strict); ViTs need the checkpoint's img_size."""
    cnn = timm.create_model("test_resnet", num_classes=4, checkpoint_path=str(fine_tuned))
    assert same_outputs(cnn, from_checkpoint(checkpoint.load(fine_tuned, kind="model")), 32)
    vit_ckpt = checkpoint.load(cass_run / "vit.pt", kind="model")
    vit = timm.create_model("test_vit", img_size=32, num_classes=vit_ckpt["num_classes"],
                            checkpoint_path=str(cass_run / "vit.pt"))
    assert same_outputs(vit, from_checkpoint(vit_ckpt), 32)


def test_export_refuses_a_resume_checkpoint(cass_run, tmp_path):
    with pytest.raises(UserError, match="expected a 'model' one"):
        export.main(export.parse_args(["--ckpt", str(cass_run / "last.pt"), "--out", str(tmp_path / "hf")]))


def read_rows(out) -> list[dict]:
    with open(out / "embeddings.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_embeddings_are_pre_logit_features_row_aligned_with_the_csv(cass_run, demo_data, tmp_path):
    embed.main(embed.parse_args(["--ckpt", str(cass_run / "vit.pt"), "--images", str(demo_data),
                                 "--out", str(tmp_path), "--workers", "0", "--bs", "7"]))
    feats, rows = np.load(tmp_path / "embeddings.npy"), read_rows(tmp_path)
    ckpt = checkpoint.load(cass_run / "vit.pt", kind="model")
    model = from_checkpoint(ckpt).eval()
    assert feats.dtype == np.float32 and feats.shape == (60, model.num_features)
    assert [r["path"] for r in rows] == index_data(demo_data).paths
    assert all(r["label"] == r["path"].split("/")[0] for r in rows)  # class folders
    assert not np.allclose(np.linalg.norm(feats, axis=1), 1)
    k = 37  # in the sixth batch of 7, not the first
    x = normalise(to_chw(load_resized(demo_data / rows[k]["path"], ckpt["img_size"]))[None], ckpt["mean"], ckpt["std"])
    with torch.no_grad():
        by_hand = model.forward_head(model.forward_features(x), pre_logits=True)[0].numpy()
    np.testing.assert_allclose(feats[k], by_hand, rtol=1e-4, atol=1e-5)


def test_normalize_gives_unit_embeddings_in_the_same_directions(cass_run, demo_data, tmp_path):
    for flags, out in (([], tmp_path / "raw"), (["--normalize"], tmp_path / "unit")):
        embed.main(embed.parse_args(["--ckpt", str(cass_run / "vit.pt"), "--images", str(demo_data),
                                     "--out", str(out), "--workers", "0", *flags]))
    raw, unit = np.load(tmp_path / "raw" / "embeddings.npy"), np.load(tmp_path / "unit" / "embeddings.npy")
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_multilabel_csv_labels_are_joined_and_unreadable_files_have_no_row(cass_run, tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / "data" / name, seed=len(name))
    (tmp_path / "data" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "data" / "labels.csv").write_text("path,cat,dog\na.png,1,1\nb.png,0,1\nbroken.png,1,0\nc.png,1,0\n")
    embed.main(embed.parse_args(["--ckpt", str(cass_run / "cnn.pt"), "--images", str(tmp_path / "data"),
                                 "--out", str(tmp_path / "out"), "--workers", "0"]))
    rows = read_rows(tmp_path / "out")
    assert [(r["path"], r["label"]) for r in rows] == [("a.png", "cat;dog"), ("b.png", "dog"), ("c.png", "cat")]
    assert np.load(tmp_path / "out" / "embeddings.npy").shape[0] == 3
