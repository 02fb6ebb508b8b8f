import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
import pretrain_cass
from conftest import TINY, class_folders, write_image
from errors import UserError
from losses import focal_loss
from plumbing.backbone import from_args
from plumbing.models import from_checkpoint, normalise
from plumbing.pixels import load_resized, to_chw


def ft(*argv):
    return finetune.main(finetune.parse_args([*argv, "--workers", "0", "--resamples", "100", "--epochs", "3"]))


@pytest.mark.parametrize("role", ["cnn", "vit"])
def test_pretrained_checkpoint_fine_tunes_on_the_pretraining_split(cass_run, tmp_path, role):
    out = tmp_path / "ft"
    results = ft("--ckpt", str(cass_run / f"{role}.pt"), "--out", str(out))
    pre_split = json.loads((cass_run / "splits.json").read_text())
    ft_split = json.loads((out / "splits.json").read_text())
    assert all(ft_split[k] == pre_split[k] for k in ("train", "val", "test"))
    run = results["runs"][0]
    assert results["method"] == "cass" and results["role"] == role and results["metric"] == "macro_f1"
    assert set(run["labelled_files"]) == set(pre_split["train"])  # --frac 1.0
    assert 0 <= run["test"]["macro_f1"] <= 1 and 1 <= run["best_epoch"] <= 3
    assert len(run["test"]["per_class_f1"]) == 4
    assert results["summary"]["macro_f1"] == {"mean": run["test"]["macro_f1"], "std": 0.0}
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"] == results["summary"]
    model_ckpt = torch.load(out / "model_seed0.pt", map_location="cpu", weights_only=True)
    assert model_ckpt["num_classes"] == 4 and model_ckpt["finetuned"] and model_ckpt["classes"] == on_disk["classes"]
    model = from_checkpoint(model_ckpt)  # rebuilds exactly, strict keys
    assert model.num_classes == 4


def test_backbone_weights_are_loaded_not_random(cass_run):
    ckpt = torch.load(cass_run / "cnn.pt", weights_only=True)
    source = from_args(finetune.parse_args(["--ckpt", str(cass_run / "cnn.pt")]))
    assert (source.arch, source.method, source.role) == ("test_resnet", "cass", "cnn")
    for key, value in source.model.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][key]), key


def test_label_fraction_and_seeds_give_mean_and_std(cass_run, tmp_path):
    results = ft("--ckpt", str(cass_run / "cnn.pt"), "--frac", "0.1", "--seeds", "0", "1", "--out", str(tmp_path))
    first, second = results["runs"]
    assert len(first["labelled_files"]) >= 4  # at least one image per class
    assert first["labelled_files"] != second["labelled_files"]
    scores = [first["test"]["macro_f1"], second["test"]["macro_f1"]]
    assert results["summary"]["macro_f1"]["mean"] == pytest.approx(sum(scores) / 2)
    assert results["summary"]["macro_f1"]["std"] == pytest.approx(abs(scores[0] - scores[1]) / 2 ** 0.5)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {r["seed"] for r in log} == {0, 1}


def test_supervised_baseline_from_arch_and_early_stopping(demo_data, tmp_path):
    results = finetune.main(finetune.parse_args(
        ["--arch", "test_resnet", "--no-pretrained", "--data", str(demo_data), "--img-size", "32",
         "--out", str(tmp_path), "--workers", "0", "--resamples", "100", "--epochs", "40", "--patience", "1",
         "--lr", "0.05", "--metric", "recall", "--focal", "softmax", "--class-weights", "inverse"]))
    run = results["runs"][0]
    assert results["method"] == "random-init" and results["metric"] == "balanced_accuracy"
    assert run["epochs_run"] < 40 and run["epochs_run"] == run["best_epoch"] + 1  # patience 1


