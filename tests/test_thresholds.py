"""Multi-label thresholds chosen on the validation split (finetune.py --thresholds val):
the search, the test metrics computed at them, the checkpoint and predict.py."""
import csv
import json

import numpy as np
import pytest
import torch

import finetune
from tools import predict
from conftest import write_image
from errors import UserError
from sklearn.metrics import f1_score

from evaluation.metrics import best_thresholds, decide, probabilities
from plumbing.models import from_checkpoint, normalise
from plumbing.pixels import load_resized, to_chw

CLASSES = ["even", "third", "rare"]


def f1(y: np.ndarray, called: np.ndarray) -> float:
    tp = (y & called).sum()
    return 2 * tp / (y.sum() + called.sum()) if y.sum() + called.sum() else 0.0


def test_the_chosen_thresholds_maximise_each_labels_f1():
    rng = np.random.default_rng(0)
    for _ in range(50):
        y = rng.random((int(rng.integers(2, 15)), 4)) < 0.4
        probs = np.round(rng.random(y.shape), 2) * 0.98 + 0.01  # ties, and no probability of exactly 0
        found = best_thresholds(y, probs)
        for k in range(4):
            if not y[:, k].any():
                assert found[k] == 0.5
                continue
            candidates = np.r_[np.linspace(0, 1, 1001), probs[:, k], np.nextafter(probs[:, k], 0)]
            assert f1(y[:, k], probs[:, k] > found[k]) == max(f1(y[:, k], probs[:, k] > t) for t in candidates)


