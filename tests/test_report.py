"""report.py's fine-tuning tables: what pools into one cell and what never does.
The results.json / splits.json files are written by hand in finetune.py's format."""
import json
from pathlib import Path

import pytest

import report

# vars(args) of finetune.py with its defaults, as results.json stores them
CONFIG = {"data": None, "out": None, "epochs": 50, "bs": 16, "img_size": None, "aug": "paper", "seed": 0,
          "workers": 4, "device": "auto", "amp": "auto", "cache": "on", "cache_dir": "runs/cache",
          "compile": False, "grad_ckpt": False, "ckpt": "runs/cass/cnn.pt", "arch": None, "pretrained": True,
          "weights": None, "frac": 1.0, "seeds": [0], "split_seed": 0, "lr": 3e-4, "patience": 5,
          "focal": "sigmoid", "class_weights": "minmax", "alpha": 1.0, "gamma": 2.0, "metric": "f1",
          "norm": "model"}


def write_run(folder: Path, data_set: str, scores: list[float], *, seeds: list[int] | None = None,
              ckpt: str = "runs/cass/cnn.pt", frac: float = 1.0, metric: str = "f1", **flags) -> Path:
    """A fine-tuning output folder as finetune.py leaves it: results.json (one run
    per seed, headline scores given) and splits.json naming the data set."""
    folder.mkdir(parents=True)
    seeds = seeds or list(range(len(scores)))
    headline = {"f1": "macro_f1", "recall": "balanced_accuracy"}[metric]
    config = {**CONFIG, "ckpt": ckpt, "frac": frac, "seeds": seeds, "metric": metric, "out": str(folder), **flags}
    runs = [{"seed": s, "best_epoch": 3, "epochs_run": 8, "val_loss": 0.1, "test_loss": 0.1,
             "test": {"macro_f1": v, "balanced_accuracy": v, "accuracy": v}, "seconds": 1.0,
             "labelled_files": ["a/1.png"]} for s, v in zip(seeds, scores)]
    results = {"method": "cass", "arch": "resnet50", "role": "cnn", "frac": frac, "metric": headline,
               "classes": ["a", "b"], "multilabel": False, "summary": {}, "runs": runs, "config": config,
               "source": ckpt}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "splits.json").write_text(json.dumps({"data": data_set, "classes": ["a", "b"], "skipped": [],
                                                    "train": [], "val": [], "test": []}))
    return folder


def table_rows(text: str) -> list[str]:
    """The result rows of every fine-tuning table (not headers or separators)."""
    return [line for line in text.splitlines() if line.startswith("| cass")]


def make_report(tmp_path: Path, *folders: Path) -> str:
    return report.main(report.parse_args([*map(str, folders), "--out", str(tmp_path / "report")])).read_text()


def test_two_data_sets_give_two_tables_and_never_a_pooled_cell(tmp_path):
    # the same checkpoint and flags; only splits.json tells the data sets apart
    write_run(tmp_path / "runs/a", "/data/dermofit", [0.80, 0.81, 0.82])
    write_run(tmp_path / "runs/b", "/data/isic", [0.40, 0.41, 0.42])
    text = make_report(tmp_path, tmp_path / "runs")
    assert "### /data/dermofit" in text and "### /data/isic" in text
    assert table_rows(text) == ["| cass (resnet50) | finetune | runs/cass | 0.8100 +- 0.0100 (n=3) |",
                                "| cass (resnet50) | finetune | runs/cass | 0.4100 +- 0.0100 (n=3) |"]
    assert "0.6100" not in text and "n=6" not in text


@pytest.mark.parametrize("flag, values", [("bs", (16, 32)), ("epochs", (50, 10)), ("aug", ("paper", "table9")),
                                          ("focal", ("sigmoid", "softmax")), ("split_seed", (0, 1))])
