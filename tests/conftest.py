"""Shared fixtures: small images written to real files, one tiny CASS
pretraining run (timm's test_resnet + test_vit, random init, CPU) and its two
fine-tuned networks, reused by the checkpoint, fine-tuning and tool tests."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# One thread per process unless the caller says otherwise (runtime.set_threads honours it): the tiny
# models gain nothing from a second one, and OpenMP threads spinning against another process (torchrun's
# ranks, the killed-run subprocess, another test run) slow the suite many-fold on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plumbing import demo  # noqa: E402
import finetune  # noqa: E402
import pretrain_cass  # noqa: E402
from plumbing import runtime  # noqa: E402

# log.jsonl fields that measure the machine, not the run: they differ between two runs of the same settings
TIMING = ("seconds", "images_per_s", "data_wait", "peak_mem_gb")
TINY = ["--cnn", "test_resnet", "--vit", "test_vit", "--no-pretrained", "--img-size", "32",
        "--bs", "8", "--workers", "0", "--device", "cpu"]


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30), value: int | None = None,
                seed: int = 0) -> Path:
    """A real image file of the given PIL mode with random (or constant) content."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "I;16":
        arr = rng.integers(0, 4001, (h, w)).astype(np.uint16) if value is None else np.full((h, w), value, np.uint16)
        Image.fromarray(arr).save(path)  # PIL stores uint16 arrays as I;16
        return path
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8) if value is None else \
        np.full((h, w, channels), value, np.uint8)
    if mode in ("L", "P"):
        img = Image.fromarray(arr[..., 0], "L")
        img = img.convert("P") if mode == "P" else img
    else:
        img = Image.fromarray(arr, mode)
    img.save(path)
    return path


def class_folders(root: Path, counts: dict[str, int], ext: str = "png") -> Path:
    for cls, n in counts.items():
        for i in range(n):
            write_image(root / cls / f"{cls}_{i}.{ext}", seed=hash((cls, i)) % 2**32)
    return root


@pytest.fixture(scope="session", autouse=True)
def _work_in_a_temporary_folder(tmp_path_factory):
    """Default output and cache folders (runs/...) land in a temporary folder, not the checkout."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(scope="session", autouse=True)
def _device_auto_is_the_cpu():
    """--device auto takes the CPU here, also on a GPU machine: the CPU tests' exact figures and resume
    checks are the CPU's; tests/test_cuda.py names cuda."""
    real = runtime.pick_device
    runtime.pick_device = lambda name: real("cpu" if name == "auto" else name)
    yield
    runtime.pick_device = real


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    return demo.make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", per_class=15, size=40)


@pytest.fixture(scope="session")
def cass_run(demo_data, tmp_path_factory) -> Path:
    """A finished two-epoch CASS run folder."""
    out = tmp_path_factory.mktemp("runs") / "cass"
    pretrain_cass.main(pretrain_cass.parse_args(["--data", str(demo_data), "--out", str(out), "--epochs", "2",
                                                 *TINY]))
    return out


@pytest.fixture(scope="session")
def finetuned(cass_run) -> list[Path]:
    """cass_run's CNN and ViT, each fine-tuned for one epoch into finetune.py's default folder
    (cass_run/finetune-<role>-frac1), with 100 bootstrap resamples for the intervals."""
    for role in ("cnn", "vit"):
        finetune.main(finetune.parse_args(["--ckpt", str(cass_run / f"{role}.pt"), "--epochs", "1", "--workers", "0",
                                           "--resamples", "100"]))
    return [cass_run / f"finetune-{role}-frac1" / "model_seed0.pt" for role in ("cnn", "vit")]


def interrupted_run(script, args, epoch: int) -> None:
    """Run `script.main(args)` and press Ctrl-C (a real SIGINT) as 0-based `epoch - 1` starts: that epoch
    finishes, last.pt holds `epoch` epochs, and the run stops with exit code 130."""
    real = script.train_one_epoch

    def interrupted(*a, **k):
        if a[-1] == epoch - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    script.train_one_epoch = interrupted
    try:
        with pytest.raises(SystemExit) as stop:
            script.main(args)
        assert stop.value.code == 130
    finally:
        script.train_one_epoch = real


def same_weights(a: Path, b: Path) -> bool:
    sa = torch.load(a, map_location="cpu", weights_only=True)["state_dict"]
    sb = torch.load(b, map_location="cpu", weights_only=True)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
