"""What runs around a stage script's epoch loop, the loop itself staying in the script: the guard each step
passes after its forward pass (a non-finite loss skips the step in every process alike), the epoch's wait for
data, peak memory and sums over processes, and a pretraining run's last.pt: when it is written, what it
restores, and what Ctrl-C does."""
from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from errors import UserError
from plumbing import checkpoint
from plumbing.runtime import all_reduce_sum, is_main

MAX_NONFINITE = 10  # consecutive skipped half-precision steps before a run is stopped


def finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite in every process, so that all of them step or
    all skip. Reading the answer waits for the forward pass: one host sync per
    step, paid on purpose so that a NaN never reaches the weights."""
    return all_reduce_sum((~torch.isfinite(loss)).float()).item() == 0


RESUMABLE = "; last.pt holds the last saved epoch, if any"


def count_skip(skipped: int, dtype: torch.dtype | None, epoch: int, step: int, kept: str = RESUMABLE) -> int:
    """One more step skipped in a row for a non-finite loss. In half precision (fp16 loss scaling, or bf16's
    coarse rounding, a step of which turned non-finite now and then in a dry run) the run may recover: it
    stops after MAX_NONFINITE in a row; in fp32 it stops at once (`kept`: what it leaves behind, for the
    message)."""
    if dtype is None or skipped + 1 > MAX_NONFINITE:
        raise UserError(f"the loss became non-finite at epoch {epoch + 1}, step {step + 1}{kept} "
                        "(try a lower --lr or --amp off)")
    return skipped + 1


def require_progress(images: int, epoch: int, kept: str = RESUMABLE) -> None:
    """An epoch in which every step was skipped for a non-finite loss stops the run."""
    if images == 0:
        raise UserError(f"every step of epoch {epoch + 1} had a non-finite loss{kept} (try a lower --lr or --amp off)")


class NonFinite:
    """An epoch's guard after each forward pass: a step whose loss is not finite in every process is skipped
    by all alike (count_skip says how many in a row may be); an epoch without a step stops the run."""

    def __init__(self, dtype: torch.dtype | None, epoch: int, kept: str = RESUMABLE):
        self.dtype, self.epoch, self.kept, self.skipped = dtype, epoch, kept, 0

    def skip(self, loss: torch.Tensor, step: int) -> bool:
        if finite_everywhere(loss):
            self.skipped = 0
            return False
        self.skipped = count_skip(self.skipped, self.dtype, self.epoch, step, self.kept)
        return True

    def require_progress(self, images: int) -> None:
        require_progress(images, self.epoch, self.kept)


class EpochUsage:
    """Wraps an epoch's loader: adds up the host seconds each `next()` waits for a
    batch (time.perf_counter, so no step waits on the device for it) and, on
    CUDA, resets the peak memory so that it covers this epoch alone."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device, self.waited = loader, device, 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.waited += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    @staticmethod
    def total(sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """An epoch's sums, kept on the device, added over every process: the epoch's one wait for the device."""
        return dict(zip(sums, all_reduce_sum(torch.stack(list(sums.values()))).tolist()))

    def record(self, seconds: float) -> dict:
        """`data_wait`: share of the epoch's `seconds` spent waiting; `peak_mem_gb` on CUDA."""
        cuda = {"peak_mem_gb": round(torch.cuda.max_memory_allocated(self.device) / 1e9, 3)} \
            if self.device.type == "cuda" else {}
        return {"data_wait": round(self.waited / seconds, 4), **cuda}

    @staticmethod
    def text(stats: dict) -> str:
        """The log line's tail for record's fields."""
        peak = f", peak {stats['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in stats else ""
        return f", data wait {stats['data_wait']:.0%}{peak}"




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
        if is_main():
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
        stop = all_reduce_sum(torch.tensor(float(self.stop_asked), device=self.device)).item() > 0
        due = (stop or epoch + 1 == self.cfg.epochs or (self.cfg.save_every and (epoch + 1) % self.cfg.save_every == 0)
               or time.monotonic() - self.since >= 60 * self.cfg.save_minutes)
        if due and is_main():
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
