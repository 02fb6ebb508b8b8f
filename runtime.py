"""How a training run is run: user-facing errors, device and precision, seeding,
the run folder and its JSON-lines log. Shared by every script of the project."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, ContextManager, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix (bad path, flag, checkpoint): printed as one
    sentence, exit code 2, no traceback."""


def pick_device(name: str) -> torch.device:
    """--device auto|cpu|cuda; under torchrun each process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU")
    if name == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    return device


def start_distributed(device_name: str) -> torch.device:
    """The device, after joining torchrun's process group when WORLD_SIZE > 1
    (NCCL on GPUs, gloo on CPUs). Processes other than rank 0 print nothing."""
    device = pick_device(device_name)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if not is_main():
            sys.stdout = open(os.devnull, "w")
    return device


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def main_first(make: Callable[[], T]) -> T:
    """Rank 0 makes a shared thing on disk (demo data, image cache) before the
    others open it; a plain call without torchrun."""
    if world_size() == 1:
        return make()
    result = make() if is_main() else None
    dist.barrier()
    return result if is_main() else make()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all processes (itself without torchrun)."""
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Under torchrun on GPUs, BatchNorm statistics over the global batch (small
    per-GPU batches need it); in place, the parameters stay the same objects.
    PyTorch's SyncBatchNorm runs on GPUs only: CPU processes keep their own."""
    if world_size() > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """The module a training step calls: DistributedDataParallel under torchrun."""
    if world_size() == 1:
        return model
    model = sync_batchnorm(model, device)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for --amp auto|bf16|fp16|off; None means full fp32.
    auto: bf16 on GPUs that support it, else fp16 (with a GradScaler); fp32 on CPU."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Only fp16 needs loss scaling; a disabled scaler is a no-op pass-through."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_out(prefix: str) -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_out_dir(out: Path) -> Path:
    """Create the run folder and prove it is writable before any model is built."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to output folder {out}: {err.strerror}") from None
    return out


def write_json(path: Path, obj: object) -> None:
    """Whole-file JSON, written to a temporary file and renamed so it is never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def print_args(args: argparse.Namespace) -> None:
    print("config: " + json.dumps(vars(args), default=str, sort_keys=True), flush=True)
