import numpy as np
import pytest
import torch
from PIL import Image

from torch.utils.data import DataLoader

from conftest import class_folders, write_image
from data import index_data
from errors import UserError
from plumbing.pixels import ImageDataset, SeededSampler, load_resized, train_augment, train_loader
from plumbing.splits import label_fraction, make_splits, select


def test_class_folder_layout(tmp_path):
    class_folders(tmp_path, {"b_cls": 3, "a_cls": 2})
    (tmp_path / "a_cls" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "a_cls" / "notes.txt").write_text("not an image")
    index = index_data(tmp_path, workers=1)
    assert index.layout == "class folders"
    assert index.classes == ["a_cls", "b_cls"]
    assert index.class_counts(list(range(5))).tolist() == [2, 3]
    assert all(p.endswith(".png") for p in index.paths)


def test_split_folder_layout_keeps_the_curator_split_and_carves_val_from_train(tmp_path):
    class_folders(tmp_path / "train", {"glioma": 40, "pituitary": 40})
    class_folders(tmp_path / "test", {"glioma": 5, "pituitary": 5})
    index = index_data(tmp_path, workers=1)
    assert index.layout == "split folders" and sorted(index.given_split) == ["test", "train"]
    splits = make_splits(index, seed=0)
    assert sorted(splits["test"]) == sorted(p for p in index.paths if p.startswith("test/"))
    assert all(p.startswith("train/") for p in splits["train"] + splits["val"])
    assert len(splits["val"]) == 10  # 0.1 / 0.8 of each class's 40 train images, rounded
    assert not set(splits["val"]) & set(splits["train"])


def test_csv_layouts(tmp_path, capsys):
    for i in range(6):
        write_image(tmp_path / "img" / f"{i}.jpg", seed=i)
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"img/{i}.jpg,{'ab'[i % 2]}\n" for i in range(6)))
    index = index_data(tmp_path, workers=1)
    assert index.layout == "CSV with a label column" and index.classes == ["a", "b"]
    assert index.targets.tolist() == [0, 1, 0, 1, 0, 1]

    multi = tmp_path / "multi.csv"  # multi-label, one 0/1 column per class
    multi.write_text("file,x,y,z\nimg/0.jpg,1,1,0\nimg/1.jpg,0,1,0\nimg/2.jpg,0,0,0\nimg/1.jpg,0,1,0\n"
                     "img/3.jpg,0,0,1\n")
    index = index_data(multi, workers=1)
    assert index.multilabel and index.classes == ["x", "y", "z"]
    assert index.targets.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert index.skipped == [{"path": "img/1.jpg", "reason": "duplicate row in CSV"}]

    onehot = tmp_path / "isic.csv"  # ISIC-2019 style: one-hot columns, names without extension, an empty UNK
    onehot.write_text("image,MEL,NV,UNK\nimg/0,1,0,0\nimg/1,0,1,0\n")
    index = index_data(onehot, workers=1)
    assert not index.multilabel and index.targets.tolist() == [0, 1] and index.paths[0] == "img/0.jpg"
    assert index.classes == ["MEL", "NV"]  # no head and no class weight for a class without an image
    assert "dropped the class column(s) UNK of isic.csv" in capsys.readouterr().out


def test_unlabelled_folder_is_all_train(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"{i}.png", seed=i)
    index = index_data(tmp_path, workers=1)
    assert not index.labelled and index.layout == "unlabelled folder"
    assert make_splits(index, 0) == {"train": index.paths, "val": [], "test": []}


@pytest.mark.parametrize("mode,ext", [("RGB", "jpg"), ("RGBA", "png"), ("P", "png"), ("L", "bmp"),
                                      ("I;16", "tif"), ("CMYK", "jpg"), ("RGB", "tiff")])
def test_every_image_mode_becomes_three_channel_uint8(tmp_path, mode, ext):
    path = write_image(tmp_path / f"x.{ext}", mode)
    x = load_resized(path, 24)
    assert x.shape == (24, 24, 3) and x.dtype == np.uint8


def test_16_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    arr = np.tile(np.linspace(0, 4000, 50).astype(np.uint16), (10, 1))
    path = tmp_path / "mri.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    x = torch.from_numpy(load_resized(path, 50)[..., 0].astype(np.float32))
    row = x[5]
    assert row.min() == 0 and row.max() == 255  # the full range is used, not clipped at 255
    assert (row.diff() >= 0).all() and len(row.unique()) > 40  # gradient kept


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    class_folders(tmp_path, {"a": 3, "b": 3}, ext="jpg")
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    good = (tmp_path / "b" / "b_0.jpg").read_bytes()
    (tmp_path / "b" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "b" / "fake.png").write_text("this is not a PNG")
    index = index_data(tmp_path, workers=2)
    assert len(index.paths) == 6
    assert sorted(s["path"] for s in index.skipped) == ["a/empty.jpg", "b/fake.png", "b/truncated.jpg"]
    assert all(s["reason"] for s in index.skipped)


