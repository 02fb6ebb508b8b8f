"""report.py over several experiments on one data set: every run is named by
what tells it apart, recorded settings are compared as resolved, and the
paired differences compare each pretrained row with the no-pretraining row of
its backbone and protocol."""
import csv
import json
import re
from pathlib import Path

import numpy as np

from evaluation import records, report

TARGETS = np.random.default_rng(1).integers(0, 2, 120)


def finetuned(folder: Path, method: str, arch: str, accuracy: float, source: str, **config) -> None:
    """results.json, splits.json and predictions_seed0.csv of one seed, as finetune.py writes them."""
    rng = np.random.default_rng(int(accuracy * 100))
    right = rng.random(len(TARGETS)) < accuracy
    probs = np.where(right, TARGETS, 1 - TARGETS)[:, None] == np.arange(2)
    probs = np.clip(probs * 0.8 + 0.1, 0, 1)
    paths = [f"img{i:03d}.png" for i in range(len(TARGETS))]
    folder.mkdir(parents=True)
    with open(folder / "predictions_seed0.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "group", "true", "p_a", "p_b"],
                                 *([p, "", "ab"[t], *map(str, row)] for p, t, row in zip(paths, TARGETS, probs))])
    score = float(np.mean(right))
    result = {"method": method, "arch": arch, "protocol": "finetune", "frac": 1.0, "metric": "macro_f1",
              "classes": ["a", "b"], "multilabel": False, "source": source,
              "config": {"epochs": 50, "lr": None, "img_size": None, "bs": 16, **config},
              "runs": [{"seed": 0, "test": {"macro_f1": score}}]}
    (folder / "results.json").write_text(json.dumps(result))
    (folder / "splits.json").write_text(json.dumps({"data": "/data/set"}))


def pretrained(folder: Path, loss: float) -> None:
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"cnn": "resnet50", "vit": "vit_base_patch16_384"}))
    (folder / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": loss / e, "seconds": 1.0,
                                                          "images_per_s": 10.0}) + "\n" for e in (1, 2)))


def test_pretraining_runs_in_equally_named_folders_are_told_apart(tmp_path):
    for k, experiment in enumerate(("exp1", "exp2", "exp3")):
        pretrained(tmp_path / "runs" / experiment / "cass", loss=k + 1.0)
    text = report.main(report.parse_args([str(tmp_path / "runs"), "--out", str(tmp_path / "report")])).read_text()
    assert [line.split(" | ")[0] for line in text.splitlines() if "| CASS |" in line] == \
        ["| exp1/cass", "| exp2/cass", "| exp3/cass"]
    figures = sorted(re.findall(r"!\[[^]]+\]\(([^)]+)\)", text))
    assert figures == ["exp1-cass_epochs.png", "exp2-cass_epochs.png", "exp3-cass_epochs.png"]
    assert all((tmp_path / "report" / name).is_file() for name in figures)


def test_a_setting_recorded_unset_compares_as_the_value_it_resolved_to(tmp_path):
    finetuned(tmp_path / "runs/cass", "cass", "resnet50", 0.8, "runs/pre/cnn.pt")
    result = json.loads((tmp_path / "runs/cass/results.json").read_text())
    (tmp_path / "runs/cass/results.json").write_text(json.dumps({**result, "resolved": {"img_size": 32,
                                                                                          "lr": 3e-4}}))
    # the supervised run set both flags; the CASS run took them from its checkpoint and the default
    finetuned(tmp_path / "runs/sup", "supervised", "resnet50", 0.7, "resnet50", img_size=32, lr=3e-4)
    found = report.tables(records.load_results([tmp_path / "runs"]))
    rows = [line for line in report.finetune_table(found, resamples=50) if line.startswith(("| cass", "| supervised"))]
    assert len(rows) == 2 and "img_size" not in "".join(rows) and "lr=" not in "".join(rows)
    finetuned(tmp_path / "runs/sup64", "supervised", "resnet50", 0.7, "resnet50", img_size=64, lr=3e-4)
    found = report.tables(records.load_results([tmp_path / "runs"]))
    rows = [line for line in report.finetune_table(found, resamples=50) if line.startswith(("| cass", "| supervised"))]
    assert sum("img_size=32" in line for line in rows) == 2 and sum("img_size=64" in line for line in rows) == 1


def test_pairs_are_pretrained_rows_against_the_baseline_of_their_backbone(tmp_path):
    finetuned(tmp_path / "runs/cass-cnn", "cass", "resnet50", 0.70, "runs/pre/cnn.pt")
    finetuned(tmp_path / "runs/dino-cnn", "dino", "resnet50", 0.75, "runs/dino/cnn.pt")
    finetuned(tmp_path / "runs/sup-cnn", "supervised", "resnet50", 0.90, "resnet50")
    finetuned(tmp_path / "runs/cass-vit", "cass", "vit_base_patch16_384", 0.92, "runs/pre/vit.pt")
    finetuned(tmp_path / "runs/sup-vit", "supervised", "vit_base_patch16_384", 0.70, "vit_base_patch16_384")
    lines = report.finetune_table(report.tables(records.load_results([tmp_path / "runs"])), resamples=50)
    pairs = [tuple(cell.split(",")[0] for cell in line.split(" | ")[1:3]) for line in lines
             if re.match(r"^\| \d+% \|", line)]
    # 5 rows would give 10 pairs; within a backbone: CNN 3 pairs, ViT 1; the baseline pairs first, pretrained as A
    assert pairs == [("cass (resnet50)", "supervised (resnet50)"), ("dino (resnet50)", "supervised (resnet50)"),
                     ("dino (resnet50)", "cass (resnet50)"),
                     ("cass (vit_base_patch16_384)", "supervised (vit_base_patch16_384)")]
    differences = [float(line.split(" | ")[3]) for line in lines if re.match(r"^\| \d+% \|", line)]
    assert differences[0] < 0 < differences[3]  # CASS below its baseline is shown as a negative difference
