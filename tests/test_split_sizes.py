"""Splits and label fractions aim at their ratios in images, groups kept whole: one large patient
no longer drags most images into test or val, or into a 10 % label fraction; where whole groups make a
ratio unreachable, one printed line says so and splits.json records what each split got."""
import json
from pathlib import Path

import numpy as np
import torch

from plumbing import runtime
from data import DataIndex
from plumbing.splits import label_fraction, make_splits, select


def grouped(classes: list[int], groups: list[str | None]) -> DataIndex:
    """Images of classes a/b with these groups (None: the image alone)."""
    paths = [f"{i:03d}.png" for i in range(len(classes))]
    return DataIndex(Path("x"), Path("x"), "t", paths, np.array(classes, dtype=np.int64), ["a", "b"],
                     groups=[g or p for g, p in zip(groups, paths)])


def one_large_patient() -> DataIndex:
    """400 of 500 images are one patient's (class a); 50 more of a and 50 of b alone."""
    return grouped([0] * 450 + [1] * 50, ["big"] * 400 + [None] * 100)


def patients_of_1_to_8_images() -> DataIndex:
    """120 patients of 1 to 8 images (a third of them b), 555 images."""
    rng, classes, groups = np.random.default_rng(0), [], []
    for p in range(120):
        n = int(rng.integers(1, 9))
        classes += [int(p % 3 == 0)] * n
        groups += [f"p{p}"] * n
    return grouped(classes, groups)


def test_splits_take_their_ratio_of_each_class_in_images_not_in_patients():
    index = patients_of_1_to_8_images()
    per_class = index.class_counts(list(range(len(index.paths))))
    for seed in range(10):  # counting patients put 93 to 124 images in test, 48 to 65 in val
        splits = make_splits(index, seed)
        parts = select(index, splits, apart=True)
        for name, ratio in (("val", 0.1), ("test", 0.2)):
            assert np.abs(index.class_counts(parts[name]) - np.round(ratio * per_class)).max() <= 2
        assert splits["sizes"] == {name: {"images": len(ids), "groups": len({index.groups[i] for i in ids})}
                                   for name, ids in parts.items()}
    fraction = label_fraction(index, parts["train"], 0.1, seed=0)
    assert abs(len(fraction) - 0.1 * len(parts["train"])) <= 4
    assert {i for i in parts["train"] if index.groups[i] in {index.groups[j] for j in fraction}} == set(fraction)


def test_one_large_patient_stays_in_train_and_the_rest_is_shared_in_proportion(capsys):
    index = one_large_patient()
    for seed in range(20):  # counting patients put 419 images in test (seed 7), 409 in val (8, 15)
        splits = make_splits(index, seed)
        assert "000.png" in splits["train"]
        # class a: the 50 images beside the patient go 17 / 33 (val 45 : test 90), class b 5 / 10
        assert splits["sizes"] == {"train": {"images": 435, "groups": 36}, "val": {"images": 22, "groups": 22},
                                   "test": {"images": 43, "groups": 43}}
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["note: whole groups keep the split off its ratios in images: val 22 of 500 images "
                       "(4%, aimed at 10%); test 43 of 500 images (9%, aimed at 20%)"] * 20


def test_a_label_fraction_passes_over_a_patient_larger_than_it():
    index = one_large_patient()
    train = list(range(400)) + list(range(400, 435)) + list(range(450, 485))  # 470 images
    for seed in range(20):  # counting patients instead would take 407 of the 470 with seed 5
        fraction = label_fraction(index, train, 0.1, seed)
        assert 0 not in fraction  # the large patient
        assert index.class_counts(fraction).tolist() == [35, 4]  # all 35 small a (aim 44), round(0.1 * 35) of b


def test_an_unreachable_fraction_is_noted(capsys):
    index = one_large_patient()
    train = list(range(400)) + list(range(450, 500))  # class a in train: the large patient alone
    fraction = label_fraction(index, train, 0.1, seed=0)
    assert index.class_counts(fraction).tolist() == [400, 5]  # at least one patient per class
    assert capsys.readouterr().out == ("note: whole groups keep the label fraction off its ratio: "
                                       "405 of 450 images (90%, aimed at 10%)\n")


def test_without_groups_nothing_is_added_or_printed(capsys):
    index = patients_of_1_to_8_images()
    alone = DataIndex(Path("x"), Path("x"), "t", index.paths, index.targets, index.classes)
    splits = make_splits(alone, 0)
    label_fraction(alone, select(alone, splits)["train"], 0.1, seed=0)
    assert set(splits) == {"train", "val", "test"} and capsys.readouterr().out == ""


def test_sizes_reach_splits_json_and_checkpoints_as_they_are(tmp_path):
    index = patients_of_1_to_8_images()
    splits = make_splits(index, 3)
    runtime.write_splits(tmp_path, index, splits, seed=3)
    written = json.loads((tmp_path / "splits.json").read_text())
    assert written["sizes"] == splits["sizes"] and written["test"] == splits["test"]
    assert select(index, written) == select(index, splits)
    torch.save({"splits": splits}, tmp_path / "c.pt")  # plain ints: a weights_only load takes them
    assert torch.load(tmp_path / "c.pt", weights_only=True)["splits"]["sizes"] == splits["sizes"]
