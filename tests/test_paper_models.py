"""The paper's architectures (Sec. 3.1: ResNet-50 and ViT-B/16 at 384 px), random init, on the CPU: one
CASS step on two images, the checkpoints written, the ViT's reloaded and fine-tuned for one step. A timm
release that renames, reshapes or drops either model fails here rather than in someone's 100-epoch run.
The smallest run the claim allows (batch 2, one step each, --workers 0) still costs about a minute on two
CPU cores, most of it ViT-B/16's forward and backward at 384 px (docs/speed.md)."""
import json

import pytest
import torch

import finetune
import pretrain_cass
from conftest import write_image
from plumbing.models import from_checkpoint

pytestmark = pytest.mark.slow
PAPER = ["--cnn", "resnet50", "--vit", "vit_base_patch16_384", "--img-size", "384"]


def test_resnet50_and_vit_b16_at_384_pretrain_and_fine_tune(tmp_path):
    data = tmp_path / "data"  # a curator's split: exactly one batch of two training images
    for i, split in enumerate(("train", "val", "test")):
        for j, cls in enumerate(("a", "b")):
            write_image(data / split / cls / f"{cls}.png", size=(400, 390), seed=2 * i + j)
    run = pretrain_cass.main(pretrain_cass.parse_args(
        ["--data", str(data), "--out", str(tmp_path / "cass"), *PAPER, "--no-pretrained", "--bs", "2",
         "--epochs", "1", "--workers", "0", "--knn-every", "0", "--no-swa", "--device", "cpu"]))
    (record,) = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert record["images"] == 2 and torch.isfinite(torch.tensor(record["loss"]))
    for role, arch in (("cnn", "resnet50"), ("vit", "vit_base_patch16_384")):
        ckpt = torch.load(run / f"{role}.pt", map_location="cpu", weights_only=True)
        assert (ckpt["arch"], ckpt["img_size"], ckpt["num_classes"]) == (arch, 384, 1000)
    assert from_checkpoint(torch.load(run / "vit.pt", map_location="cpu", weights_only=True)).patch_embed \
        .img_size == (384, 384)

    results = finetune.main(finetune.parse_args(
        ["--ckpt", str(run / "vit.pt"), "--out", str(tmp_path / "ft"), "--epochs", "1", "--bs", "2",
         "--workers", "0", "--resamples", "10", "--device", "cpu"]))
    assert results["arch"] == "vit_base_patch16_384" and 0 <= results["runs"][0]["test"]["macro_f1"] <= 1
    tuned = torch.load(tmp_path / "ft" / "model_seed0.pt", map_location="cpu", weights_only=True)
    assert tuned["num_classes"] == 2 and tuned["img_size"] == 384
