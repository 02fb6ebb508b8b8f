"""report.py's fine-tuning tables: what pools into one cell and what never does,
the intervals over test images, the paired differences and the figures.
The results.json / splits.json / predictions_seed<N>.csv / log.jsonl files are
written by hand in the formats finetune.py and the pretraining scripts write."""
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation import figures, records, report
from sklearn.metrics import f1_score

from evaluation.intervals import paired_seed_interval, seed_mean_interval
from evaluation.metrics import headline_metric

# vars(args) of finetune.py with its defaults, as results.json stores them
CONFIG = {"data": None, "out": None, "epochs": 50, "bs": 16, "img_size": None, "aug": "paper", "seed": 0,
          "workers": 4, "device": "auto", "amp": "auto", "cache": "on", "cache_dir": "runs/cache",
          "compile": False, "grad_ckpt": False, "ckpt": "runs/cass/cnn.pt", "arch": None, "pretrained": True,
          "weights": None, "frac": 1.0, "seeds": [0], "split_seed": 0, "lr": 3e-4, "patience": 5,
          "focal": "sigmoid", "class_weights": "minmax", "alpha": 1.0, "gamma": 2.0, "metric": "f1",
          "norm": "model"}


def write_run(folder: Path, data_set: str, scores: list[float], *, seeds: list[int] | None = None,
              ckpt: str = "runs/cass/cnn.pt", frac: float = 1.0, metric: str = "f1",
              classes: tuple[str, ...] = ("a", "b"), multilabel: bool = False, **flags) -> Path:
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
               "classes": list(classes), "multilabel": multilabel, "summary": {}, "runs": runs, "config": config,
               "source": ckpt}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "splits.json").write_text(json.dumps({"data": data_set, "classes": list(classes), "skipped": [],
                                                    "train": [], "val": [], "test": []}))
    return folder


def table_rows(text: str) -> list[str]:
    """The result rows of every fine-tuning table (not headers or separators)."""
    return [line for line in text.splitlines() if line.startswith("| cass")]


RESAMPLES = 200  # --resamples of every report made here; the intervals below are computed with as many


def make_report(tmp_path: Path, *folders: Path) -> str:
    return report.main(report.parse_args([*map(str, folders), "--out", str(tmp_path / "report"),
                                          "--resamples", str(RESAMPLES)])).read_text()


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
    lines = report.finetune_table(report.tables(records.load_results([tmp_path / "runs"])))
    assert [row for row in lines if row.startswith("| cass")] == [
        "| cass (resnet50) | finetune | runs/cass | 0.8100 +- 0.0141 (n=2) |",
        "| cass (resnet50) | linear | runs/cass | 0.6100 +- 0.0141 (n=2) |"]


def write_predicted_run(folder: Path, targets: np.ndarray, probs: list[np.ndarray],
                        classes: tuple[str, ...] = ("a", "b"), paths: list[str] | None = None,
                        groups: list[str] | None = None, thresholds: list[list[float]] | None = None,
                        **flags) -> Path:
    """A run whose every seed wrote predictions_seed<N>.csv (a group column if
    `groups` are given, probabilities per class, true names ';'-joined for
    multi-label targets (N, C)); the results.json scores are the macro F1 of
    those files at each seed's `thresholds` (recorded; else 0.5), as finetune.py computes it."""
    multilabel = targets.ndim == 2
    paths = paths or [f"{i % len(classes)}/img{i:04d}.png" for i in range(len(targets))]
    limits = thresholds or [[0.5] * len(classes)] * len(probs)
    scores = [f1_score(targets, p > np.array(t) if multilabel else p.argmax(1), average="macro", zero_division=0)
              for p, t in zip(probs, limits)]
    folder = write_run(folder, "/data/set", scores, classes=classes, multilabel=multilabel, **flags)
    if thresholds:
        results = json.loads((folder / "results.json").read_text())
        for run, t in zip(results["runs"], thresholds):
            run["thresholds"] = dict(zip(classes, t))
        (folder / "results.json").write_text(json.dumps(results))
    named = [[g] for g in groups] if groups else [[]] * len(targets)
    for seed, p in enumerate(probs):
        truth = [";".join(np.array(classes)[t.astype(bool)]) if multilabel else classes[t] for t in targets]
        with open(folder / f"predictions_seed{seed}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["path", *(["group"] if groups else []), "true", *(f"p_{c}" for c in classes)],
                                     *([path, *g, t, *(f"{v:.6f}" for v in row)]
                                       for path, g, t, row in zip(paths, named, truth, p))])
    return folder