def test_ties_go_to_the_threshold_nearest_half_and_half_is_logit_zero():
    # calling the top image or all four scores 2/3: the cut at (0.9 + 0.7) / 2 lies nearer 0.5 than 0.1 / 2
    y = np.array([[1], [0], [0], [1]])
    assert best_thresholds(y, np.array([[0.9], [0.7], [0.6], [0.1]])) == pytest.approx([0.8])
    assert best_thresholds(y, np.array([[0.99], [0.6], [0.55], [0.5]])) == pytest.approx([0.25])  # not 0.795
    probs = np.array([[0.2, 0.5, np.nextafter(0.5, 1), 0.9]]).T
    assert decide(probs, True, np.array([0.5]))[:, 0].tolist() == [False, False, True, True]
    assert decide(probs, True).tolist() == decide(probs, True, np.array([0.5])).tolist()  # 0.5 by default


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A multi-label fine-tuning with --thresholds val; `rare` has one positive, which stays in train."""
    root, rows = tmp_path_factory.mktemp("multilabel"), []
    for i in range(60):
        write_image(root / "img" / f"{i}.png", size=(20, 20), seed=i)
        rows.append(f"img/{i}.png,{int(i % 2 == 0)},{int(i % 3 == 0)},{int(i == 7)}")
    (root / "labels.csv").write_text("path," + ",".join(CLASSES) + "\n" + "\n".join(rows) + "\n")
    results = finetune.main(finetune.parse_args(
        ["--arch", "test_resnet", "--no-pretrained", "--data", str(root / "labels.csv"), "--img-size", "32",
         "--out", str(root / "ft"), "--workers", "0", "--resamples", "100", "--epochs", "2", "--thresholds", "val"]))
    return root, results


def truth_of(path: str) -> np.ndarray:
    i = int(path.split("/")[1].split(".")[0])
    return np.array([i % 2 == 0, i % 3 == 0, i == 7])


def test_thresholds_come_from_the_val_split_and_score_the_test_split(tuned):
    root, results = tuned
    run, out = results["runs"][0], root / "ft"
    thresholds = np.array([run["thresholds"][c] for c in CLASSES])
    ckpt = torch.load(out / "model_seed0.pt", map_location="cpu", weights_only=True)
    assert ckpt["thresholds"] == run["thresholds"] == json.loads((out / "results.json").read_text())["runs"][0][
        "thresholds"]
    # the best epoch's weights on the val images give back the thresholds (rare: no val positive, 0.5)
    val = ckpt["splits"]["val"]
    x = torch.stack([to_chw(load_resized(root / p, 32)) for p in val])
    with torch.no_grad():
        logits = from_checkpoint(ckpt).eval()(normalise(x, ckpt["mean"], ckpt["std"])).numpy()
    truth = np.array([truth_of(p) for p in val])
    assert not truth[:, 2].any() and thresholds[2] == 0.5 and (thresholds[:2] != 0.5).all()
    assert thresholds == pytest.approx(best_thresholds(truth, probabilities(logits, multilabel=True)), abs=1e-6)
    # the test metrics are those of the prediction file at the recorded thresholds, not at 0.5
    rows = list(csv.DictReader(open(out / "predictions_seed0.csv")))
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    truth = np.array([[c in r["true"].split(";") for c in CLASSES] for r in rows])
    assert (truth == np.array([truth_of(r["path"]) for r in rows])).all()
    called = probs > thresholds
    assert (called != (probs > 0.5)).any()  # the thresholds changed some decision
    assert run["test"]["per_class_f1"] == pytest.approx([f1(truth[:, k], called[:, k]) for k in range(3)])
    assert run["test"]["macro_f1"] == pytest.approx(f1_score(truth, called, average="macro", zero_division=0))
    assert run["test_ci95"]["macro_f1"]["estimate"] == pytest.approx(run["test"]["macro_f1"])


def test_predict_decides_at_the_checkpoints_thresholds_with_or_without_calibration(tuned, tmp_path):
    root, _ = tuned
    ckpt = torch.load(root / "ft" / "model_seed0.pt", map_location="cpu", weights_only=True)

    def predictions(saved: dict, *flags: str) -> tuple[list[set[str]], np.ndarray]:
        torch.save(saved, tmp_path / "model.pt")
        out = predict.main(predict.parse_args(["--ckpt", str(tmp_path / "model.pt"), "--images",
                                               str(root / "labels.csv"), "--out", str(tmp_path / "p.csv"),
                                               "--workers", "0", *flags]))
        rows = list(csv.DictReader(open(out)))
        return ([set(filter(None, r["prediction"].split(";"))) for r in rows],
                np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows]))

    def named(called: np.ndarray) -> list[set[str]]:
        return [{c for c, yes in zip(CLASSES, row) if yes} for row in called]

    _, raw = predictions(ckpt)
    thresholds = raw.mean(0)  # thresholds that split these images, far from 0.5 once calibrated
    ckpt = {**ckpt, "thresholds": dict(zip(CLASSES, thresholds.tolist())), "temperature": 3.0}
    plain, _ = predictions(ckpt)
    assert plain == named(raw > thresholds) != named(raw > 0.5)
    calibrated, scaled = predictions(ckpt, "--calibrated")
    assert calibrated == plain and named(scaled > thresholds) != plain  # the same decisions, other probabilities
    del ckpt["thresholds"]  # a checkpoint without thresholds: 0.5
    assert predictions(ckpt)[0] == named(raw > 0.5)


def test_val_thresholds_on_multi_class_data_are_one_clear_error(demo_data, tmp_path):
    with pytest.raises(UserError, match="--thresholds val needs multi-label data"):
        finetune.main(finetune.parse_args(["--arch", "test_resnet", "--no-pretrained", "--data", str(demo_data),
                                           "--out", str(tmp_path), "--thresholds", "val", "--workers", "0"]))
    assert not (tmp_path / "results.json").exists()


def test_a_calibrated_ensemble_predicts_the_class_it_writes_most_probable(tmp_path, monkeypatch):
    """Two models whose temperatures reorder the ensemble: [2, 0] at T = 4 and [0, 1.5] at T = 0.5."""
    for i in range(2):
        write_image(tmp_path / "img" / f"{i}.png", size=(20, 20), seed=i)
    ckpts = [{"classes": ["a", "b"], "multilabel": False, "temperature": t} for t in (4.0, 0.5)]
    logits = iter([np.array([[2.0, 0.0]] * 2), np.array([[0.0, 1.5]] * 2)] * 2)
    monkeypatch.setattr(predict, "load_models", lambda paths: ckpts)
    monkeypatch.setattr(predict, "logits_of", lambda *a: next(logits))
    for flags, expected in (([], "a"), (["--calibrated"], "b")):  # means [0.53, 0.47] and [0.33, 0.67]
        out = predict.main(predict.parse_args(["--ckpt", "x.pt", "--images", str(tmp_path / "img"), "--out",
                                               str(tmp_path / "p.csv"), "--workers", "0", *flags]))
        rows = list(csv.DictReader(open(out)))
        probs = np.array([[float(r["p_a"]), float(r["p_b"])] for r in rows])
        assert [r["prediction"] for r in rows] == [["a", "b"][k] for k in probs.argmax(1)] == [expected] * 2
