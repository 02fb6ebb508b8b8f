"""A user's first week (issue 29): predict.py and embed.py take image files, a groups.csv in use is reported as
applied (not as an ignored file), maps.py's titles name the run, and export.py's weights are as readable as the
config beside them."""
import csv
import stat
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from plumbing import checkpoint
from tools import embed
from tools import export
from evaluation import figures
from tools import maps
from tools import predict
from conftest import class_folders
from data import index_data
from errors import UserError
from test_pixels_formats import write_dicom


def fine_tuned(path: Path) -> Path:
    """A fine-tuned checkpoint as finetune.py saves one (random weights): timm's test_resnet with a head for the
    classes a and b, at 32 px."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(checkpoint.model_record(model, arch="test_resnet", img_size=32, mean=[0.5] * 3, std=[0.5] * 3,
                                            method="cass", role="cnn", finetuned=True, classes=["a", "b"],
                                            multilabel=False), path)
    return path


def test_predict_takes_image_files_as_well_as_a_folder(tmp_path):
    ckpt = fine_tuned(tmp_path / "run" / "finetune-cnn-frac1" / "model_seed0.pt")
    folder = class_folders(tmp_path / "cases", {"x": 2})
    write_dicom(folder / "z" / "scan.dcm", (np.arange(64) * 4).astype(np.uint8).reshape(8, 8))

    def predicted(*images: Path) -> dict[str, tuple[str, np.ndarray]]:
        out = predict.main(predict.parse_args(["--ckpt", str(ckpt), "--images", *map(str, images), "--out",
                                               str(tmp_path / "p.csv"), "--workers", "0", "--device", "cpu"]))
        with open(out, newline="") as f:
            return {r["path"]: (r["prediction"], np.array([float(r["p_a"]), float(r["p_b"])]))
                    for r in csv.DictReader(f)}

    every = predicted(folder)
    assert sorted(every) == ["x/x_0.png", "x/x_1.png", "z/scan.dcm"]
    for files, shown in (([folder / "x" / "x_1.png"], ["x_1.png"]),
                         ([folder / "x" / "x_0.png", folder / "z" / "scan.dcm"], ["x/x_0.png", "z/scan.dcm"])):
        found = predicted(*files)  # named relative to the deepest folder holding them, predicted as in the folder
        assert list(found) == shown
        for name, path in zip(shown, files):
            label, probs = found[name]
            assert label == every[path.relative_to(folder).as_posix()][0]
            assert probs == pytest.approx(every[path.relative_to(folder).as_posix()][1], abs=2e-6)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"notes.txt is not an image file \(.*\.dcm.*\); give one folder or labels "
                                        "CSV, or image files"):
        predicted(folder / "notes.txt")
    with pytest.raises(UserError, match="missing.png does not exist"):
        predicted(folder / "x" / "x_0.png", folder / "missing.png")


def test_embed_takes_image_files(tmp_path):
    ckpt = fine_tuned(tmp_path / "model_seed0.pt")
    folder = class_folders(tmp_path / "cases", {"x": 2})
    out = embed.main(embed.parse_args(["--ckpt", str(ckpt), "--images", str(folder / "x" / "x_1.png"), "--out",
                                       str(tmp_path / "emb"), "--workers", "0", "--device", "cpu"]))
    assert (out / "embeddings.csv").read_text().split() == ["path", "x_1.png"]
    assert np.load(out / "embeddings.npy").shape[0] == 1


def test_a_groups_csv_in_use_is_reported_as_applied_not_as_ignored(tmp_path, capsys):
    root = class_folders(tmp_path / "d", {"a": 3, "b": 3})
    (root / "a" / "notes.txt").write_text("x")
    listed = [("a/a_0.png", "p1"), ("a/a_1.png", "p1"), ("b/b_0.png", "p2"), ("b/b_1.png", "p3")]
    (root / "groups.csv").write_text("path,group\n" + "".join(f"{p},{g}\n" for p, g in listed))
    index = index_data(root, workers=1)
    out = capsys.readouterr().out
    assert "groups.csv: 3 groups applied to 4 images" in out and "note: 2 images are not in groups.csv" in out
    assert "ignored 1 files: .txt 1" in out  # the notes only
    assert dict(zip(index.paths, index.groups))["a/a_2.png"] == "a/a_2.png"  # unlisted: its own group


def test_maps_titles_name_the_run_folder(tmp_path, monkeypatch):
    # two fine-tuned checkpoints whose own folders and files are named alike: only the run folders differ
    ckpts = [fine_tuned(tmp_path / "runs" / run / "finetune-cnn-frac1" / "model_seed0.pt")
             for run in ("cass-first", "cass-second")]
    images = class_folders(tmp_path / "cases", {"a": 1, "b": 1})
    titles = []  # the text of every figure: its title and, for heat maps, its panels' names
    for name in ("overlay_figure", "heatmap_figure", "channel_figure"):
        monkeypatch.setattr(figures, name, lambda *args: titles.append(" ".join(
            [a for a in args if isinstance(a, str)] + [k for a in args if isinstance(a, dict) for k in a])))
    averages = maps.main(maps.parse_args(["--ckpt", *map(str, ckpts), "--images", str(images), "--n", "2", "--out",
                                          str(tmp_path / "maps"), "--workers", "0", "--device", "cpu"]))
    assert list(averages) == ["0_finetune-cnn-frac1_model_seed0", "1_finetune-cnn-frac1_model_seed0"]  # files
    assert len(titles) == 2 * 4 + 1  # per checkpoint: 2 overlays, the mean, the first convolution; compare.png
    assert all(any(f"{run}/finetune-cnn-frac1/model_seed0.pt" in t for run in ("cass-first", "cass-second"))
               for t in titles), titles
    assert "cass-first" in titles[-1] and "cass-second" in titles[-1]  # compare.png names both


def test_exported_weights_are_as_readable_as_their_config(tmp_path):
    out = export.main(export.parse_args(["--ckpt", str(fine_tuned(tmp_path / "model_seed0.pt")), "--out",
                                         str(tmp_path / "hf")]))
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert mode.keys() == {"config.json", "model.safetensors"}
    assert mode["model.safetensors"] == mode["config.json"]