def guesses(targets: np.ndarray, accuracy: float, seed: int, num_classes: int = 2) -> np.ndarray:
    """(N, C) softmax-like probabilities whose argmax is right on about `accuracy` of the images."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(len(targets)) > accuracy
    picked = np.where(wrong, (targets + rng.integers(1, num_classes, len(targets))) % num_classes, targets)
    probs = rng.random((len(targets), num_classes)) * 0.5
    probs[np.arange(len(targets)), picked] += 1.0
    return probs / probs.sum(1, keepdims=True)


def paired_rows(text: str) -> list[tuple[str, float, float, float, float]]:
    """(A, A - B, low, high, p; NaN for '-') of every row of the paired-differences tables."""
    found = re.findall(r"^\| \d+% \| (.+?) \| .+? \| ([+-][\d.]+) \| \[([+-][\d.]+), ([+-][\d.]+)\]‡? \| "
                       r"([\d.]+|-) \| .+ \|$", text, re.M)
    return [(a, *(float(n) if n != "-" else np.nan for n in numbers)) for a, *numbers in found]


TARGETS = np.random.default_rng(0).integers(0, 2, 200)


def test_a_model_paired_with_itself_differs_by_exactly_zero(tmp_path):
    probs = [guesses(TARGETS, 0.8, seed) for seed in range(3)]
    for bs in (16, 32):  # two rows (another batch size) with the very same predictions
        write_predicted_run(tmp_path / f"runs/bs{bs}", TARGETS, probs, bs=bs)
    assert paired_rows(make_report(tmp_path, tmp_path / "runs")) == [("cass (resnet50), finetune, runs/cass, bs=16",
                                                                      0.0, 0.0, 0.0, 1.0)]


def test_a_clearly_better_model_has_a_positive_difference_whose_interval_excludes_zero(tmp_path):
    write_predicted_run(tmp_path / "runs/weak", TARGETS, [guesses(TARGETS, 0.6, s) for s in range(3)], bs=16)
    write_predicted_run(tmp_path / "runs/strong", TARGETS, [guesses(TARGETS, 0.95, s) for s in (3, 4, 5)], bs=32)
    [(better, diff, low, high, p)] = paired_rows(make_report(tmp_path, tmp_path / "runs"))
    assert better.endswith("bs=32") and diff > 0.2 and 0 < low < diff < high and p < 0.01


def test_rows_whose_seeds_cannot_be_matched_are_not_paired(tmp_path):
    write_predicted_run(tmp_path / "runs/three", TARGETS, [guesses(TARGETS, 0.6, s) for s in range(3)], bs=16)
    write_predicted_run(tmp_path / "runs/two", TARGETS, [guesses(TARGETS, 0.9, s) for s in range(2)], bs=32)
    text = make_report(tmp_path, tmp_path / "runs")
    assert paired_rows(text) == [] and "not compared, their seeds differ (0 1 2 vs 0 1)" in text
    # matched seeds that labelled other images measure the draw of labels, not the methods
    results = json.loads((tmp_path / "runs/three/results.json").read_text())
    results["runs"] = results["runs"][:2]
    results["runs"][1]["labelled_files"] = ["b/7.png"]
    (tmp_path / "runs/three/results.json").write_text(json.dumps(results))
    (tmp_path / "runs/three/predictions_seed2.csv").unlink()
    assert "not compared, seed 1 labelled other images in the two rows" in make_report(tmp_path, tmp_path / "runs")


def test_the_cell_interval_covers_images_and_seeds_and_fills_the_cell(tmp_path):
    targets = np.random.default_rng(1).integers(0, 3, 90)
    write_predicted_run(tmp_path / "runs/a", targets, [guesses(targets, 0.7, s, 3) for s in range(3)],
                        classes=("x", "y", "z"))
    results = records.load_results([tmp_path / "runs"])
    [cell] = records.collect_cells(results).values()
    interval = report.cell_interval(cell, "macro_f1", resamples=RESAMPLES)
    assert interval.low < interval.estimate < interval.high and interval.seeds == 3
    assert interval.estimate == pytest.approx(np.mean(cell.scores), abs=1e-4)  # the table's mean, on the same images
    metric = headline_metric("macro_f1", False)  # files without a group column: images resampled
    in_file_order = records.seed_predictions(cell)[0].targets  # sorted by path
    assert interval == seed_mean_interval(metric, in_file_order, report.decisions(cell), n=RESAMPLES)
    assert interval.se ** 2 > np.var(cell.scores, ddof=1) / 3  # the seeds' spread and the images' luck
    [row] = table_rows(make_report(tmp_path, tmp_path / "runs"))
    assert row.endswith(f"(n=3) [{interval.low:.4f}, {interval.high:.4f}] |")


def test_one_seed_is_marked_test_images_only_and_seeds_without_files_get_no_bracket(tmp_path):
    write_predicted_run(tmp_path / "runs/one", TARGETS, [guesses(TARGETS, 0.8, 0)], bs=16)
    write_run(tmp_path / "runs/none", "/data/set", [0.8, 0.9], bs=32)  # no prediction files: no interval for nothing
    rows = table_rows(make_report(tmp_path, tmp_path / "runs"))
    assert rows[0].endswith("(n=1) [" + rows[0].split("[")[1].split("]")[0] + "]‡ |")
    assert rows[1].endswith("| 0.8500 +- 0.0707 (n=2) |")


def test_rows_tested_on_different_images_are_not_paired(tmp_path):
    probs = [guesses(TARGETS, 0.8, 0)]
    write_predicted_run(tmp_path / "runs/a", TARGETS, probs, bs=16)
    write_predicted_run(tmp_path / "runs/b", TARGETS, probs, bs=32, paths=[f"other/{i}.png" for i in range(200)])
    write_run(tmp_path / "runs/c", "/data/set", [0.7], bs=64)  # no prediction files at all
    text = make_report(tmp_path, tmp_path / "runs")
    assert paired_rows(text) == []
    assert "bs=16 vs cass (resnet50), finetune, runs/cass, bs=32: not compared, their prediction files " \
           "cover different test images." in text
    assert text.count("bs=64 has seeds without prediction files.") == 2


def assert_png(path: Path) -> None:
    """A valid PNG of a readable size, written at the report's 150 dpi."""
    with Image.open(path) as img:
        assert img.format == "PNG" and 400 <= min(img.size) and max(img.size) <= 3000, (path, img.size)
        assert round(img.info["dpi"][0]) == 150
        img.verify()