def test_multilabel_csv_fine_tunes_with_sigmoid_focal_loss(tmp_path):
    rows = []
    for i in range(30):
        write_image(tmp_path / "img" / f"{i}.png", size=(20, 20), seed=i)
        rows.append(f"img/{i}.png,{int(i % 2 == 0)},{int(i % 3 == 0)},{int(i % 5 == 0)}")
    (tmp_path / "labels.csv").write_text("path,nuclei,fibres,vessels\n" + "\n".join(rows) + "\n")
    results = finetune.main(finetune.parse_args(
        ["--arch", "test_vit", "--no-pretrained", "--data", str(tmp_path / "labels.csv"), "--img-size", "32",
         "--out", str(tmp_path / "ft"), "--workers", "0", "--resamples", "100", "--epochs", "2"]))
    test = results["runs"][0]["test"]
    assert results["multilabel"] and results["classes"] == ["nuclei", "fibres", "vessels"]
    # the saved model's own predictions on the test split, scored by hand
    ckpt = torch.load(tmp_path / "ft" / "model_seed0.pt", map_location="cpu", weights_only=True)
    assert ckpt["thresholds"] == results["runs"][0]["thresholds"] == {"nuclei": 0.5, "fibres": 0.5, "vessels": 0.5}
    names = json.loads((tmp_path / "ft" / "splits.json").read_text())["test"]
    model = from_checkpoint(ckpt).eval()
    x = torch.stack([to_chw(load_resized(tmp_path / n, 32)) for n in names])
    with torch.no_grad():
        predicted = (model(normalise(x, ckpt["mean"], ckpt["std"])) > 0).numpy()
    truth = np.array([[int(n.split("/")[1].split(".")[0]) % k == 0 for k in (2, 3, 5)] for n in names])
    tp, fp, fn = ((truth & predicted).sum(0), (~truth & predicted).sum(0), (truth & ~predicted).sum(0))
    per_label = [2 * a / (2 * a + b + c) if 2 * a + b + c else 0.0 for a, b, c in zip(tp, fp, fn)]
    assert test["per_class_f1"] == pytest.approx(per_label)
    assert test["macro_f1"] == pytest.approx(np.mean(per_label))  # over all three labels
    both = (truth & predicted).sum(1)
    either = truth.sum(1) + predicted.sum(1)
    assert test["samples_f1"] == pytest.approx(np.mean([2 * b / e if e else 0.0 for b, e in zip(both, either)]))
    assert test["exact_match"] == pytest.approx((truth == predicted).all(1).mean())


def test_published_schedule_steps_the_cosine_every_batch(cass_run, tmp_path):
    def first_lr(*flags):
        finetune.main(finetune.parse_args(["--ckpt", str(cass_run / "cnn.pt"), "--workers", "0", "--resamples", "100",
                                           "--epochs", "2", "--patience", "2", "--out", str(tmp_path / flags[-1]),
                                           *flags]))
        return json.loads((tmp_path / flags[-1] / "log.jsonl").read_text().splitlines()[0])["lr"]

    steps = math.ceil(len(json.loads((cass_run / "splits.json").read_text())["train"]) / 16)
    assert first_lr("--schedule", "published") == \
        pytest.approx(1e-6 + (3e-4 - 1e-6) * (1 + math.cos(math.pi * steps / 16)) / 2)  # T_max 16, per batch
    assert first_lr("--schedule", "run") == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)  # T_max = --epochs, per epoch


def test_class_weights_come_from_the_train_split_and_are_recorded(tmp_path):
    class_folders(tmp_path / "d", {"a": 40, "b": 20, "c": 10})
    common = ["--arch", "test_resnet", "--no-pretrained", "--data", str(tmp_path / "d"), "--img-size", "32",
              "--workers", "0", "--epochs", "1", "--frac", "0.1", "--resamples", "100"]
    whole = finetune.main(finetune.parse_args([*common, "--out", str(tmp_path / "train")]))["runs"][0]
    # train split 28 / 14 / 7 images: min-max into [0.2, 1] (App. C.6.2), whatever the 10 % drawn
    assert whole["class_weights"] == pytest.approx([1.0, 0.2 + 0.8 * 7 / 21, 0.2])
    few = finetune.main(finetune.parse_args([*common, "--class-weights-from", "labelled",
                                             "--out", str(tmp_path / "labelled")]))["runs"][0]
    assert few["class_weights"] == pytest.approx([1.0, 0.2, 0.2])  # 3 / 1 / 1 labelled images


def test_every_random_init_seed_draws_its_own_network(demo_data, tmp_path):
    finetune.main(finetune.parse_args(
        ["--arch", "test_resnet", "--no-pretrained", "--data", str(demo_data), "--img-size", "32", "--workers", "0",
         "--resamples", "100", "--epochs", "1", "--lr", "1e-12", "--seeds", "0", "1", "--out", str(tmp_path)]))
    first, second = (torch.load(tmp_path / f"model_seed{s}.pt", weights_only=True)["state_dict"]["conv1.0.weight"]
                     for s in (0, 1))
    assert (first - second).abs().max() > 1e-3  # an lr of 1e-12 leaves each seed's own initial weights


