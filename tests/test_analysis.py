"""predict.py, feature extraction and the kNN monitor, attention / feature maps, report.py."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from plumbing import checkpoint
from evaluation import knn
from evaluation.features import checkpoint_features, extract_features, knn_accuracy
from tools import maps
from tools import predict
import pretrain_cass
from evaluation import report
from conftest import TINY
from data import DataIndex, index_data
from errors import UserError
from plumbing.splits import select


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
    # cosine similarity: features of any length vote as their directions do. Raw dot products would make
    # the long [60, 0] query 0's nearest and score 0.5 here
    long = train * torch.tensor([[60.0], [1.0], [1.0]])
    assert knn_accuracy((long, labels), (query * 7, torch.tensor([1, 0])), num_classes=2, k=2, temperature=0.5) == 1.0


def test_extract_features_are_the_pre_logits_in_eval_mode_and_leave_the_mode_alone():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)  # BatchNorm: train and eval mode differ
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    loader = [(images[:3], torch.tensor([0, 1, 2])), (images[3:], torch.tensor([3, 0]))]
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    model.train()
    feats, targets = extract_features(model, loader, mean, std, torch.device("cpu"), None)
    assert model.training  # restored for the training loop that called it
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        by_hand = model.eval().forward_head(model.forward_features(x), pre_logits=True)
    assert feats.dtype == torch.float32 and feats.device.type == "cpu" and feats.shape == (5, model.num_features)
    torch.testing.assert_close(feats, by_hand, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(feats.norm(dim=1), torch.ones(5))  # raw features, not L2-normalised
    assert targets.tolist() == [0, 1, 2, 3, 0]


def knn_of(path: Path, k: int = 20) -> float:
    """knn_accuracy over a checkpoint's own train and val features, computed here."""
    ckpt = checkpoint.load(path, kind="model")
    index = index_data(ckpt["data"])
    train, val = (checkpoint_features(ckpt, index, select(index, ckpt["splits"])[name], torch.device("cpu"), 64, 0)
                  for name in ("train", "val"))
    return knn_accuracy(train, val, len(index.classes), k=k)


def test_knn_monitor_in_the_log_and_on_its_own(demo_data, tmp_path, cass_run):
    out = pretrain_cass.main(pretrain_cass.parse_args(["--data", str(demo_data), "--out", str(tmp_path / "r"),
                                                       "--epochs", "2", "--knn-every", "2", *TINY]))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "knn_cnn" not in log[0] and 0 <= log[1]["knn_cnn"] <= 1 and 0 <= log[1]["knn_vit"] <= 1
    acc = knn.main(knn.parse_args(["--ckpt", str(cass_run / "vit.pt"), "--workers", "0", "--k", "5"]))
    assert 0.25 < acc <= 1  # better than chance on the four learnable demo classes
    assert acc == knn_of(cass_run / "vit.pt", k=5)  # the script's number, with k as asked


def test_knn_works_on_fine_tuned_checkpoints_which_carry_their_split(finetuned, cass_run):
    ckpt = torch.load(finetuned[0], weights_only=True)
    pretrained = torch.load(cass_run / "cnn.pt", weights_only=True)
    assert ckpt["splits"] == {k: pretrained["splits"][k] for k in ("train", "val", "test")}  # kept the split
    assert knn.main(knn.parse_args(["--ckpt", str(finetuned[0]), "--workers", "0"])) == knn_of(finetuned[0])


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