@pytest.mark.parametrize("multilabel", [False, True])
def test_figures_of_every_experiment_with_prediction_files(tmp_path, multilabel):
    rng = np.random.default_rng(2)
    classes = ("naevus", "melanoma", "basal cell carcinoma", "seborrhoeic keratosis")
    if multilabel:
        targets = (rng.random((120, 4)) < 0.3).astype(int)
        probs = [targets * 0.35 + rng.random((120, 4)) * 0.65 for _ in range(2)]  # in [0, 1]
    else:
        targets = rng.integers(0, 4, 120)
        probs = [guesses(targets, 0.7, s, 4) for s in range(2)]
    write_predicted_run(tmp_path / "runs/a", targets, probs, classes=classes)
    text = make_report(tmp_path, tmp_path / "runs")
    kinds = ("roc", "reliability") if multilabel else ("roc", "reliability", "confusion")
    for kind in kinds:
        assert_png(tmp_path / "report" / f"runs_a_{kind}.png")
        assert f"![runs_a_{kind}](runs_a_{kind}.png)" in text
    assert not (tmp_path / "report/runs_a_confusion.png").exists() if multilabel else True


@pytest.mark.parametrize("method", ["CASS", "DINO"])
def test_per_epoch_figure_of_a_pretraining_log(tmp_path, method):
    folder = tmp_path / "runs/pre"
    folder.mkdir(parents=True)
    args = {"cnn": "resnet50", "vit": "vit_base_patch16_384"} if method == "CASS" \
        else {"arch": "vit_small", "out_dim": 4096}
    (folder / "args.json").write_text(json.dumps(args))
    log = [{"epoch": e, "loss": 2 / e, "seconds": 60.0, "images_per_s": 30.0,
            **({"cnn_std": 0.03, "vit_std": 0.02 / e, "healthy_std": 0.0442, "cos": 0.5 + e / 40} if method == "CASS"
               else {"teacher_entropy": 8 - e / 5, "ln_k": 8.318}),
            **({"knn_cnn" if method == "CASS" else "knn_teacher": 0.4 + e / 50} if e % 5 == 0 else {})}
           for e in range(1, 21)]
    (folder / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    text = make_report(tmp_path, tmp_path / "runs")
    assert_png(tmp_path / "report/pre_epochs.png")
    assert "![pre_epochs](pre_epochs.png)" in text and f"| pre | {method} |" in text


@pytest.mark.parametrize("method", ["CASS", "DINO"])
def test_only_the_cass_std_panel_draws_the_collapse_flag_level(tmp_path, monkeypatch, method):
    import pretrain_cass  # here, not above: the other tests of the report never load torch
    assert figures.COLLAPSE_RATIO == pretrain_cass.COLLAPSE_RATIO  # figures.py copies it, never imports a stage
    drawn = []
    monkeypatch.setattr(figures, "save", lambda fig, path: drawn.append(fig) or path)
    log = [{"epoch": e, "loss": 2 / e, **({"cnn_std": 0.03, "vit_std": 0.02 / e, "healthy_std": 0.0442, "cos": 0.5}
                                          if method == "CASS" else {"teacher_entropy": 8 - e / 5, "ln_k": 8.318})}
           for e in range(1, 6)]
    figures.pretraining_figure(log, method, "run", tmp_path / "epochs.png")
    flat = {(line.get_label(), tuple(line.get_ydata())) for ax in drawn[0].axes for line in ax.get_lines()
            if line.get_linestyle() == "--"}
    level = ("below 0.25: arm flagged as collapsed", (0.25, 0.25))
    assert (level in flat) == (method == "CASS") and len(flat) == 1 + (method == "CASS")


def test_each_seeds_recorded_thresholds_make_its_multilabel_decisions(tmp_path):
    rng = np.random.default_rng(3)
    targets = (rng.random((150, 2)) < 0.3).astype(int)
    probs = [np.clip(targets * 0.3 + rng.random((150, 2)) * 0.6, 0, 1) for _ in range(2)]
    thresholds = [[0.35, 0.55], [0.3, 0.6]]
    write_predicted_run(tmp_path / "runs/a", targets, probs, thresholds=thresholds)
    [cell] = records.collect_cells(records.load_results([tmp_path / "runs"])).values()
    at_half = np.mean([f1_score(targets, p > 0.5, average="macro", zero_division=0) for p in probs])
    interval = report.cell_interval(cell, "macro_f1", resamples=200)
    assert interval.estimate == pytest.approx(np.mean(cell.scores), abs=1e-4) != pytest.approx(at_half, abs=1e-4)


def grouped(tmp_path: Path, name: str, accuracy: float, seed: int, **flags) -> tuple[np.ndarray, np.ndarray]:
    """A run on 25 patients of 8 images each, every patient's images all right or all
    wrong, so resampling images understates how much the test set's luck can move F1."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"patient{g:02d}" for g in range(25)], 8)
    right = np.repeat(rng.random(25) < accuracy, 8)
    probs = np.where(right, TARGETS, 1 - TARGETS) * 0.6 + 0.2
    write_predicted_run(tmp_path / "runs" / name, TARGETS, [np.stack([1 - probs, probs], 1)],
                        paths=[f"img{i:04d}.png" for i in range(200)], groups=list(groups), **flags)
    return groups, right


def test_intervals_resample_whole_groups_when_the_files_name_them(tmp_path):
    groups, _ = grouped(tmp_path, "a", 0.7, seed=5)
    [cell] = records.collect_cells(records.load_results([tmp_path / "runs"])).values()
    metric, decided = headline_metric("macro_f1", False), report.decisions(cell)
    by_group = seed_mean_interval(metric, TARGETS, decided, groups=groups, n=RESAMPLES)
    by_image = seed_mean_interval(metric, TARGETS, decided, n=RESAMPLES)
    assert report.cell_interval(cell, "macro_f1", resamples=RESAMPLES) == by_group
    assert by_group.high - by_group.low > 1.5 * (by_image.high - by_image.low)
    [row] = table_rows(make_report(tmp_path, tmp_path / "runs"))
    assert row.endswith(f"[{by_group.low:.4f}, {by_group.high:.4f}]‡ |")  # one seed: test images only


def test_paired_differences_resample_whole_groups(tmp_path):
    groups, weak = grouped(tmp_path, "weak", 0.5, seed=6, bs=16)
    _, strong = grouped(tmp_path, "strong", 0.8, seed=7, bs=32)
    cells = records.collect_cells(records.load_results([tmp_path / "runs"]))
    a, b = sorted(cells, key=lambda key: -np.mean(cells[key].scores))  # A: the row with the higher F1
    metric, y = headline_metric("macro_f1", False), TARGETS
    da, db = report.decisions(cells[a]), report.decisions(cells[b])
    expected = paired_seed_interval(metric, y, da, db, groups=groups, n=RESAMPLES)
    by_image = paired_seed_interval(metric, y, da, db, n=RESAMPLES)
    [(better, diff, low, high, p)] = paired_rows(make_report(tmp_path, tmp_path / "runs"))
    assert better.endswith("bs=32") and (diff, low, high) == pytest.approx(
        (expected.estimate, expected.low, expected.high), abs=5e-5) and np.isnan(p)  # one seed: no p
    assert (round(low, 4), round(high, 4)) != (round(by_image.low, 4), round(by_image.high, 4))


def test_a_run_folder_pretrained_again_is_two_rows_told_apart_by_their_hash(tmp_path):
    # the same checkpoint path, two different files (the folder's run removed and pretrained again)
    for name, digest, scores in (("first", "aaaaaaaa11", [0.8]), ("second", "bbbbbbbb22", [0.6])):
        folder = write_run(tmp_path / "runs" / "cass" / name, "/data/set", scores)
        results = json.loads((folder / "results.json").read_text())
        results["source_id"] = {"path": str(tmp_path / "runs" / "cass" / "cnn.pt"), "sha256": digest}
        (folder / "results.json").write_text(json.dumps(results))
    rows = table_rows(make_report(tmp_path, tmp_path / "runs"))
    assert sorted(row.split(" | ")[2] for row in rows) == ["cass (aaaaaaaa)", "cass (bbbbbbbb)"]
