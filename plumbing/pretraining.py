"""What runs around a pretraining run's epochs (pretrain_cass.py, pretrain_dino.py): its start (settings
fresh, demo or resumed; the demo's images; the checks a run makes before it trains), its folder, data, split and
loader, its last.pt (when it is written, what it restores, and what Ctrl-C does) and the backbones it saves.
Device, precision and torchrun are in runtime.py, the step's guard and the epoch's usage in loop.py."""
from __future__ import annotations

import argparse
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from plumbing import checkpoint
from plumbing import runtime as rt
from data import DataIndex
from errors import UserError
from plumbing.flags import EXECUTION, EXECUTION_FLAGS
from plumbing.models import arch_record
from plumbing.pixels import ImageCache
from plumbing.pixels import train_loader as seeded_loader
from plumbing.splits import select


PATHS = ("data", "out", "cache_dir", "cnn_weights", "vit_weights", "weights")  # recorded absolute, where set


def absolute(path: str | Path) -> str:
    """A path as a run records it: absolute, so that it means the same from any working folder."""
    return str(Path(path).expanduser().resolve())


def run_settings(args: argparse.Namespace, method: str) -> tuple[argparse.Namespace, dict | None]:
    """The run's effective settings (a new namespace; `args` is never changed) and, when resuming, the
    saved state. A new run records its PATHS absolute (--demo's data is out/data, `write_demo_data`). A
    resumed run continues in RUN_DIR wherever it now lies, from any working
    folder: data that lay inside the run folder moves with it. Beside --resume only flags.EXECUTION may be
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
            if name not in ("resume", *EXECUTION) and not same:
                raise UserError(f"--{name.replace('_', '-')} {value} would change the resumed run, which has "
                                f"{saved.get(name)}; beside --resume only "
                                + EXECUTION_FLAGS + " may be given")
        data, old_out = Path(saved["data"]), Path(saved["out"])
        if data.is_relative_to(old_out):
            data = run / data.relative_to(old_out)
        # flags added since the run was saved take their defaults: the run never used them; an EXECUTION flag
        # typed now wins
        defaults = {k: v for k, v in vars(args).items() if k != "typed"}
        typed = {k: absolute(v) if k in PATHS and v is not None else v for k, v in args.typed.items()
                 if k in EXECUTION}
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
    rt.main_first(lambda: make_demo_dataset(Path(cfg.data), seed=cfg.seed))


def make_run_folder(cfg: argparse.Namespace) -> Path:
    """cfg.out, made by rank 0 and proven writable, holding args.json (the settings)."""
    out = Path(cfg.out)
    if rt.is_main():
        checkpoint.prepare_out_dir(out)
        checkpoint.write_json(out / "args.json", vars(cfg))
    return out


def start_run(args: argparse.Namespace, method: str,
              settle: Callable[[argparse.Namespace], argparse.Namespace]) -> tuple:
    """A pretraining run's start: the run's settings (fresh, demo or resumed: run_settings), the process
    (rt.start_process, as the settings say), the demo's images, `settle(cfg)` (the script's own checks, and
    settings it completes), the settings printed, and where the run folder will be (made once the run really
    starts, by run_data; shown writable now). (cfg, saved state or None, device, run folder)."""
    cfg, state = run_settings(args, method)
    device = rt.start_process(args, running=cfg)  # a resumed run's own --device, --threads and --workers
    if state:
        print(f"resuming {args.resume} after epoch {state['epoch']}; settings come from the run")
    if cfg.demo:
        write_demo_data(cfg)
    cfg = settle(cfg)
    check_run(cfg)
    rt.print_args(cfg)
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


def run_data(cfg: argparse.Namespace, state: dict | None, out: Path, mode: str,
             size: int) -> tuple[DataIndex, dict, dict[str, list[int]], ImageCache | None]:
    """A pretraining run's data: every image indexed and fingerprinted, the run's split (a resumed run's own,
    else a new seeded one, Sec. 4.1), with --cache on the decode-once cache of `mode` images at `size`
    (image_cache); then the run folder with args.json and splits.json; each split's image ids."""
    index = rt.index_and_fingerprint(cfg)
    splits = state["splits"] if state else rt.new_split(index, cfg)
    cache = rt.image_cache(index, mode, size, cfg.cache_dir, cfg.workers, cfg.intensity) if cfg.cache == "on" else None
    if rt.is_main():  # the run really starts: its folder appears
        make_run_folder(cfg)
        rt.write_splits(out, index, splits, seed=cfg.seed)
    return index, splits, select(index, splits), cache


