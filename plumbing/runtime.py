"""How a stage script runs: the device, precision and torchrun process group,
seeding, the process's start, and the data steps every stage shares (index and
fingerprint, a new split, splits.json, the decode-once cache). A pretraining run's
start, folder, data and last.pt are in pretraining.py, fine-tuning's start, folder
and data in finetuning.py; the step's guard and the epoch's usage in loop.py, the
command line in flags.py; the loops live in the stage scripts."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from plumbing import checkpoint
from data import DataIndex, drop_stale, index_data, keyed_path
from errors import UserError
from plumbing.pixels import AUTO, ImageCache, Intensity, intensity_tag, open_cache
from plumbing.splits import make_splits

T = TypeVar("T")
# how long a process waits at a collective while rank 0 alone builds the image cache, runs the kNN monitor or
# saves (NCCL's default, 10 minutes, is short of a cache of tens of thousands of large images)
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


# ------------------------------------------------- device, torchrun, precision
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


def set_threads(threads: int | None, workers: int) -> None:
    """Intra-op CPU threads. PyTorch takes every core by default, and so does
    each other run on the machine: OpenMP threads then spin against each other
    and two runs on two cores each take many times their share. By default a
    process takes the cores its torchrun share leaves beside its loader
    workers; OMP_NUM_THREADS, when set, is respected."""
    if threads == 0 or (threads is None and "OMP_NUM_THREADS" in os.environ):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads or max(1, cores // int(os.environ.get("WORLD_SIZE", 1)) - workers))


def start_distributed(device_name: str) -> torch.device:
    """The device, after joining torchrun's process group when WORLD_SIZE > 1
    (NCCL on GPUs, gloo on CPUs). Processes other than rank 0 print nothing."""
    device = pick_device(device_name)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
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
    auto: bf16 on GPUs that compute it natively (compute capability 8.0 on: Ampere, Ada, Hopper), else fp16
    (with a GradScaler); fp32 on CPU. Turing and Volta cards (the paper's RTX8000 among them) answer
    torch.cuda.is_bf16_supported() with yes by emulation, where bf16 convolutions leave cuDNN for slow kernels."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Only fp16 needs loss scaling; a disabled scaler is a no-op pass-through."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def precision(amp: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """--amp's autocast dtype (amp_dtype) and the GradScaler that goes with it."""
    dtype = amp_dtype(amp, device)
    return dtype, grad_scaler(device, dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_process(args: argparse.Namespace, running: argparse.Namespace | None = None) -> torch.device:
    """Every stage script's first step: --data shown to exist, torchrun's process group and the device, and the
    CPU threads, as `running` (a resumed run's own settings) or else `args` names them."""
    if getattr(args, "data", None) and not Path(args.data).exists():  # before any download or model
        raise UserError(f"--data {args.data} does not exist")
    running = running or args
    device = start_distributed(running.device)
    set_threads(running.threads, running.workers)
    return device


def print_args(cfg: argparse.Namespace) -> None:
    print("config: " + json.dumps(vars(cfg), default=str, sort_keys=True), flush=True)


def index_and_fingerprint(cfg: argparse.Namespace) -> DataIndex:
    """The images of cfg.data, each decoded in full once (no reduced-scale JPEG): files that cannot be
    read are dropped, the others fingerprinted for the duplicate check (fingerprints.py). With the
    cache on, the verdicts are kept in --cache-dir, so this happens once per state of the data."""
    from plumbing.fingerprints import file_fingerprint  # the duplicate check, ours: loaded where it is handled
    memo = cfg.cache_dir if cfg.cache == "on" else None

    def index() -> DataIndex:
        return index_data(cfg.data, workers=cfg.workers, memo_dir=memo, group_col=cfg.group_col,
                          fingerprint=file_fingerprint)
    return main_first(index) if memo else index()  # under torchrun the others then read rank 0's verdicts


def new_split(index: DataIndex, cfg: argparse.Namespace) -> dict:
    """A new seeded split (splits.make_splits, Sec. 4.1) with its duplicate sets listed; with
    --duplicates together each set is kept in one split."""
    from plumbing.fingerprints import duplicate_sets, list_duplicates
    sets = duplicate_sets(index) if cfg.duplicates == "together" else None  # found once, used twice
    return list_duplicates(index, make_splits(index, cfg.seed, join=sets or ()), sets)


def write_splits(out: Path, index: DataIndex, splits: dict[str, list[str]], **extra) -> None:
    """splits.json: the data set, its layout, `extra` (e.g. the seed), the classes, the skipped files,
    each image's group when the data has groups, and the split as relative paths."""
    record = {"data": str(index.source), "layout": index.layout, **extra, "classes": index.classes,
              "skipped": index.skipped, **splits}
    if index.groups and "groups" not in splits:
        record["groups"] = dict(zip(index.paths, index.groups))
    checkpoint.write_json(out / "splits.json", record)


def image_cache(index: DataIndex, mode: str, size: int, cache_dir: str, workers: int,
                intensity: Intensity = AUTO) -> ImageCache:
    """The decode-once cache of every image of `index` (pixels.open_cache),
    keyed by the files' state and the setting; caches of older states of the data are removed."""
    folder = keyed_path(cache_dir, index.root, index.paths, f"{mode}{size}{intensity_tag(intensity)}")
    cache = main_first(lambda: open_cache(folder, index.root, index.paths, mode, size, workers, intensity))
    if is_main():
        drop_stale(folder)
    return cache
