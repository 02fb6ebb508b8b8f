"""predict.py, kNN monitor, attention / feature maps, report.py."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import finetune
import knn
from models import knn_accuracy
import maps
import predict
import pretrain_cass
import report
from conftest import TINY
from data import DataIndex
from errors import UserError


@pytest.fixture(scope="module")
def finetuned(cass_run):
    """Fine-tuned CNN and ViT of the shared CASS run."""
    for role in ("cnn", "vit"):
        finetune.main(finetune.parse_args(["--ckpt", str(cass_run / f"{role}.pt"), "--epochs", "1", "--workers", "0"]))
    return [cass_run / f"finetune-{role}-frac1" / "model_seed0.pt" for role in ("cnn", "vit")]


def test_knn_votes_by_hand():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    query = torch.nn.functional.normalize(torch.tensor([[0.2, 1.0], [1.0, 0.05]]), dim=1)
    # query 0: its 2 nearest are [0, 1] (cos 0.98, class 1) and [0.9, 0.1] (cos 0.30, class 0); the
    # votes e^(0.98 / 0.5) = 7.1 against e^(0.30 / 0.5) = 1.8 say class 1. Query 1 sits by the class-0 images
    assert knn_accuracy((train, labels), (query, torch.tensor([1, 0])), num_classes=2, k=2, temperature=0.5) == 1.0
    assert knn_accuracy((train, labels), (query, torch.tensor([0, 0])), num_classes=2, k=2, temperature=0.5) == 0.5
    # k = 3 at T = 100: every vote weighs about 1, and class 0 has two of the three
    assert knn_accuracy((train, labels), (query, torch.tensor([0, 0])), num_classes=2, k=3, temperature=100) == 1.0


def test_knn_monitor_in_the_log_and_on_its_own(demo_data, tmp_path, cass_run):
    out = pretrain_cass.main(pretrain_cass.parse_args(["--data", str(demo_data), "--out", str(tmp_path / "r"),
                                                       "--epochs", "2", "--knn-every", "2", *TINY]))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "knn_cnn" not in log[0] and 0 <= log[1]["knn_cnn"] <= 1 and 0 <= log[1]["knn_vit"] <= 1
    acc = knn.main(knn.parse_args(["--ckpt", str(cass_run / "vit.pt"), "--workers", "0"]))
    assert 0.25 < acc <= 1  # better than chance on the four learnable demo classes


def test_knn_works_on_fine_tuned_checkpoints_which_carry_their_split(finetuned, cass_run):
    ckpt = torch.load(finetuned[0], weights_only=True)
    pretrained = torch.load(cass_run / "cnn.pt", weights_only=True)
    assert ckpt["splits"] == {k: pretrained["splits"][k] for k in ("train", "val", "test")}  # kept the split
    assert 0 <= knn.main(knn.parse_args(["--ckpt", str(finetuned[0]), "--workers", "0"])) <= 1


def test_predict_writes_probabilities_and_ensembles_by_averaging(finetuned, demo_data, tmp_path):
    folder = tmp_path / "new"
    for i, src in enumerate(sorted((demo_data / "rings").iterdir())[:5]):
        (folder / f"case {i}.png").parent.mkdir(exist_ok=True)
        (folder / f"case {i}.png").write_bytes(src.read_bytes())
    (folder / "broken.png").write_bytes(b"")
    rows = {}
    for name, ckpts in (("cnn", finetuned[:1]), ("vit", finetuned[1:]), ("both", finetuned)):
        out = predict.main(predict.parse_args(["--ckpt", *map(str, ckpts), "--images", str(folder),
                                               "--out", str(tmp_path / f"{name}.csv"), "--workers", "0"]))
        with open(out) as f:
            rows[name] = list(csv.DictReader(f))
    good = [r for r in rows["both"] if not r["prediction"].startswith("skipped")]
    assert len(good) == 5 and rows["both"][-1]["path"] == "broken.png"
    classes = ["blobs", "checks", "rings", "stripes"]
    for i, row in enumerate(good):
        probs = np.array([float(row[f"p_{c}"]) for c in classes])
        assert probs.sum() == pytest.approx(1, abs=1e-5) and row["prediction"] == classes[probs.argmax()]
        single = [np.array([float(rows[n][i][f"p_{c}"]) for c in classes]) for n in ("cnn", "vit")]
        assert np.allclose(probs, (single[0] + single[1]) / 2, atol=2e-6)


def test_predict_refuses_backbones_and_mismatched_classes(cass_run, finetuned, tmp_path):
    with pytest.raises(UserError, match="without a classifier"):
        predict.load_models([str(cass_run / "cnn.pt")])
    other = torch.load(finetuned[1], weights_only=True)
    other["classes"] = ["a", "b", "c", "d"]
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(UserError, match="other classes"):
        predict.load_models([str(finetuned[0]), str(tmp_path / "other.pt")])


def test_attention_maps_shape_range_and_dependence_on_the_weights():
    x = torch.randn(3, 3, 64, 64)
    torch.manual_seed(0)
    a = timm.create_model("test_vit", img_size=64).eval()
    torch.manual_seed(1)
    b = timm.create_model("test_vit", img_size=64).eval()
    last, rolled = maps.vit_attention(a, x), maps.vit_attention(a, x, rollout=True)
    assert last.shape == rolled.shape == (3, 4, 4)
    for m in (last, rolled):
        assert torch.allclose(m.flatten(1).min(1).values, torch.zeros(3))
        assert torch.allclose(m.flatten(1).max(1).values, torch.ones(3))
    assert not torch.allclose(last, rolled)
    assert not torch.allclose(last, maps.vit_attention(b, x))
    with pytest.raises(UserError, match="class token"):
        maps.vit_attention(timm.create_model("test_resnet"), x)


def test_grad_cam_and_first_conv_maps():
    model = timm.create_model("test_resnet", num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    cam = maps.grad_cam(model, x)
    assert cam.shape == (2, 2, 2) and cam.min() >= 0 and cam.max() <= 1
    conv = maps.first_conv_maps(model, x)
    assert conv.shape[:2] == (2, model.conv1[0].out_channels if isinstance(model.conv1, torch.nn.Sequential)
                              else model.conv1.out_channels)
    assert conv.min() >= 0 and conv.max() <= 1


def test_maps_script_writes_overlays_averages_and_a_comparison(finetuned, tmp_path):
    averages = maps.main(maps.parse_args(["--ckpt", str(finetuned[1]), str(finetuned[0]), "--n", "4",
                                          "--out", str(tmp_path), "--workers", "0"]))
    vit_name, cnn_name = list(averages)
    assert averages[vit_name].shape == (2, 2) and averages[vit_name].max() == pytest.approx(1)
    assert len(list((tmp_path / vit_name).glob("*.png"))) == 4
    for png in (f"{vit_name}_mean.png", f"{cnn_name}_mean.png", f"{cnn_name}_first_conv.png", "compare.png"):
        assert (tmp_path / png).stat().st_size > 0, png
    drawn = (tmp_path / "images.txt").read_text().split()
    test = torch.load(finetuned[1], weights_only=True)["splits"]["test"]
    assert len(drawn) == 4 and set(drawn) <= set(test)  # test images only, listed next to the PNGs
    assert drawn != sorted(test)[:4]  # a random draw, not the first files of one class


def test_maps_draw_follows_the_class_distribution_and_the_seed():
    index = DataIndex(Path("."), Path("."), "class folders", [f"{i}.png" for i in range(100)],
                      np.array([0] * 60 + [1] * 30 + [2] * 10), ["a", "b", "c"])
    ids = list(range(100))
    drawn = maps.draw_images(index, ids, 30, seed=0)
    assert np.bincount(index.targets[drawn]).tolist() == [18, 9, 3] and len(set(drawn)) == 30
    assert drawn == maps.draw_images(index, ids, 30, seed=0) != maps.draw_images(index, ids, 30, seed=1)
    assert np.bincount(index.targets[maps.draw_images(index, ids, 7, seed=0)], minlength=3).tolist() == [4, 2, 1]


def test_report_tables_and_plots(cass_run, finetuned, tmp_path):
    path = report.main(report.parse_args([str(cass_run), "--out", str(tmp_path)]))
    text = path.read_text()
    assert "| cass (test_resnet) |" in text and "| cass (test_vit) |" in text and "100% labels" in text
    assert "| CASS | test_resnet + test_vit | 2 |" in text
    assert (tmp_path / "cass_epochs.png").stat().st_size > 0
    assert "![cass_epochs](cass_epochs.png)" in text
    with pytest.raises(UserError, match="not a folder"):
        report.main(report.parse_args([str(tmp_path / "none")]))


def test_calibrated_predictions_divide_the_logits_by_the_fitted_temperature(finetuned, demo_data, tmp_path):
    rows = {}
    for flag in ([], ["--calibrated"]):
        out = predict.main(predict.parse_args(["--ckpt", str(finetuned[0]), "--images", str(demo_data / "rings"),
                                               "--out", str(tmp_path / f"p{len(flag)}.csv"), "--workers", "0", *flag]))
        rows[bool(flag)] = [r for r in csv.DictReader(open(out))]
    temperature = torch.load(finetuned[0], weights_only=True)["temperature"]
    classes = ["blobs", "checks", "rings", "stripes"]
    raw = np.log(np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows[False]]))  # logits up to a shift
    scaled = np.exp(raw / temperature)
    expected = scaled / scaled.sum(1, keepdims=True)
    got = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows[True]])
    assert np.allclose(got, expected, atol=1e-4) and temperature > 0
    assert [r["prediction"] for r in rows[True]] == [r["prediction"] for r in rows[False]]


def test_results_carry_intervals_and_calibration(finetuned):
    results = json.loads((finetuned[0].parent / "results.json").read_text())
    run = results["runs"][0]
    ci = run["test_ci95"]["macro_f1"]
    assert ci["estimate"] == pytest.approx(run["test"]["macro_f1"]) and ci["n_used"] == 1000
    assert ci["low"] <= ci["estimate"] <= ci["high"]
    assert set(run["calibration"]) == {"temperature", "brier", "ece"}
    assert run["test"]["auroc_macro"] is None or 0 <= run["test"]["auroc_macro"] <= 1
