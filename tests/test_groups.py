"""Leakage-safe splits: images of one group (patient, lesion) never land in two splits."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

import finetune
from plumbing import runtime
from conftest import class_folders, write_image
from data import DataIndex, index_data
from errors import UserError
from plumbing.splits import label_fraction, make_splits, select


def split_of_group(index: DataIndex, splits: dict) -> dict[str, set[str]]:
    where = {}
    for name in ("train", "val", "test"):
        for p in splits[name]:
            where.setdefault(index.groups[index.paths.index(p)], set()).add(name)
    return where


@pytest.fixture
def grouped_csv(tmp_path):
    """60 patients of 1-4 images each, one-hot classes (a: 36 patients, b: 24) and a `patient` column."""
    rng, rows = np.random.default_rng(0), []
    for patient in range(60):
        cls = int(patient % 5 < 2)
        for k in range(int(rng.integers(1, 5))):
            write_image(tmp_path / f"{patient}_{k}.png", size=(8, 8), seed=patient * 10 + k)
            rows.append(f"{patient}_{k}.png,p{patient},{1 - cls},{cls}")
    (tmp_path / "labels.csv").write_text("path,patient,a,b\n" + "\n".join(rows) + "\n")
    return tmp_path


def test_csv_group_column_keeps_every_patient_in_one_split_and_strata_roughly(grouped_csv):
    index = index_data(grouped_csv, workers=1, group_col="patient")
    assert index.layout == "CSV with one-hot class columns" and index.classes == ["a", "b"]
    assert index.groups[0] == "p0" and len(set(index.groups)) == 60
    for seed in range(5):
        splits = make_splits(index, seed)
        assert all(len(names) == 1 for names in split_of_group(index, splits).values())
        assert splits["groups"] == dict(zip(index.paths, index.groups))
        assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(index.paths)
        images = {name: index.class_counts(ids).tolist() for name, ids in select(index, splits).items()}
        # whole patients are carved per stratum in images: 20% of a's 90 and of b's 65 images, 10% likewise
        assert images["test"] == [18, 13] and images["val"] == [9, 6]


def test_label_fractions_take_whole_groups(grouped_csv):
    index = index_data(grouped_csv, workers=1, group_col="patient")
    train = select(index, make_splits(index, 0))["train"]
    for frac, seed in ((0.1, 0), (0.3, 1), (0.01, 2)):
        chosen = label_fraction(index, train, frac, seed)
        groups = {index.groups[i] for i in chosen}
        assert chosen == sorted(i for i in train if index.groups[i] in groups)  # each group whole or absent
        assert index.class_counts(chosen).min() >= 1
    assert index.class_counts(label_fraction(index, train, 0.1, 0)).tolist() == [6, 5]  # 0.1 of 63 and 46 images


def test_folder_layout_reads_groups_csv_and_unlisted_images_are_their_own_group(tmp_path, capsys):
    class_folders(tmp_path, {"benign": 30, "malignant": 30})
    paths = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    listed = paths[:-3]  # each lesion photographed 3 times; the last 3 images unlisted
    (tmp_path / "groups.csv").write_text("path,group\n" + "".join(f"{p},{p.split('/')[0]}-{i // 3}\n"
                                                                   for i, p in enumerate(listed)))
    index = index_data(tmp_path, workers=1)
    assert "3 images are not in groups.csv" in capsys.readouterr().out
    assert index.layout == "class folders" and index.classes == ["benign", "malignant"]
    assert index.groups[:3] == ["benign-0"] * 3 and index.groups[-1] == paths[-1]
    for seed in range(3):
        assert all(len(names) == 1 for names in split_of_group(index, make_splits(index, seed)).values())


def test_a_missing_group_column_is_one_clear_error(grouped_csv, tmp_path):
    with pytest.raises(UserError, match="--group-col site: .* has no such column"):
        index_data(grouped_csv, workers=1, group_col="site")
    class_folders(tmp_path / "f", {"a": 2})
    for header in ("image,patient\n", ""):
        (tmp_path / "f" / "groups.csv").write_text(header + "a/a_0.png,p1\n" * bool(header))
        with pytest.raises(UserError, match=r"groups.csv needs the columns path and group \(it has "
                                            + ("image, patient" if header else "") + r"\)$"):
            index_data(tmp_path / "f", workers=1)


# Without groups every image is its own unit: the seeded splits and label fractions of fixed data
# are pinned below, so that a data set without a group column keeps the split it has always had.
def fixed(multilabel: bool) -> DataIndex:
    if multilabel:
        targets = np.array([[1, i % 2, int(i % 7 == 0)] for i in range(28)], dtype=np.float32)
    else:
        targets = np.array([i % 3 if i < 24 else 0 for i in range(30)], dtype=np.int64)
    return DataIndex(Path("x"), Path("x"), "t", [f"{i:02d}.png" for i in range(len(targets))], targets,
                     ["a", "b", "c"], multilabel=multilabel)


@pytest.mark.parametrize("multilabel, splits, fractions", [
    (False, {"train": [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 14, 15, 16, 18, 19, 21, 23, 24, 27, 28], "val": [20, 22, 26],
             "test": [6, 10, 11, 13, 17, 25, 29]}, ([0, 2, 7, 14, 16, 18, 24], [7, 14, 15])),
    (True, {"train": [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 22, 24], "val": [23, 26],
            "test": [6, 18, 21, 25, 27]}, ([0, 2, 5, 9, 12, 13, 20], [11, 12, 14])),
])
def test_without_groups_splits_and_fractions_are_the_pinned_per_image_draws(multilabel, splits, fractions):
    index = fixed(multilabel)
    got = make_splits(index, 3)
    assert got == {name: [f"{i:02d}.png" for i in ids] for name, ids in splits.items()}  # no "groups" key
    train = select(index, got)["train"]
    assert (label_fraction(index, train, 0.3, 5), label_fraction(index, train, 0.05, 1)) == fractions


def test_finetune_refuses_a_split_where_a_group_spans_train_and_test(grouped_csv, tmp_path, monkeypatch):
    grouped = index_data(grouped_csv, workers=1, group_col="patient")
    leaky = make_splits(grouped, 0)
    twice = next(p for p in leaky["test"] if grouped.groups.count(grouped.groups[grouped.paths.index(p)]) > 1)
    leaky = {**leaky, "test": [p for p in leaky["test"] if p != twice], "train": leaky["train"] + [twice]}
    assert select(grouped, leaky)["train"]  # only when asked for does select check
    with pytest.raises(UserError, match="has images in both the train and the test split"):
        select(grouped, leaky, apart=True)

    flags = ["--arch", "test_resnet", "--no-pretrained", "--img-size", "32", "--bs", "8", "--workers", "0",
             "--epochs", "1", "--data", str(grouped_csv), "--group-col", "patient", "--cache", "off",
             "--resamples", "100"]
    seen = []
    real_evaluate = finetune.evaluate
    monkeypatch.setattr(finetune, "evaluate", lambda *a, **k: seen.append(k["groups"]) or real_evaluate(*a, **k))
    finetune.main(finetune.parse_args([*flags, "--out", str(tmp_path / "safe")]))
    recorded = json.loads((tmp_path / "safe" / "splits.json").read_text())
    assert recorded["groups"] == dict(zip(grouped.paths, grouped.groups))
    # the test set's intervals resample whole patients, and the prediction file names each image's
    assert list(seen[0]) == [recorded["groups"][p] for p in recorded["test"]]
    rows = list(csv.DictReader(open(tmp_path / "safe" / "predictions_seed0.csv")))
    assert [(r["path"], r["group"]) for r in rows] == [(p, recorded["groups"][p]) for p in recorded["test"]]

    # as if the split came from a checkpoint pretrained before the groups were known
    monkeypatch.setattr(finetune.rt, "new_split", lambda index, cfg: leaky)
    with pytest.raises(UserError, match=r"group 'p\d+' has images in both the (train|val) and the test split"):
        finetune.main(finetune.parse_args([*flags, "--out", str(tmp_path / "leaky")]))
    assert not (tmp_path / "leaky" / "splits.json").exists()


@pytest.mark.parametrize("script", ["pretrain_cass", "pretrain_dino"])
def test_group_col_reaches_the_pretraining_split(grouped_csv, script):
    """What main() does with the flag: the index reads the column and the new split keeps each patient whole
    (fine-tuning's use of it is tested end to end above)."""
    module = __import__(script)
    cfg = module.parse_args(["--data", str(grouped_csv), "--group-col", "patient", "--cache", "off",
                             "--workers", "1"])
    index = runtime.index_and_fingerprint(cfg)
    splits = runtime.new_split(index, cfg)
    assert splits["groups"] == dict(zip(index.paths, index.groups)) and index.groups[0] == "p0"
    assert all(len(names) == 1 for names in split_of_group(index, splits).values())
