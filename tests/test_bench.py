import argparse
import json

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from tools import bench, memory
from plumbing.models import normalise

CPU = torch.device("cpu")


def test_bench_derives_its_ratios_from_its_own_measurements_and_writes_them(tmp_path):
    result = bench.main(bench.parse_args(
        ["--images", "6", "--loader-passes", "1", "--image-px", "120", "90", "--steps", "1", "--out-dim", "256",
         "--local-crops", "2", "--img-size", "32", "--bs", "4", "--workers", "0", "--device", "cpu",
         "--eval-images", "300", "--out", str(tmp_path)]))
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result, default=str))
    assert result["config"]["img_size"] == 32 and result["device"] == "cpu"
    # the paper's Table 2 claim as one number: CASS's time per image over DINO-CNN's plus DINO-ViT's
    per_image = {k: 1 / result[f"{k}_ips"] for k in ("cass", "dino_cnn", "dino_vit")}
    assert result["cass_dino_time_ratio"] == pytest.approx(per_image["cass"] / (per_image["dino_cnn"]
                                                                                 + per_image["dino_vit"]))
    assert result["loader_speedup"] == pytest.approx(result["loader_cached_ips"] / result["loader_plain_ips"])
    assert result["achieved_tflops"] == pytest.approx(result["cass_gflop_per_image"] * 1e9 * result["cass_ips"] / 1e12)
    assert result["fraction_of_peak"] == pytest.approx(result["achieved_tflops"] / result["matmul_peak_tflops"])
    assert result["evaluate_s"] > 0 and result["aug_paper_ms"] > 0 and result["blur_torchvision_over_pillow"] > 0
    jpegs = sorted((tmp_path / "jpegs").rglob("*.jpg"))
    assert len(jpegs) == 6 and {Image.open(p).size for p in jpegs} == {(120, 90)}


def test_flops_are_per_image_and_count_the_backward_pass():
    """A FLOP count divided by the wrong batch, or of the forward pass only,
    would mislead the fraction-of-peak figure by the same factor."""
    args = argparse.Namespace(cnn="test_resnet", vit="test_vit", img_size=32, bs=4, steps=1)
    arms = bench.cass_speed(args, CPU, None)["arms"]
    per_image = bench.cass_flops_per_image(arms, args, CPU, None)
    assert bench.cass_flops_per_image(arms, argparse.Namespace(**{**vars(args), "bs": 8}), CPU, None) == \
        pytest.approx(per_image, rel=1e-6)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)  # BatchNorm in train mode needs two
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        for arm in arms:
            arm.model(normalise(x, arm.mean, arm.std))
    # backward costs about twice the forward (less for the first layer, whose input needs no gradient)
    assert 2.5 < per_image / (forward.get_total_flops() / 2) <= 3.0


def test_memory_estimate_counts_saved_activations_on_fake_tensors():
    """Per image, bf16 keeps less than fp32 and gradient checkpointing far less; a batch of 8 keeps twice what
    a batch of 4 does (nearly); a larger card holds a larger batch; the state is 5 fp32 copies of the weights."""
    est = memory.memory_estimate("test_resnet", "test_vit", 64, 4)
    assert est["estimated"] is True
    for amp in ("bf16", "off"):
        plain, ckpt = (est[f"activation_gib_per_image_amp_{amp}_ckpt_{c}"] for c in (False, True))
        assert 0 < ckpt < plain
        batches = [est[f"largest_batch_{gb}gb_amp_{amp}_ckpt_False"] for gb in memory.CARDS_GB]
        assert batches == sorted(batches) and batches[0] < batches[-1]
    assert est["activation_gib_per_image_amp_bf16_ckpt_False"] < est["activation_gib_per_image_amp_off_ckpt_False"]
    arm = bench.pretrain_cass.build_arm("cnn", "test_resnet", None, bench.pretrain_cass.parse_args(
        ["--data", "-", "--cnn", "test_resnet", "--img-size", "64", "--no-pretrained"]), CPU)
    four, eight = (memory.saved_activation_gib(arm.model, bs, 64, None) for bs in (4, 8))
    assert 1.8 < eight / four <= 2  # BatchNorm's statistics and the like do not grow with the batch
    params = sum(p.numel() for name in ("test_resnet", "test_vit") for p in bench.pretrain_cass.build_arm(
        "cnn", name, None, bench.pretrain_cass.parse_args(["--data", "-", "--img-size", "64", "--no-pretrained"]),
        CPU).model.parameters())
    assert est["state_gib"] == pytest.approx(params * 4 * 5 / 2**30)
