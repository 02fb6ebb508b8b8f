"""How a stage script runs: the device, precision and torchrun process group,
seeding, the settings, folder, data and split of a pretraining run (fresh, demo
or resumed). What runs around the epoch loop (the step's guard, the epoch's usage,
last.pt) is in loop.py, the command line in flags.py; the loops live in the stage scripts."""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from plumbing import checkpoint
from plumbing.flags import RUNNING
from data import DataIndex, drop_stale, index_data, keyed_path
from errors import UserError
from plumbing.pixels import AUTO, ImageCache, Intensity, intensity_tag, open_cache
from plumbing.pixels import train_loader as seeded_loader
from plumbing.splits import make_splits, select

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


# --------------------------------------------------------- pretraining runs
PATHS = ("data", "out", "cache_dir", "cnn_weights", "vit_weights", "weights")  # recorded absolute, where set


def absolute(path: str | Path) -> str:
    """A path as a run records it: absolute, so that it means the same from any working folder."""
    return str(Path(path).expanduser().resolve())


def run_settings(args: argparse.Namespace, method: str) -> tuple[argparse.Namespace, dict | None]:
    """The run's effective settings (a new namespace; `args` is never changed) and, when resuming, the
    saved state. A new run records its PATHS absolute (--demo's data is out/data, `write_demo_data`). A
    resumed run continues in RUN_DIR wherever it now lies, from any working
    folder: data that lay inside the run folder moves with it. Beside --resume only flags.RUNNING may be
    typed (where and how fast the run goes on); a flag that would change the run is refused."""
    if args.resume:
        run = Path(args.resume)
        state = checkpoint.load(run / "last.pt", kind="resume")
        if state.get("method") != method:
            raise UserError(f"{args.resume} holds a {state.get('method')} run, not a {method} one")
        saved = state["args"]
        for name, value in args.typed.items():
            # a path names the same file however it is typed
            same = (absolute(value) if name in PATHS and value is not None else value) == saved.get(name)
            if name not in ("resume", *RUNNING) and not same:
                raise UserError(f"--{name.replace('_', '-')} {value} would change the resumed run, which has "
                                f"{saved.get(name)}; beside --resume only "
                                + ", ".join(f"--{n.replace('_', '-')}" for n in RUNNING) + " may be given")
        print(f"resuming {args.resume} after epoch {state['epoch']}; settings come from the run")
        data, old_out = Path(saved["data"]), Path(saved["out"])
        if data.is_relative_to(old_out):
            data = run / data.relative_to(old_out)
        # flags added since the run was saved take their defaults: the run never used them; a RUNNING flag
        # typed now wins
        defaults = {k: v for k, v in vars(args).items() if k != "typed"}
        typed = {k: absolute(v) if k in PATHS and v is not None else v for k, v in args.typed.items()
                 if k in RUNNING}
        return argparse.Namespace(**{**defaults, **saved, **typed, "resume": args.resume, "out": absolute(run),
                                     "data": absolute(data)}), state
    if not args.data and not args.demo:
        raise UserError("pass --data PATH (or --demo to try it on generated images, or --resume RUN_DIR)")
    out = args.out or (f"runs/demo-{method}" if args.demo else checkpoint.default_out(method))
    cfg = {**vars(args), "out": out, "data": Path(out) / "data" if args.demo else args.data}
    return argparse.Namespace(**{k: absolute(v) if k in PATHS and v is not None else v for k, v in cfg.items()}), None


def write_demo_data(cfg: argparse.Namespace) -> None:
    """--demo: the generated image set at cfg.data (rank 0 writes it, the others wait; a complete
    earlier copy is kept)."""
    from plumbing.demo import make_demo_dataset  # only --demo needs it
    main_first(lambda: make_demo_dataset(Path(cfg.data), seed=cfg.seed))


def make_run_folder(cfg: argparse.Namespace) -> Path:
    """cfg.out, made by rank 0 and proven writable, holding args.json (the settings)."""
    out = Path(cfg.out)
    if is_main():
        checkpoint.prepare_out_dir(out)
        checkpoint.write_json(out / "args.json", vars(cfg))
    return out


def start_process(args: argparse.Namespace) -> torch.device:
    """Every stage script's first step: --data shown to exist, torchrun's process group and the device, and the
    CPU threads."""
    if getattr(args, "data", None) and not Path(args.data).exists():  # before any download or model
        raise UserError(f"--data {args.data} does not exist")
    device = start_distributed(args.device)
    set_threads(args.threads, args.workers)
    return device