def test_runs_differing_in_one_setting_are_two_rows_that_name_it(tmp_path, flag, values):
    for value, scores in zip(values, ([0.8, 0.9], [0.5, 0.6])):
        write_run(tmp_path / f"runs/{value}", "/data/dermofit", scores, **{flag: value})
    rows = table_rows(make_report(tmp_path, tmp_path / "runs"))
    assert len(rows) == 2
    for value, cell in zip(values, ("0.8500", "0.5500")):
        assert [row for row in rows if f"| {flag}={value} |" in row and cell in row], rows


def test_two_pretraining_runs_are_two_rows(tmp_path):
    write_run(tmp_path / "runs/x", "/data/dermofit", [0.8, 0.9], ckpt="runs/cass-arms-a/cnn.pt")
    write_run(tmp_path / "runs/y", "/data/dermofit", [0.5, 0.6], ckpt="runs/cass-arms-b/cnn.pt")
    rows = table_rows(make_report(tmp_path, tmp_path / "runs"))
    assert rows == ["| cass (resnet50) | finetune | runs/cass-arms-a | 0.8500 +- 0.0707 (n=2) |",
                    "| cass (resnet50) | finetune | runs/cass-arms-b | 0.5500 +- 0.0707 (n=2) |"]


def test_headline_metrics_get_their_own_tables(tmp_path):
    write_run(tmp_path / "runs/f1", "/data/isic", [0.7], metric="f1")
    write_run(tmp_path / "runs/recall", "/data/isic", [0.6], metric="recall")
    text = make_report(tmp_path, tmp_path / "runs")
    assert "Test macro_f1," in text and "Test balanced_accuracy," in text and len(table_rows(text)) == 2


def test_seeds_of_one_experiment_pool_across_results_files(tmp_path):
    # seeds 0-2 and 3-4 of one experiment, run with other bookkeeping flags and label fractions beside them
    scores = [0.80, 0.82, 0.84, 0.86, 0.88]
    write_run(tmp_path / "runs/first", "/data/dermofit", scores[:3], seeds=[0, 1, 2], workers=4, device="cuda")
    write_run(tmp_path / "runs/second", "/data/dermofit", scores[3:], seeds=[3, 4], workers=0, device="auto",
              cache="off", compile=True)
    write_run(tmp_path / "runs/tenth", "/data/dermofit", [0.5], frac=0.1)
    # the runs folder twice (also nested): a results.json still counts once
    text = make_report(tmp_path, tmp_path / "runs", tmp_path / "runs/first")
    assert table_rows(text) == ["| cass (resnet50) | finetune | runs/cass | 0.5000 +- 0.0000 (n=1) | 0.8400 +- 0.0316 (n=5) |"]
    assert "10% labels | 100% labels |" in text


def test_data_set_falls_back_to_the_config_without_splits_json(tmp_path):
    folder = write_run(tmp_path / "runs/a", "/data/dermofit", [0.8], data="/data/other")
    (folder / "splits.json").unlink()
    assert "### /data/other" in make_report(tmp_path, tmp_path / "runs")


def test_linear_probe_and_fine_tuning_are_rows_side_by_side(tmp_path):
    for protocol, scores in (("finetune", [0.8, 0.82]), ("linear", [0.6, 0.62])):
        folder = tmp_path / "runs" / f"{protocol}-cnn-frac1"
        folder.mkdir(parents=True)
        result = {"method": "cass", "arch": "resnet50", "role": "cnn", "protocol": protocol, "frac": 1.0,
                  "metric": "macro_f1", "source": "runs/cass/cnn.pt", "config": {"linear": protocol == "linear"},
                  "runs": [{"test": {"macro_f1": s}} for s in scores]}
        (folder / "results.json").write_text(json.dumps(result))
        (folder / "splits.json").write_text(json.dumps({"data": "/data/dermofit"}))
    lines = report.finetune_table(report.load_results([tmp_path / "runs"]))
    assert [row for row in lines if row.startswith("| cass")] == [
        "| cass (resnet50) | finetune | runs/cass | 0.8100 +- 0.0141 (n=2) |",
        "| cass (resnet50) | linear | runs/cass | 0.6100 +- 0.0141 (n=2) |"]
