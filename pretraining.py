"""What the two pretraining scripts (CASS, DINO) share: the demo / resume /
fresh-run settings, the run folder and its files, the train-split loader, and
the epoch loop's bookkeeping (reseeding, log line, collapse warning, last.pt)."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

import checkpoint
import demo
from cache import open_cache
from data import DataIndex, ImageDataset, index_data, make_loader, make_splits, select
from cli import non_negative_int, positive_int
from runtime import (UserError, all_reduce_sum, amp_dtype, append_jsonl, default_out, is_main, main_first,
                     prepare_out_dir, print_args, seed_everything, start_distributed, write_json)


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--demo", action="store_true",
                   help="generate a small image set and default to tiny models (no data, GPU or internet needed)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt "
                   "(its own settings are used; only --workers and --device may change)")
    p.add_argument("--save-every", type=positive_int, default=1,
                   help="write last.pt every N epochs (and after the last one)")
    p.add_argument("--knn-every", type=non_negative_int, default=10,
                   help="every N epochs, log the weighted kNN accuracy (k 20) of frozen features on the val "
                        "split, for labelled single-label data (0: never)")


def parse(p: argparse.ArgumentParser, argv: list[str] | None, demo_models: dict) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.demo:  # the demo's settings become defaults, so explicit flags still win
        p.set_defaults(**demo.SETTINGS, **demo_models)
        args = p.parse_args(argv)
    return args


def start(args: argparse.Namespace, method: str) -> tuple[torch.device, argparse.Namespace, dict | None]:
    """Join torchrun's process group if there is one; the device, the run's
    effective settings (a new namespace) and, when resuming, the saved state."""
    device = start_distributed(args.device)
    return (device, *resolve(args, method))


def resolve(args: argparse.Namespace, method: str) -> tuple[argparse.Namespace, dict | None]:
    """The run's effective settings (a new namespace) and, when resuming, the saved state."""
    if args.resume:
        state = checkpoint.load(Path(args.resume) / "last.pt", kind="resume")
        if state.get("method") != method:
            raise UserError(f"{args.resume} holds a {state.get('method')} run, not a {method} one")
        saved = dict(state["args"], workers=args.workers, device=args.device, resume=args.resume)
        print(f"resuming {args.resume} after epoch {state['epoch']}; settings come from the run")
        return argparse.Namespace(**saved), state
    if args.demo:
        out = args.out or f"runs/demo-{method}"
        data = main_first(lambda: demo.make_demo_dataset(Path(out) / "data", seed=args.seed))
        return argparse.Namespace(**{**vars(args), "data": str(data), "out": out}), None
    if not args.data:
        raise UserError("pass --data PATH (or --demo to try it on generated images, or --resume RUN_DIR)")
    return argparse.Namespace(**{**vars(args), "out": args.out or str(default_out(method))}), None


def check_out(cfg: argparse.Namespace) -> None:
    if cfg.bs < 2:
        raise UserError("--bs must be at least 2: BatchNorm and the batch statistics need two images per batch")
    if not cfg.resume and not cfg.demo and (Path(cfg.out) / "last.pt").exists():
        raise UserError(f"{cfg.out} already holds a run; continue it with --resume {cfg.out} or pick another --out")


def setup(cfg: argparse.Namespace, device: torch.device) -> tuple[Path, torch.dtype | None]:
    """Print the settings, create the run folder (rank 0), seed, pick the precision."""
    print_args(cfg)
    out = prepare_out_dir(Path(cfg.out)) if is_main() else Path(cfg.out)
    seed_everything(cfg.seed)
    return out, amp_dtype(cfg.amp, device)


def check_disk(out: Path, models: list[torch.nn.Module], copies: int) -> None:
    """Stop before training, not at the first save, when the disk cannot hold
    `copies` of the models' weights twice over (last.pt and its temporary file)."""
    need = 2 * copies * sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values())
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"{out} has {free / 2**30:.1f} GiB free but checkpoints need about {need / 2**30:.1f} GiB")


