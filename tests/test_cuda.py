"""What only a GPU can show (marked `cuda`, skipped without one; device_check.py runs them on a GPU
machine): the steps in bf16 and fp16, the fp16 skip of a non-finite step, exact resume, --compile and
--grad-ckpt against the plain step, channels_last, fused Adam, pinned batches, GPU checkpoints on the
CPU, and the analysis scripts on CUDA."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch

# deterministic cuBLAS needs this before its first call (the resume test)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from tools import embed  # noqa: E402
import finetune  # noqa: E402
from evaluation import knn  # noqa: E402
from tools import maps  # noqa: E402
from tools import predict  # noqa: E402
import pretrain_cass  # noqa: E402
import pretrain_dino  # noqa: E402
from plumbing import pretraining  # noqa: E402
from plumbing import runtime as rt  # noqa: E402
from tools.bench import Batches, images  # noqa: E402
from conftest import TINY, interrupted_run, same_weights  # noqa: E402
from plumbing.models import from_checkpoint  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
GPU = ["--device", "cuda"]


def cuda_arms(*flags, cnn="test_resnet", vit="test_vit"):
    cfg = pretrain_cass.parse_args(["--data", "-", *TINY, "--cnn", cnn, "--vit", vit, "--epochs", "2", *flags])
    torch.manual_seed(0)
    return cfg, [pretrain_cass.build_arm("cnn", cfg.cnn, None, cfg, CUDA),
                 pretrain_cass.build_arm("vit", cfg.vit, None, cfg, CUDA)]


def cass_epoch(cfg, arms, x, steps: int = 3) -> dict:
    dtype = rt.amp_dtype(cfg.amp, CUDA)
    return pretrain_cass.train_one_epoch(arms, Batches((x, None), steps), rt.grad_scaler(CUDA, dtype), cfg, CUDA,
                                         dtype, 0)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cass_step_in_half_precision_moves_both_arms_with_fused_adam_and_channels_last(amp):
    cfg, arms = cuda_arms("--amp", amp)
    before = [{k: v.detach().clone() for k, v in arm.model.named_parameters()} for arm in arms]
    stats = cass_epoch(cfg, arms, images(8, 32, CUDA))
    assert math.isfinite(stats["loss"]) and stats["images"] == 24 and stats["peak_mem_gb"] > 0
    for arm, old in zip(arms, before):  # the weights, not BatchNorm's running statistics, which any forward moves
        assert any(not torch.equal(v, old[k]) for k, v in arm.model.named_parameters()), arm.name
        assert arm.opt.defaults["fused"] is True
    convs = [p for p in arms[0].model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_fp16_skips_and_counts_an_inf_step_and_the_epoch_goes_on(monkeypatch):
    """One GradScaler over both optimisers: the step whose loss is inf is skipped, not counted among the
    epoch's images, and the steps after it run."""
    real, calls = pretrain_cass.cass_loss, iter(range(1, 100))
    monkeypatch.setattr(pretrain_cass, "cass_loss", lambda r, t: real(r, t) * (math.inf if next(calls) == 2 else 1))
    cfg, arms = cuda_arms("--amp", "fp16")
    stats = cass_epoch(cfg, arms, images(8, 32, CUDA))
    assert stats["images"] == 16 and math.isfinite(stats["loss"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_dino_and_fine_tuning_steps_in_half_precision(demo_data, cuda_run, tmp_path, amp):
    out = pretrain_dino.main(pretrain_dino.parse_args(
        ["--data", str(demo_data), "--out", str(tmp_path / "dino"), "--arch", "test_vit", "--no-pretrained",
         "--img-size", "32", "--bs", "8", "--workers", "0", "--epochs", "1", "--out-dim", "256", "--local-crops",
         "2", "--amp", amp, *GPU]))
    (record,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert math.isfinite(record["loss"]) and record["peak_mem_gb"] > 0
    results = finetune.main(finetune.parse_args(["--ckpt", str(cuda_run / "cnn.pt"), "--out", str(tmp_path / "ft"),
                                                 "--epochs", "1", "--workers", "0", "--amp", amp, "--resamples", "100",
                                                 *GPU]))
    assert 0 <= results["runs"][0]["test"]["macro_f1"] <= 1
    source = torch.load(cuda_run / "cnn.pt", map_location="cpu", weights_only=True)["state_dict"]
    tuned = torch.load(tmp_path / "ft" / "model_seed0.pt", map_location="cpu", weights_only=True)["state_dict"]
    shared = [k for k, v in source.items() if k in tuned and tuned[k].shape == v.shape and v.is_floating_point()]
    assert shared and any(not torch.equal(tuned[k], source[k]) for k in shared)  # the new head aside


def test_compile_and_grad_ckpt_give_the_plain_loss_and_grad_ckpt_less_memory():
    """fp32, first step: every variant sees the same weights and batch. torch.compile fuses and reorders
    float reductions, so the losses agree to a relative 1e-3, not bit for bit."""
    models = dict(cnn="resnet18", vit="vit_tiny_patch16_224")  # activations large enough to matter
    x = images(32, 128, CUDA)
    stats, benchmark = {}, torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # its trial workspaces would count in the peaks compared
    try:
        for name, flags in (("plain", []), ("grad_ckpt", ["--grad-ckpt"]), ("compile", ["--compile"])):
            cfg, arms = cuda_arms("--amp", "off", "--img-size", "128", "--bs", "32", *flags, **models)
            stats[name] = cass_epoch(cfg, arms, x, steps=1)
            del arms  # the next variant's peak holds its own models alone
            torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.benchmark = benchmark
    assert stats["compile"]["loss"] == pytest.approx(stats["plain"]["loss"], rel=1e-3)
    assert stats["grad_ckpt"]["loss"] == pytest.approx(stats["plain"]["loss"], rel=1e-5)
    assert stats["grad_ckpt"]["peak_mem_gb"] < stats["plain"]["peak_mem_gb"]


def test_resume_after_a_stop_on_cuda_is_exact(demo_data, tmp_path):
    """Deterministic algorithms on: the resumed run ends with exactly the weights of an uninterrupted one."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        def argv(out):
            return pretrain_cass.parse_args(["--data", str(demo_data), "--out", str(out), *TINY, "--epochs", "3",
                                             "--knn-every", "0", *GPU])
        pretrain_cass.main(argv(tmp_path / "full"))
        interrupted_run(pretrain_cass, argv(tmp_path / "run"), epoch=2)
        pretrain_cass.main(pretrain_cass.parse_args(["--resume", str(tmp_path / "run"), "--workers", "0"]))
    finally:
        torch.use_deterministic_algorithms(False)
    for role in ("cnn", "vit"):
        assert same_weights(tmp_path / "full" / f"{role}.pt", tmp_path / "run" / f"{role}.pt"), role


@pytest.fixture(scope="module")
def cuda_run_and_loader(demo_data, tmp_path_factory):
    """A two-epoch CASS run folder on CUDA, and the training loader it built."""
    real, loaders = pretraining.train_loader, []

    def kept(*a, **k):
        loaders.append(real(*a, **k))
        return loaders[-1]

    pretraining.train_loader = kept  # pretrain_cass calls it through the module
    try:
        out = pretrain_cass.main(pretrain_cass.parse_args(
            ["--data", str(demo_data), "--out", str(tmp_path_factory.mktemp("gpu") / "cass"), *TINY, "--epochs",
             "2", *GPU]))
    finally:
        pretraining.train_loader = real
    return out, loaders[0]


@pytest.fixture(scope="module")
def cuda_run(cuda_run_and_loader):
    return cuda_run_and_loader[0]


def test_loader_pins_memory_and_a_gpu_checkpoint_loads_on_the_cpu(cuda_run_and_loader):
    cuda_run, loader = cuda_run_and_loader
    x, _ = next(iter(loader))
    assert loader.pin_memory and x.is_pinned()
    for role in ("cnn", "vit"):
        ckpt = torch.load(cuda_run / f"{role}.pt", weights_only=True)  # no map_location: tensors load where saved
        assert all(v.device.type == "cpu" for v in ckpt["state_dict"].values())
        from_checkpoint(ckpt)  # strict keys


def test_predict_maps_knn_and_embed_on_cuda(cuda_run, demo_data, tmp_path):
    tuned = []
    for role in ("cnn", "vit"):
        finetune.main(finetune.parse_args(["--ckpt", str(cuda_run / f"{role}.pt"), "--out", str(tmp_path / role),
                                           "--epochs", "1", "--workers", "0", "--resamples", "100", *GPU]))
        tuned.append(tmp_path / role / "model_seed0.pt")
    csv = predict.main(predict.parse_args(["--ckpt", *map(str, tuned), "--images", str(demo_data / "rings"),
                                           "--out", str(tmp_path / "p.csv"), "--workers", "0", *GPU]))
    assert len(csv.read_text().splitlines()) > 1
    averages = maps.main(maps.parse_args(["--ckpt", str(tuned[1]), str(tuned[0]), "--n", "2",
                                          "--out", str(tmp_path / "maps"), "--workers", "0", *GPU]))
    assert all(np.isfinite(a).all() for a in averages.values())
    assert 0 <= knn.main(knn.parse_args(["--ckpt", str(cuda_run / "vit.pt"), "--workers", "0", *GPU])) <= 1
    embed.main(embed.parse_args(["--ckpt", str(cuda_run / "vit.pt"), "--images", str(demo_data),
                                 "--out", str(tmp_path / "emb"), "--workers", "0", *GPU]))
    assert np.isfinite(np.load(tmp_path / "emb" / "embeddings.npy")).all()
