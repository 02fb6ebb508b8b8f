"""Duplicates across splits: the same picture twice (same pixels, or resized / recompressed /
re-exposed) is found from a fingerprint of each image, counted, listed in splits.json and, with
--duplicates together, kept in one split. Real photographs (scikit-learn's sample images) stand in
for a medical set's copies."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from sklearn.datasets import load_sample_images

import data
import finetune
from conftest import TINY, class_folders
from data import DataIndex, index_data
from plumbing.fingerprints import (NEAR_BITS, duplicate_sets, file_fingerprint, fingerprint, list_duplicates,
                                   popcount)
from plumbing.splits import make_splits, select


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    china, flower = load_sample_images().images
    return {"china": Image.fromarray(china), "flower": Image.fromarray(flower)}


def bits_apart(a: Image.Image, b: Image.Image) -> int:
    return bin(fingerprint(np.asarray(a))[1] ^ fingerprint(np.asarray(b))[1]).count("1")


def test_exact_hash_is_of_the_pixels_and_the_perceptual_hash_survives_resizing_and_recompression(photos, tmp_path):
    china = photos["china"]
    china.save(tmp_path / "a.png")
    china.save(tmp_path / "b.bmp")  # another format, the same pixels
    changed = np.asarray(china).copy()
    changed[0, 0] ^= 1  # one value of one pixel
    exact = {n: fingerprint(np.asarray(Image.open(tmp_path / n)))[0] for n in ("a.png", "b.bmp")}
    assert exact["a.png"] == exact["b.bmp"] != fingerprint(changed)[0]
    assert fingerprint(changed)[1] == fingerprint(np.asarray(china))[1]
    small = china.resize((china.width // 3, china.height // 3))
    small.save(tmp_path / "small.jpg", quality=60)
    for copy in (Image.open(tmp_path / "small.jpg"), ImageEnhance.Brightness(china).enhance(1.1),
                 china.convert("L").convert("RGB")):  # grey, as training decodes it: three equal channels
        assert bits_apart(china, copy) <= NEAR_BITS
    w, h = china.size
    crops = [china.crop((0, 0, w // 2, h // 2)), china.crop((w // 2, h // 2, w, h))]
    assert bits_apart(china, photos["flower"]) > 3 * NEAR_BITS and bits_apart(*crops) > 3 * NEAR_BITS


@pytest.fixture
def copies(photos, tmp_path) -> Path:
    """Two classes of noise images (all different) plus a photograph saved three ways (same pixels as
    PNG and BMP, a smaller JPEG) and a crop of it, and the other photograph once."""
    root = class_folders(tmp_path / "d", {"a": 20, "b": 20})
    china = photos["china"]
    china.save(root / "a" / "china.png")
    china.save(root / "b" / "china.bmp")
    china.resize((china.width // 2, china.height // 2)).save(root / "b" / "china_small.jpg", quality=70)
    china.crop((0, 0, 320, 240)).save(root / "a" / "china_crop.png")
    photos["flower"].save(root / "a" / "flower.png")
    return root


def test_duplicate_sets_join_identical_and_near_copies_and_nothing_else(copies, capsys):
    index = index_data(copies, workers=1, fingerprint=file_fingerprint)
    assert [[index.paths[i] for i in s] for s in duplicate_sets(index)] == \
        [["a/china.png", "b/china.bmp", "b/china_small.jpg"]]
    splits = list_duplicates(index, make_splits(index, 0))
    listed = splits["duplicates"]
    assert len(listed) == 1 and listed[0]["identical"] is False  # the JPEG differs in its pixels
    where = {p: name for name in ("train", "val", "test") for p in splits[name]}
    assert listed[0]["images"] == {p: where[p] for p in ("a/china.png", "b/china.bmp", "b/china_small.jpg")}
    across = int(len(set(listed[0]["images"].values())) > 1)
    assert (f"duplicates: 0 sets of identical images and 1 of near-identical ones (3 of 45 images), "
            f"{across} of the sets across splits") in capsys.readouterr().out
    without = index_data(copies, workers=1)
    assert without.prints is None and list_duplicates(without, {"train": []}) == {"train": []}


def test_blocks_of_hash_comparisons_find_exactly_the_pairs_a_full_comparison_finds():
    rng = np.random.default_rng(0)
    near = rng.integers(0, 2**63, 3000, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    near[2999] = near[5] ^ np.uint64(0b1011)  # 3 bits apart: one set across the block boundaries
    near[1700] = near[4] ^ np.uint64(0b11111)  # 5 bits: not a duplicate
    prints = [[f"x{i}", int(h)] for i, h in enumerate(near)]
    prints[2000][0] = prints[10][0]  # same pixels
    index = DataIndex(Path("x"), Path("x"), "t", [f"{i}.png" for i in range(3000)], None, [], prints=prints)
    assert sorted(map(sorted, duplicate_sets(index))) == [[5, 2999], [10, 2000]]


def test_popcount_counts_the_set_bits_as_numpy_2s_bitwise_count_does():
    x = np.random.default_rng(0).integers(0, 2**63, (50, 7), dtype=np.int64).astype(np.uint64) * np.uint64(3)
    expected = np.vectorize(lambda v: bin(int(v)).count("1"))(x)
    assert popcount(x).tolist() == expected.tolist()
    assert popcount(np.array([0, 2**64 - 1], dtype=np.uint64)).tolist() == [0, 64]
    if hasattr(np, "bitwise_count"):
        assert popcount(x).tolist() == np.bitwise_count(x).tolist()


def test_together_keeps_each_set_in_one_split_with_the_groups_of_its_images(photos, tmp_path):
    """30 tiles of the photographs, each also saved as a BMP copy under another patient: a random
    split separates some pairs; `together` never does, keeping both patients' images in one split."""
    root, tiles = tmp_path / "d", [im.crop((x, y, x + 128, y + 128)) for im in photos.values()
                                    for y in range(0, 300, 128) for x in range(0, 513, 128)]
    root.mkdir()
    for i, tile in enumerate(tiles):
        tile.save(root / f"{i}.png")
        tile.save(root / f"{i}_copy.bmp")
    (root / "labels.csv").write_text("path,label,patient\n" + "".join(
        f"{i}{suffix},{'ab'[i % 2]},{'p' if suffix == '.png' else 'q'}{i}\n"
        for i in range(len(tiles)) for suffix in (".png", "_copy.bmp")))
    index = index_data(root, workers=1, fingerprint=file_fingerprint, group_col="patient")
    sets = duplicate_sets(index)
    assert sorted(sorted(index.paths[i] for i in s) for s in sets) == \
        sorted([f"{i}.png", f"{i}_copy.bmp"] for i in range(len(tiles)))

    def spans(splits: dict) -> int:
        where = {p: name for name in ("train", "val", "test") for p in splits[name]}
        return sum(len({where[index.paths[i]] for i in s}) > 1 for s in sets)
    assert max(spans(make_splits(index, seed)) for seed in range(3)) > 0
    for seed in range(3):
        together = make_splits(index, seed, join=duplicate_sets(index))
        assert spans(together) == 0 and {len(together[n]) for n in ("val", "test")} != {0}
        select(index, together, apart=True)  # patients p<i> and q<i> kept apart from test as well


