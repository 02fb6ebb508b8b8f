"""export.py --onnx: one ONNX file takes 0..1 RGB at the checkpoint's size and gives
the checkpoint's logits (a backbone's pre-logit features) with what predict.py needs
in its metadata; predict.py runs it with onnxruntime and writes the checkpoint's CSV."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from plumbing import checkpoint
from tools import export
from tools import predict
from data import index_data
from errors import UserError
from plumbing.models import from_checkpoint, normalise, pre_logits
from plumbing.pixels import ImageDataset, load_resized, to_chw



def to_onnx(ckpt_path: Path, out: Path) -> Path:
    return export.main(export.parse_args(["--onnx", "--ckpt", str(ckpt_path), "--out", str(out)]))


@pytest.fixture(scope="module")
def onnx_files(finetuned, tmp_path_factory) -> list[Path]:
    """The fine-tuned CNN and ViT, each as an ONNX file."""
    out = tmp_path_factory.mktemp("onnx")
    return [to_onnx(path, out / f"{path.parent.name}.onnx") for path in finetuned]


@pytest.mark.parametrize("role", [0, 1], ids=["cnn", "vit"])
def test_onnx_logits_on_image_files_match_pytorch(finetuned, onnx_files, demo_data, role):
    """Read as predict.py reads (bs 59 of 60 images: a last batch of 1 tests the dynamic batch axis);
    the max abs difference of the fp32 logits is printed (pytest -s) and at most 1e-4."""
    index = index_data(demo_data)

    def dataset_for(size, intensity):
        return ImageDataset(index.root, index.paths, index.targets, size, intensity=intensity)

    members = checkpoint.load(finetuned[role], kind="model"), predict.load_onnx(str(onnx_files[role]))
    ours, theirs = (predict.logits_of(member, dataset_for, torch.device("cpu"), 59, 0) for member in members)
    assert theirs.shape == ours.shape == (60, 4)
    diff = np.abs(theirs - ours).max()
    print(f"{finetuned[role].parent.name}: max abs logit difference ONNX Runtime vs PyTorch {diff:.2e}")
    assert diff <= 1e-4
    assert np.abs(ours).max() > 1e-2  # logits that are not all ~0, so the bound says something


def test_onnx_metadata_carries_what_prediction_needs(finetuned, onnx_files):
    ckpt = checkpoint.load(finetuned[1], kind="model")
    member = predict.load_onnx(str(onnx_files[1]))
    assert {"classes", "multilabel", "temperature", "img_size", "intensity", "mean", "std"} <= member.keys()
    for key in export.ONNX_FIELDS:
        assert member.get(key) == json.loads(json.dumps(ckpt.get(key))), key
    assert member["output"] == "logits"
    (image,) = member["onnx"].get_inputs()
    assert image.name == "image" and image.type == "tensor(float)" and image.shape[1:] == [3, 32, 32]
    assert not isinstance(image.shape[0], int)  # the batch axis is dynamic


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("calibrated", [[], ["--calibrated"]], ids=["raw", "calibrated"])
def test_predict_writes_the_same_csv_from_onnx_files_as_from_checkpoints(finetuned, onnx_files, demo_data, tmp_path,
                                                                          calibrated):
    """The CNN + ViT ensemble as checkpoints, as ONNX files and as one of each: the same rows and
    decisions, probabilities equal to the 6 written decimals up to the last one."""
    rows = []
    for name, members in (("pt", finetuned), ("onnx", onnx_files), ("mixed", [finetuned[0], onnx_files[1]])):
        out = tmp_path / f"{name}.csv"
        predict.main(predict.parse_args(["--ckpt", *map(str, members), "--images", str(demo_data), "--out", str(out),
                                         "--workers", "0", "--device", "cpu", *calibrated]))
        rows.append(read_csv(out))
    pt, *others = rows
    assert len(pt) == 60
    for table in others:
        assert [(r["path"], r["prediction"]) for r in table] == [(r["path"], r["prediction"]) for r in pt]
    probs = [np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in table]) for table in rows]
    for p in probs[1:]:
        np.testing.assert_allclose(p, probs[0], atol=2e-6)


def test_a_backbone_exports_its_pre_logit_features(cass_run, demo_data, tmp_path):
    import onnxruntime

    ckpt = checkpoint.load(cass_run / "cnn.pt", kind="model")
    session = onnxruntime.InferenceSession(str(to_onnx(cass_run / "cnn.pt", tmp_path / "cnn.onnx")),
                                           providers=["CPUExecutionProvider"])
    image = demo_data / index_data(demo_data).paths[0]
    pixels = to_chw(load_resized(image, ckpt["img_size"]))[None]
    model = from_checkpoint(ckpt).eval()
    with torch.no_grad():
        expected = pre_logits(model)(normalise(pixels, ckpt["mean"], ckpt["std"])).numpy()
    (features,) = session.run(None, {"image": pixels.numpy().astype(np.float32) / 255})
    assert features.shape == (1, model.num_features) != (1, ckpt["num_classes"])
    np.testing.assert_allclose(features, expected, atol=1e-4)
    assert json.loads(session.get_modelmeta().custom_metadata_map["output"]) == "features"
    with pytest.raises(UserError, match="pretrained backbone without a classifier"):
        predict.load_models([str(tmp_path / "cnn.onnx")])


def test_missing_onnx_packages_are_one_clear_line(finetuned, onnx_files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # None in sys.modules: `import` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'onnx>=1.17' 'onnxscript>=0.6'"):
        to_onnx(finetuned[0], tmp_path / "cnn.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"needs onnxruntime: pip install 'onnxruntime>=1.20'"):
        predict.load_models([str(onnx_files[0])])


def test_a_file_that_is_no_onnx_export_is_refused(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable ONNX file"):
        predict.load_models([str(tmp_path / "broken.onnx")])