class PooledLinear(torch.nn.Module):
    """A network whose 2-channel input is its last feature map: global average pooling, then `weight`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.mean((2, 3)) @ self.weight.T


def test_grad_cam_lights_up_where_the_predicted_class_has_its_evidence():
    x = torch.zeros(2, 2, 4, 4)
    x[0, 0, 1, 2] = 8.0  # image 0: class 0's evidence at (1, 2), class 1's weaker one at (3, 0)
    x[0, 1, 3, 0] = 3.0
    x[1, 1, 0, 3] = 5.0  # image 1: class 1's only, at (0, 3)
    cam = maps.grad_cam(PooledLinear(torch.eye(2)), x)
    # the predicted class's gradient weighs its own channel only: its map, scaled into [0, 1]
    assert torch.equal(cam[0], (x[0, 0] > 0).float()) and torch.equal(cam[1], (x[1, 1] > 0).float())


def test_first_conv_maps_are_the_first_convolutions_output_each_channel_scaled_into_0_1():
    model = timm.create_model("test_resnet", num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    conv = maps.first_conv_maps(model, x)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        raw = first(x)
    lo, hi = raw.amin((2, 3), keepdim=True), raw.amax((2, 3), keepdim=True)
    torch.testing.assert_close(conv, (raw - lo) / (hi - lo), rtol=1e-4, atol=1e-5)


def test_maps_script_writes_overlays_averages_and_a_comparison(finetuned, tmp_path):
    averages = maps.main(maps.parse_args(["--ckpt", str(finetuned[1]), str(finetuned[0]), "--n", "4",
                                          "--out", str(tmp_path), "--workers", "0"]))
    vit_name, cnn_name = list(averages)
    assert averages[vit_name].shape == (2, 2) and averages[vit_name].max() == pytest.approx(1)
    assert len(list((tmp_path / vit_name).rglob("*.png"))) == len(list((tmp_path / cnn_name).rglob("*.png"))) == 4
    size = {png: Image.open(tmp_path / png).size for png in (
        f"{vit_name}_mean.png", f"{cnn_name}_mean.png", f"{cnn_name}_first_conv.png", "compare.png",
        next((tmp_path / vit_name).rglob("*.png")).relative_to(tmp_path))}
    assert all(w >= 400 and h >= 300 for w, h in size.values()), size  # figures with titles and a colour bar
    assert size["compare.png"][0] > 1.5 * size[f"{vit_name}_mean.png"][0]  # two maps side by side
    drawn = (tmp_path / "images.txt").read_text().split()
    test = torch.load(finetuned[1], weights_only=True)["splits"]["test"]
    assert len(drawn) == 4 and set(drawn) <= set(test)  # test images only, listed next to the PNGs
    assert drawn != sorted(test)[:4]  # a random draw, not the first files of one class


def test_maps_of_a_headless_cnn_are_first_conv_maps_only_and_nothing_to_compare(cass_run, finetuned, tmp_path):
    backbone = torch.load(cass_run / "cnn.pt", weights_only=True)  # made headless, as DINO saves its backbones
    backbone["num_classes"] = 0
    del backbone["state_dict"]["fc.weight"], backbone["state_dict"]["fc.bias"]
    (tmp_path / "dino").mkdir()
    torch.save(backbone, tmp_path / "dino" / "cnn.pt")
    averages = maps.main(maps.parse_args(["--ckpt", str(tmp_path / "dino" / "cnn.pt"), str(finetuned[1]), "--n", "2",
                                          "--out", str(tmp_path / "maps"), "--workers", "0"]))
    assert list(averages) == ["1_finetune-vit-frac1_model_seed0"]  # no head, so no Grad-CAM to average
    assert (tmp_path / "maps" / "0_dino_cnn_first_conv.png").is_file()
    assert not (tmp_path / "maps" / "0_dino_cnn_mean.png").exists() and not (tmp_path / "maps" / "compare.png").exists()


def test_maps_draw_follows_the_class_distribution_and_the_seed():
    index = DataIndex(Path("."), Path("."), "class folders", [f"{i}.png" for i in range(100)],
                      np.array([0] * 60 + [1] * 30 + [2] * 10), ["a", "b", "c"])
    ids = list(range(100))
    drawn = maps.draw_images(index, ids, 30, seed=0)
    assert np.bincount(index.targets[drawn]).tolist() == [18, 9, 3] and len(set(drawn)) == 30
    assert drawn == maps.draw_images(index, ids, 30, seed=0) != maps.draw_images(index, ids, 30, seed=1)
    assert np.bincount(index.targets[maps.draw_images(index, ids, 7, seed=0)], minlength=3).tolist() == [4, 2, 1]


def test_report_tables_and_plots(cass_run, finetuned, tmp_path):
    path = report.main(report.parse_args([str(cass_run), "--out", str(tmp_path), "--resamples", "100"]))
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
    assert ci["estimate"] == pytest.approx(run["test"]["macro_f1"])
    assert ci["n_used"] + ci["n_dropped"] == 100  # --resamples 100 reaches the interval
    assert ci["low"] <= ci["estimate"] <= ci["high"]
    assert set(run["calibration"]) == {"temperature", "brier", "ece"}
    assert run["test"]["auroc_macro"] is None or 0 <= run["test"]["auroc_macro"] <= 1