def test_fingerprints_are_remembered_until_a_file_changes(copies, tmp_path, monkeypatch):
    first = index_data(copies, workers=1, memo_dir=tmp_path / "cache", fingerprint=file_fingerprint)

    def no_decoding(path, fingerprint):
        raise AssertionError(f"{path} was decoded again")
    monkeypatch.setattr(data, "_look", no_decoding)
    again = index_data(copies, workers=1, memo_dir=tmp_path / "cache", fingerprint=file_fingerprint)
    assert again.prints == first.prints and duplicate_sets(again) == duplicate_sets(first)
    monkeypatch.undo()
    (copies / "a" / "flower.png").unlink()
    changed = index_data(copies, workers=1, memo_dir=tmp_path / "cache", fingerprint=file_fingerprint)
    assert len(changed.prints) == len(first.prints) - 1
    assert len(list((tmp_path / "cache").glob(f"*-fingerprinted{data.CHECK_VERSION}-*"))) == 1


def test_pretraining_lists_them_and_finetuning_reports_them_on_the_checkpoints_split(copies, tmp_path, capsys):
    import pretrain_cass
    out = tmp_path / "cass"
    pretrain_cass.main(pretrain_cass.parse_args(["--data", str(copies), "--out", str(out), "--epochs", "1",
                                                 "--duplicates", "together", "--knn-every", "0", *TINY]))
    written = json.loads((out / "splits.json").read_text())
    (listed,) = written["duplicates"]
    assert len(set(listed["images"].values())) == 1  # one split, as asked
    assert json.loads((out / "args.json").read_text())["duplicates"] == "together"
    capsys.readouterr()
    finetune.main(finetune.parse_args(["--ckpt", str(out / "cnn.pt"), "--epochs", "1", "--bs", "8",
                                       "--workers", "0", "--resamples", "100", "--out", str(tmp_path / "ft"),
                                       "--duplicates", "together"]))
    printed = capsys.readouterr().out
    assert "1 of near-identical ones (3 of 45 images), 0 of the sets across splits" in printed
    assert "--duplicates together moves nothing here" in printed
    assert json.loads((tmp_path / "ft" / "splits.json").read_text())["duplicates"] == written["duplicates"]
