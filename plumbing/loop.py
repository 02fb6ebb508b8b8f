"""What every stage script's epoch loop passes through, the loop itself staying in the script: the guard each
step passes after its forward pass (a non-finite loss skips the step in every process alike), and the epoch's
wait for data, peak memory and sums over processes. A pretraining run's last.pt and Ctrl-C are in
pretraining.py."""
from __future__ import annotations

import math
import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from errors import UserError
from plumbing.runtime import all_reduce_sum, world_size

MAX_NONFINITE = 10  # consecutive skipped half-precision steps before a run is stopped


def loss_everywhere(loss: torch.Tensor) -> float:
    """The loss summed over every process: finite only where it is finite in every one, so that all of them
    step or all skip. Reading it waits for the forward pass: one host sync per step, paid on purpose so that a
    NaN never reaches the weights; the progress bar shows the value read."""
    return all_reduce_sum(loss.detach().float().clone()).item()  # a copy: the all-reduce writes in place


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
        self.loss = math.nan  # the last loss read, the mean over the processes: for the progress bar

    def skip(self, loss: torch.Tensor, step: int) -> bool:
        self.loss = loss_everywhere(loss) / world_size()
        if math.isfinite(self.loss):
            self.skipped = 0
            return False
        self.skipped = count_skip(self.skipped, self.dtype, self.epoch, step, self.kept)
        return True

    def require_progress(self, images: int) -> None:
        require_progress(images, self.epoch, self.kept)


class EpochUsage:
    """Wraps an epoch's loader: times the epoch from its creation, adds up the host seconds each `next()` waits
    for a batch (time.perf_counter, so no step waits on the device for it) and, on CUDA, resets the peak memory
    so that it covers this epoch alone."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device, self.waited, self.start = loader, device, 0.0, time.perf_counter()
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

    def record(self, images: int) -> dict:
        """The epoch's `seconds` so far, its `images` (added over every process) and their rate, `data_wait`:
        the share of the seconds spent waiting for data; `peak_mem_gb` on CUDA."""
        seconds = time.perf_counter() - self.start
        cuda = {"peak_mem_gb": round(torch.cuda.max_memory_allocated(self.device) / 1e9, 3)} \
            if self.device.type == "cuda" else {}
        return {"seconds": round(seconds, 3), "images": images, "images_per_s": round(images / seconds, 2),
                "data_wait": round(self.waited / seconds, 4), **cuda}

    @staticmethod
    def text(stats: dict) -> str:
        """The log line's tail for record's fields."""
        peak = f", peak {stats['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in stats else ""
        return f", data wait {stats['data_wait']:.0%}{peak}"