def train_loader(dataset: Dataset, cfg: argparse.Namespace, device: torch.device) -> DataLoader:
    """A pretraining run's loader (pixels.train_loader): this process's share of the seeded batches, full
    batches only, pinned memory on CUDA."""
    return seeded_loader(dataset, cfg.bs, seed=cfg.seed, workers=cfg.workers, rank=rt.rank(), world=rt.world_size(),
                         drop_last=True, pin_memory=device.type == "cuda")


def save_backbone(path: Path, model: nn.Module, cfg: argparse.Namespace, index: DataIndex, splits: dict, *,
                  arch: str, mean: list[float], std: list[float], method: str, role: str, **extra) -> None:
    """A pretrained backbone (cnn.pt / vit.pt) that finetune.py loads on its own: the network, its architecture
    (with what rebuilds it without the folder or the Hub: models.arch_record), input size and normalisation, the
    data, split and classes it was pretrained on, the run's settings and `extra`."""
    checkpoint.save(checkpoint.model_record(
        model, arch=arch, img_size=cfg.img_size, mean=mean, std=std, method=method, role=role,
        data=str(index.source), splits=splits, classes=index.classes, multilabel=index.multilabel, args=vars(cfg),
        epoch=cfg.epochs, intensity=cfg.intensity, **extra, **arch_record(arch)), path)


class Saves:
    """A pretraining run's last.pt: what it restores, when it is written, and what Ctrl-C does. last.pt (1.8 GB
    at the paper's setting, seconds of an epoch that takes 2-3 s on a fast GPU) is written after an epoch once
    --save-minutes have passed since the last write (0: every epoch), after every --save-every-th epoch (0: by
    time only), after the last epoch, and when Ctrl-C asked the run to stop: the first Ctrl-C lets the epoch
    under way finish, saves it and ends the run with exit code 130; a second stops at once, last.pt holding the
    last saved epoch. `resumable` is what it keeps (checkpoint.resume_record). Used as a context manager around
    the epoch loop, by every process."""

    def __init__(self, out: Path, cfg: argparse.Namespace, device: torch.device, method: str, resumable: dict,
                 splits: dict):
        self.path, self.cfg, self.device, self.method, self.resumable, self.splits = \
            out / "last.pt", cfg, device, method, resumable, splits
        self.stop_asked, self.since = False, time.monotonic()

    def restore(self, state: dict | None) -> int:
        """The first epoch to train: 0 for a fresh run; for a resumed one, after its saved state is loaded into
        `resumable` (checkpoint.restore) and the log lines of later epochs are dropped (rank 0)."""
        if state:
            checkpoint.restore(self.resumable, state)
        start = state["epoch"] if state else 0
        if rt.is_main():
            checkpoint.keep_log_until(self.path.parent / "log.jsonl", start)
        return start

    def __enter__(self) -> "Saves":
        self.previous = signal.signal(signal.SIGINT, self._ask) \
            if threading.current_thread() is threading.main_thread() else None
        return self

    def _ask(self, signum, frame) -> None:
        if self.stop_asked:
            raise KeyboardInterrupt
        self.stop_asked = True
        print("\nstopping after this epoch, which will be saved (Ctrl-C again to stop at once)", flush=True)

    def after_epoch(self, epoch: int) -> None:
        """Rank 0 writes last.pt when one is due after 0-based `epoch`, timed; a stop asked of any process ends
        every one (one all-reduce an epoch)."""
        stop = rt.all_reduce_sum(torch.tensor(float(self.stop_asked), device=self.device)).item() > 0
        due = (stop or epoch + 1 == self.cfg.epochs or (self.cfg.save_every and (epoch + 1) % self.cfg.save_every == 0)
               or time.monotonic() - self.since >= 60 * self.cfg.save_minutes)
        if due and rt.is_main():
            start = time.perf_counter()
            checkpoint.save(checkpoint.resume_record(self.method, epoch + 1, vars(self.cfg), self.splits,
                                                     self.resumable),
                            self.path)
            print(f"saved {self.path} (epoch {epoch + 1}) in {time.perf_counter() - start:.1f} s", flush=True)
        if due:
            self.since = time.monotonic()
        if stop:
            print(f"stopped: continue with --resume {self.path.parent}", flush=True)
            raise SystemExit(130)

    def __exit__(self, kind, error, trace) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if kind is KeyboardInterrupt:
            saved = self.path.is_file()
            print(f"\ninterrupted; {self.path} holds the last saved epoch: continue with --resume "
                  f"{self.path.parent}" if saved else
                  "\ninterrupted before the first save: nothing to resume, start the run again", flush=True)
            raise SystemExit(130) from None