def print_args(cfg: argparse.Namespace) -> None:
    print("config: " + json.dumps(vars(cfg), default=str, sort_keys=True), flush=True)


def start_run(args: argparse.Namespace, method: str,
              settle: Callable[[argparse.Namespace], argparse.Namespace]) -> tuple:
    """A pretraining run's start: the process (start_process), the run's settings (fresh, demo or resumed:
    run_settings), the demo's images, `settle(cfg)` (the script's own checks, and settings it completes),
    the settings printed, and where the run folder will be (made once the run really starts, by
    pretraining_data; shown writable now). (cfg, saved state or None, device, run folder)."""
    device = start_process(args)
    cfg, state = run_settings(args, method)
    if cfg.demo:
        write_demo_data(cfg)
    cfg = settle(cfg)
    check_run(cfg)
    print_args(cfg)
    checkpoint.check_writable(Path(cfg.out))
    return cfg, state, device, Path(cfg.out)


def check_run(cfg: argparse.Namespace) -> None:
    if cfg.bs < 2:
        raise UserError("--bs must be at least 2: BatchNorm and the batch statistics need two images per batch")
    if not cfg.resume and not cfg.demo and (Path(cfg.out) / "last.pt").exists():
        raise UserError(f"{cfg.out} already holds a run; continue it with --resume {cfg.out} or pick another --out")


def check_disk(out: Path, models: list[nn.Module], copies: int) -> None:
    """Stop before training, not at the first save, when the disk cannot hold
    `copies` of the models' weights twice over (last.pt and its temporary file)."""
    need = 2 * copies * sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values())
    free = shutil.disk_usage(checkpoint.check_writable(out)).free  # the folder itself may not exist yet
    if free < need:
        raise UserError(f"{out} has {free / 2**30:.1f} GiB free but checkpoints need about {need / 2**30:.1f} GiB")


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
    join = duplicate_sets(index) if cfg.duplicates == "together" else ()
    return list_duplicates(index, make_splits(index, cfg.seed, join=join))


def write_splits(out: Path, index: DataIndex, splits: dict[str, list[str]], **extra) -> None:
    """splits.json: the data set, its layout, `extra` (e.g. the seed), the classes, the skipped files,
    each image's group when the data has groups, and the split as relative paths."""
    record = {"data": str(index.source), "layout": index.layout, **extra, "classes": index.classes,
              "skipped": index.skipped, **splits}
    if index.groups and "groups" not in splits:
        record["groups"] = dict(zip(index.paths, index.groups))
    checkpoint.write_json(out / "splits.json", record)


def pretraining_data(cfg: argparse.Namespace, state: dict | None, out: Path, mode: str,
                     size: int) -> tuple[DataIndex, dict, dict[str, list[int]], ImageCache | None]:
    """A pretraining run's data: every image indexed and fingerprinted, the run's split (a resumed run's own,
    else a new seeded one, Sec. 4.1), with --cache on the decode-once cache of `mode` images at `size`
    (image_cache); then the run folder with args.json and splits.json; each split's image ids."""
    index = index_and_fingerprint(cfg)
    splits = state["splits"] if state else new_split(index, cfg)
    cache = image_cache(index, mode, size, cfg.cache_dir, cfg.workers, cfg.intensity) if cfg.cache == "on" else None
    if is_main():  # the run really starts: its folder appears
        make_run_folder(cfg)
        write_splits(out, index, splits, seed=cfg.seed)
    return index, splits, select(index, splits), cache


def train_loader(dataset: Dataset, cfg: argparse.Namespace, device: torch.device) -> DataLoader:
    """A pretraining run's loader (pixels.train_loader): this process's share of the seeded batches, full
    batches only, pinned memory on CUDA."""
    return seeded_loader(dataset, cfg.bs, seed=cfg.seed, workers=cfg.workers, rank=rank(), world=world_size(),
                         drop_last=True, pin_memory=device.type == "cuda")


def image_cache(index: DataIndex, mode: str, size: int, cache_dir: str, workers: int,
                intensity: Intensity = AUTO) -> ImageCache:
    """The decode-once cache of every image of `index` (pixels.open_cache),
    keyed by the files' state and the setting; caches of older states of the data are removed."""
    folder = keyed_path(cache_dir, index.root, index.paths, f"{mode}{size}{intensity_tag(intensity)}")
    cache = main_first(lambda: open_cache(folder, index.root, index.paths, mode, size, workers, intensity))
    if is_main():
        drop_stale(folder)
    return cache