def test_bad_data_paths_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        index_data(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        index_data(tmp_path / "empty")
    class_folders(tmp_path / "ds", {"a": 2})
    (tmp_path / "ds" / "b").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        index_data(tmp_path / "ds")
    (tmp_path / "bad.csv").write_text("path,label\nmissing.png,a\n")
    with pytest.raises(UserError, match="1 files that do not exist"):
        index_data(tmp_path / "bad.csv")


@pytest.fixture
def labelled_index(tmp_path):
    class_folders(tmp_path, {"big": 60, "mid": 30, "small": 10})
    return index_data(tmp_path, workers=2)


def test_splits_are_seeded_stratified_and_disjoint(labelled_index):
    a, b, c = make_splits(labelled_index, 0), make_splits(labelled_index, 0), make_splits(labelled_index, 1)
    assert a == b and a != c
    sets = {k: set(v) for k, v in a.items()}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"]) and not (sets["val"] & sets["test"])
    assert set().union(*sets.values()) == set(labelled_index.paths)
    parts = select(labelled_index, a)
    assert labelled_index.class_counts(parts["test"]).tolist() == [12, 6, 2]
    assert labelled_index.class_counts(parts["val"]).tolist() == [6, 3, 1]


def test_label_fractions_are_stratified_seeded_and_keep_every_class(labelled_index):
    train = select(labelled_index, make_splits(labelled_index, 0))["train"]
    one = label_fraction(labelled_index, train, 0.01, seed=0)
    assert labelled_index.class_counts(one).tolist() == [1, 1, 1]
    ten = label_fraction(labelled_index, train, 0.1, seed=0)
    assert labelled_index.class_counts(ten).tolist() == [4, 2, 1]
    assert set(ten) <= set(train)
    assert ten == label_fraction(labelled_index, train, 0.1, seed=0)
    assert ten != label_fraction(labelled_index, train, 0.1, seed=1)
    assert label_fraction(labelled_index, train, 1.0, seed=3) == sorted(train)


def test_multilabel_fraction_keeps_a_positive_for_every_label(tmp_path):
    rows = []
    for i in range(40):
        write_image(tmp_path / f"{i}.png", size=(8, 8), seed=i)
        rows.append(f"{i}.png,1,{int(i % 2 == 0)},{int(i == 7)}")
    (tmp_path / "labels.csv").write_text("path,common,half,rare\n" + "\n".join(rows) + "\n")
    index = index_data(tmp_path, workers=1)
    chosen = label_fraction(index, list(range(40)), 0.05, seed=0)
    assert index.targets[chosen].sum(0).min() >= 1


def test_loader_order_and_augmentations_depend_only_on_seed_and_epoch(demo_data):
    index = index_data(demo_data, workers=1)
    ids = list(range(12))

    def batches(workers, epoch):
        ds = ImageDataset(index.root, *index.part(ids), 32, train_augment("blur+solarize"))
        loader = train_loader(ds, 4, seed=5, workers=workers)
        loader.sampler.set_epoch(epoch)
        return torch.cat([x for x, _ in loader])

    first = batches(0, 0)
    assert torch.equal(first, batches(0, 0))
    assert torch.equal(first, batches(2, 0))  # worker processes give the same pixels
    assert not torch.equal(first, batches(0, 1))
    plain = torch.stack([ImageDataset(index.root, *index.part(ids), 32)[i][0] for i in ids])
    assert not torch.equal(first.sort(0).values, plain.sort(0).values)  # augmentations did something


def test_image_dataset_works_with_a_plain_int_index_in_any_dataloader(demo_data):
    index = index_data(demo_data, workers=1)
    ds = ImageDataset(index.root, *index.part([0, 1, 2, 40]), 24, train_augment())
    x, y = next(iter(DataLoader(ds, batch_size=4, shuffle=True, num_workers=0)))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.uint8
    assert sorted(y.tolist()) == sorted(index.targets[[0, 1, 2, 40]].tolist())


def test_sampler_shards_only_when_asked_and_the_shards_make_up_the_whole_order():
    whole = list(SeededSampler(10, seed=3))
    assert len(whole) == 10 and sorted(i for i, _ in whole) == list(range(10))
    shards = [list(SeededSampler(10, seed=3, rank=r, world=3)) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # the tail that does not divide by 3 is dropped
    interleaved = [shards[r][k] for k in range(3) for r in range(3)]
    assert interleaved == whole[:9]  # rank r takes positions r, r + 3, ... with the same seeds


def test_a_last_batch_of_one_image_is_dropped_so_batchnorm_can_train(demo_data):
    """17 labelled images at batch 8 would leave a last batch of one, on which a ResNet's BatchNorm
    raises in training ("Expected more than 1 value per channel when training"); the lone image is
    dropped, a different one each epoch."""
    index = index_data(demo_data, workers=1)

    def sizes(n: int) -> list[int]:
        loader = train_loader(ImageDataset(index.root, *index.part(list(range(n))), 16), 8, seed=1, workers=0)
        return [len(y) for _, y in loader]
    assert sizes(17) == [8, 8] and sizes(18) == [8, 8, 2] and sizes(1) == [1]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    for x, _ in train_loader(ImageDataset(index.root, *index.part(list(range(17))), 16), 8, seed=1, workers=0):
        model(x.float())  # a batch of one raises here