def train_data(cfg: argparse.Namespace, state: dict | None, out: Path, size: int | None, augment,
               device: torch.device, cache_spec: tuple[str, int]) -> tuple[DataIndex, dict, DataLoader]:
    """Index the data, fix (or restore) the split, write splits.json and
    args.json, and return a loader over the train split only (Sec. 4.1),
    reading from the decode-once cache `cache_spec` = (mode, size) unless --cache off."""
    index = index_data(cfg.data, workers=cfg.workers, memo_dir=cfg.cache_dir if cfg.cache == "on" else None)
    splits = state["splits"] if state else make_splits(index, cfg.seed)
    if is_main():
        write_json(out / "splits.json", {"data": str(index.source), "layout": index.layout, "seed": cfg.seed,
                                         "classes": index.classes, "skipped": index.skipped, **splits})
        write_json(out / "args.json", vars(cfg))
        _keep_log_until(out / "log.jsonl", state["epoch"] if state else 0)
    train = select(index, splits)["train"]
    cache = main_first(lambda: open_cache(index, *cache_spec, cfg.cache_dir, cfg.workers)) \
        if cfg.cache == "on" else None
    loader = make_loader(ImageDataset(index, train, size, augment, cache), cfg.bs, shuffle=True, seed=cfg.seed,
                         workers=cfg.workers, drop_last=True, pin_memory=device.type == "cuda")
    return index, splits, loader


def _keep_log_until(path: Path, epoch: int) -> None:
    """Drop log lines of epochs after `epoch` (a fresh run keeps none, a resumed
    one those of the epochs its last.pt holds)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= epoch]
        path.write_text("".join(line + "\n" for line in lines))


def run_epochs(cfg: argparse.Namespace, out: Path, start: int, train_epoch: Callable[[int], dict],
               resume_state: Callable[[int], dict], describe: Callable[[dict], str], collapse_warning: str,
               monitor: Callable[[], dict]) -> None:
    """Epochs `start`..cfg.epochs-1: each is reseeded from (seed, epoch) so a
    resumed run draws the same dropout and noise, logged as one JSON line (with
    `monitor()`'s kNN accuracies every --knn-every epochs) and, every
    --save-every epochs, followed by an atomic last.pt (rank 0 writes).
    Ctrl-C stops cleanly with the last saved epoch intact."""
    try:
        for epoch in range(start, cfg.epochs):
            seed_everything(cfg.seed * 100_003 + epoch)
            stats = train_epoch(epoch)
            if not is_main():
                continue
            if cfg.knn_every and (epoch + 1) % cfg.knn_every == 0:
                stats.update(monitor())
            append_jsonl(out / "log.jsonl", stats)
            knn = "".join(f", {k} {v:.3f}" for k, v in stats.items() if k.startswith("knn_") and v is not None)
            print(f"epoch {epoch + 1}: {describe(stats)}{knn}", flush=True)
            if stats["collapse"]:
                print(f"warning: collapse suspected: {collapse_warning}", flush=True)
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                checkpoint.save(resume_state(epoch), out / "last.pt")
    except KeyboardInterrupt:
        print(f"\ninterrupted; {out / 'last.pt'} holds the last saved epoch: continue with --resume {out}",
              flush=True)
        raise SystemExit(130) from None


def backbone_record(model: torch.nn.Module, cfg: argparse.Namespace, index: DataIndex, splits: dict, *,
                    arch: str, role: str, method: str, mean: list[float], std: list[float], **extra) -> dict:
    """A `model` checkpoint of a pretrained network, fine-tunable by finetune.py on its own."""
    return checkpoint.model_record(model, arch=arch, img_size=cfg.img_size, mean=mean, std=std, method=method,
                                   role=role, data=str(index.source), splits=splits, classes=index.classes,
                                   multilabel=index.multilabel, args=vars(cfg), epoch=cfg.epochs, **extra)


MAX_NONFINITE = 10  # consecutive skipped fp16 steps before a run is stopped


def nonfinite_streak(loss: torch.Tensor, scaler: torch.amp.GradScaler, streak: int, epoch: int, step: int) -> int:
    """0 for a finite loss. A non-finite one is skipped (the caller does no
    update) while fp16 loss scaling may recover; without scaling, or after
    MAX_NONFINITE in a row, the run stops with last.pt still holding the last
    complete epoch (never a NaN-poisoned one)."""
    if all_reduce_sum((~torch.isfinite(loss)).float()) == 0:  # every process agrees to step or to skip
        return 0
    if not scaler.is_enabled() or streak + 1 > MAX_NONFINITE:
        raise UserError(f"the loss became non-finite at epoch {epoch + 1}, step {step + 1}; last.pt holds the last "
                        "complete epoch (try a lower --lr or --amp off)")
    return streak + 1


def require_progress(images: int, epoch: int) -> None:
    """An epoch in which every step was skipped for a non-finite loss stops the run."""
    if images == 0:
        raise UserError(f"every step of epoch {epoch + 1} had a non-finite loss; last.pt holds the last complete "
                        "epoch (try a lower --lr or --amp off)")
