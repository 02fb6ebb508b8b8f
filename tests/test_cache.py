import os
import time

import numpy as np
import torch

import data
from plumbing import runtime
from conftest import class_folders, write_image
from data import index_data, keyed_path
from plumbing.pixels import ImageCache, ImageDataset, load_image, open_cache, train_augment, train_loader


def cache_of(index, mode, size, folder):
    return runtime.image_cache(index, mode, size, folder, workers=2)


def test_cached_path_yields_the_same_pixels_and_augmentations_as_the_plain_path(tmp_path):
    class_folders(tmp_path / "d", {"a": 4, "b": 4}, ext="jpg")
    write_image(tmp_path / "d" / "a" / "big.png", "RGBA", size=(300, 170))
    write_image(tmp_path / "d" / "b" / "mri.tif", "I;16", size=(64, 64))
    index = index_data(tmp_path / "d", workers=1)
    cache = cache_of(index, "square", 48, tmp_path / "cache")
    for augment in (None, train_augment()):
        plain = ImageDataset(index.root, index.paths, index.targets, 48, augment)
        cached = ImageDataset(index.root, index.paths, index.targets, 48, augment, cache)
        for i in range(len(index.paths)):
            torch.manual_seed(7)
            x = plain[i][0]
            torch.manual_seed(7)
            assert torch.equal(x, cached[i][0]), index.paths[i]
    # loader workers open the memory map themselves and draw the same augmentations
    batches = [torch.cat([x for x, _ in train_loader(ImageDataset(index.root, index.paths, index.targets, 48,
                                                                  train_augment(), c), 4, seed=1, workers=w)])
               for c, w in ((None, 0), (cache, 2))]
    assert torch.equal(*batches)


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path):
    class_folders(tmp_path / "d", {"a": 3}, ext="png")
    index = index_data(tmp_path / "d", workers=1)
    first = cache_of(index, "square", 16, tmp_path / "cache")
    assert cache_of(index, "square", 16, tmp_path / "cache").folder == first.folder
    target = tmp_path / "d" / "a" / "a_0.png"
    write_image(target, value=255)  # same name, new content
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    index = index_data(tmp_path / "d", workers=1)
    second = cache_of(index, "square", 16, tmp_path / "cache")
    assert second.folder != first.folder and not first.folder.exists()  # the stale cache is removed
    assert (second["a/a_0.png"] == 255).all()
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_fit_mode_keeps_aspect_ratio_and_caps_the_longer_side(tmp_path):
    write_image(tmp_path / "d" / "wide.png", size=(200, 100))
    write_image(tmp_path / "d" / "small.png", size=(30, 20))
    index = index_data(tmp_path / "d", workers=1)
    cache = open_cache(keyed_path(tmp_path / "cache", index.root, index.paths, "fit64"), index.root, index.paths,
                       "fit", 64, workers=1)
    shapes = {p: tuple(cache[p].shape) for p in index.paths}
    assert shapes == {"wide.png": (32, 64, 3), "small.png": (20, 30, 3)}
    small = np.asarray(load_image(tmp_path / "d" / "small.png"))
    assert np.array_equal(cache["small.png"], small)
    assert len(ImageCache(cache.folder)) == 2


def test_image_check_verdicts_are_remembered_until_a_file_changes(tmp_path, monkeypatch):
    class_folders(tmp_path / "d", {"a": 3}, ext="png")
    (tmp_path / "d" / "a" / "empty.png").write_bytes(b"")
    first = index_data(tmp_path / "d", workers=1, memo_dir=tmp_path / "cache")
    assert [s["path"] for s in first.skipped] == ["a/empty.png"]

    def no_decoding(path):
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setattr(data, "unreadable_reason", no_decoding)
    again = index_data(tmp_path / "d", workers=1, memo_dir=tmp_path / "cache")
    assert again.paths == first.paths and again.skipped == first.skipped
    monkeypatch.undo()
    write_image(tmp_path / "d" / "a" / "new.png")
    changed = index_data(tmp_path / "d", workers=1, memo_dir=tmp_path / "cache")
    assert "a/new.png" in changed.paths
    assert len(list((tmp_path / "cache").glob(f"*-checked{data.CHECK_VERSION}-*"))) == 1  # the stale verdicts are gone