def test_linear_probe_trains_only_a_head_on_frozen_features(cass_run, tmp_path):
    results = finetune.main(finetune.parse_args(["--ckpt", str(cass_run / "cnn.pt"), "--linear", "--epochs", "8",
                                                 "--workers", "0", "--resamples", "100"]))
    out = cass_run / "linear-cnn-frac1"
    assert results["protocol"] == "linear" and (out / "results.json").is_file()
    saved = torch.load(out / "model_seed0.pt", weights_only=True)
    backbone = torch.load(cass_run / "cnn.pt", weights_only=True)["state_dict"]
    head = {"fc.weight", "fc.bias"}
    assert set(saved["state_dict"]) - head == set(backbone) - head and saved["protocol"] == "linear"
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in backbone.items() if k not in head)  # frozen
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < log[0]["val_loss"]  # the head learned
    # the saved checkpoint is a whole classifier: on the test images it predicts what the probe was scored on
    model = from_checkpoint(saved).eval()
    names = saved["splits"]["test"]
    x = torch.stack([to_chw(load_resized(demo_root(cass_run) / n, 32)) for n in names])
    with torch.no_grad():
        predicted = model(normalise(x, saved["mean"], saved["std"])).argmax(1).numpy()
    truth = np.array([saved["classes"].index(n.split("/")[0]) for n in names])
    assert results["runs"][0]["test"]["accuracy"] == pytest.approx((predicted == truth).mean())


def demo_root(run):
    return Path(json.loads((run / "splits.json").read_text())["data"])


def test_the_intensity_setting_travels_from_pretraining_to_fine_tuning(tmp_path):
    for cls, level in (("dark", 500), ("bright", 3500)):
        for i in range(12):
            write_image(tmp_path / "d" / cls / f"{i}.png", "I;16", size=(24, 24), seed=level + i)
    out = pretrain_cass.main(pretrain_cass.parse_args(
        ["--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--epochs", "1", *TINY, "--bs", "4",
         "--intensity", "window", "0", "4000"]))
    ckpt = torch.load(out / "cnn.pt", weights_only=True)
    assert tuple(ckpt["intensity"]) == ("window", 0.0, 4000.0)
    assert any("window" in p.name for p in Path("runs/cache").glob("d-*"))  # a cache of its own
    results = finetune.main(finetune.parse_args(["--ckpt", str(out / "cnn.pt"), "--epochs", "1", "--workers", "0",
                                                 "--resamples", "100", "--out", str(tmp_path / "ft")]))
    assert results["runs"] and tuple(torch.load(tmp_path / "ft" / "model_seed0.pt",
                                                weights_only=True)["intensity"]) == ("window", 0.0, 4000.0)
    with pytest.raises(finetune.UserError, match="differs from the checkpoint's window 0.0 4000.0"):
        finetune.main(finetune.parse_args(["--ckpt", str(out / "cnn.pt"), "--intensity", "minmax"]))


def test_every_seed_writes_its_test_predictions(cass_run, tmp_path):
    results = finetune.main(finetune.parse_args(["--ckpt", str(cass_run / "vit.pt"), "--epochs", "1",
                                                 "--workers", "0", "--resamples", "100", "--seeds", "0", "1",
                                                 "--out", str(tmp_path)]))
    splits = json.loads((cass_run / "splits.json").read_text())
    for seed, run in zip((0, 1), results["runs"]):
        reader = csv.DictReader(open(tmp_path / f"predictions_seed{seed}.csv"))
        rows = list(reader)
        assert reader.fieldnames == ["path", "group", "true", *(f"p_{c}" for c in results["classes"])]
        assert [r["path"] for r in rows] == splits["test"] and all(r["true"] == r["path"].split("/")[0] for r in rows)
        assert {r["group"] for r in rows} == {""} and run["thresholds"] is None  # no groups; multi-class
        probs = np.array([[float(r[f"p_{c}"]) for c in results["classes"]] for r in rows])
        assert np.allclose(probs.sum(1), 1, atol=1e-5)
        truth = np.array([results["classes"].index(r["true"]) for r in rows])
        assert run["test"]["accuracy"] == pytest.approx((probs.argmax(1) == truth).mean())  # the file alone suffices


def test_a_non_finite_training_loss_stops_fine_tuning_before_it_reaches_the_weights(cass_run, tmp_path, monkeypatch):
    calls = [0]

    def nan_on_third_step(logits, targets, **kw):
        calls[0] += 1
        value = focal_loss(logits, targets, **kw)
        return value * float("nan") if calls[0] == 3 else value

    monkeypatch.setattr(finetune, "focal_loss", nan_on_third_step)
    with pytest.raises(UserError, match="non-finite at epoch 1, step 3"):  # fp32: no loss scaling to recover
        ft("--ckpt", str(cass_run / "cnn.pt"), "--out", str(tmp_path))
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "model_seed0.pt").exists()
