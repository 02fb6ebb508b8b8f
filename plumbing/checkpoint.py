"""What a run writes: its folder, JSON files, the JSON-lines log and the
checkpoints. Everything is written atomically (`atomic_write`); checkpoints
are plain dicts of tensors and Python values, read with
torch.load(weights_only=True) only (no code runs on loading).

The two checkpoint records are defined here and nowhere else:
- `model_record`: one network and everything finetune.py and the tools need to rebuild it;
- `resume_record`: a pretraining run's state (CASS and DINO alike): `restore` reads it back.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import time
from pathlib import Path
from typing import IO, Callable

import torch
from torch import nn

from errors import UserError

FORMAT = "cass-reference/1"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """write(file) into a temporary file in the same folder, fsync, then rename:
    a kill or a full disk leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        kept = "the previous one is intact" if path.exists() else "nothing was written"
        raise UserError(f"could not write {path} ({getattr(err, 'strerror', None) or err}); {kept}") from None


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB blocks: who a record names, whatever its path."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, obj: object) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def read_log(run: Path) -> list[dict]:
    """A run folder's log.jsonl: one record per epoch."""
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def keep_log_until(path: Path, epoch: int) -> None:
    """Drop log lines of epochs after `epoch` (a fresh run keeps none, a resumed
    one those of the epochs its last.pt holds)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= epoch]
        text = "".join(line + "\n" for line in lines)
        atomic_write(path, lambda f: f.write(text.encode()))


def default_out(prefix: str) -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_writable(out: Path) -> Path:
    """The nearest folder that exists on the way to `out`, once it is shown writable: a run checks this at start
    and makes its folder (prepare_out_dir) only once it really starts, so a failed start leaves nothing."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write to output folder {out}: {existing} is not a writable folder")
    return existing


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


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU state_dict without DataParallel/DDP or torch.compile prefixes."""
    return {re.sub(r"(^|\.)(_orig_mod|module)\.", r"\1", key): value.detach().cpu()
            for key, value in model.state_dict().items()}


def save(record: dict, path: Path) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **record}, f))


def load(path: str | Path, kind: str) -> dict:
    """A checkpoint of this project of the given kind ('model' or 'resume'), or a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): a copy or a save that did not finish")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds more than tensors and plain values (e.g. a pickled model); "
                        "refusing to unpickle it") from None
    except Exception as err:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project")
    if obj.get("kind") != kind:
        instead = {"model": f"a run's state: continue its run with --resume {path.parent}, or fine-tune the "
                            f"networks beside it ({path.parent / 'cnn.pt'}, {path.parent / 'vit.pt'})",
                   "resume": f"one network: fine-tune it with finetune.py --ckpt {path}; --resume takes the run "
                             "folder that holds last.pt"}
        raise UserError(f"{path} is a {obj.get('kind')!r} checkpoint, expected a {kind!r} one; it holds "
                        f"{instead[kind]}")
    return obj


def model_record(model: nn.Module, *, arch: str, img_size: int, mean: list[float], std: list[float],
                 method: str, **info) -> dict:
    """A `model` checkpoint. `info` adds what is known: role ('cnn' / 'vit'),
    data, splits, classes, multilabel, args, epoch; fine-tuned ones add
    finetuned, seed, frac."""
    return {"kind": "model", "arch": arch, "state_dict": plain_state_dict(model),
            "num_classes": int(model.num_classes), "img_size": int(img_size),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std], "method": method, **info}


def _states(parts: dict) -> dict:
    """The state of every part of a nested {name: module / optimiser / scheduler / None} dict."""
    return {name: _states(p) if isinstance(p, dict) else None if p is None else
            plain_state_dict(p) if isinstance(p, nn.Module) else p.state_dict() for name, p in parts.items()}


def resume_record(method: str, epoch: int, args: dict, splits: dict, parts: dict) -> dict:
    """A `resume` checkpoint after `epoch` complete epochs: the run's settings
    and split, and the state of every named part (e.g. {"cnn": {"model": ...,
    "opt": ..., "sched": ..., "swa": ...}, "scaler": ...})."""
    return {"kind": "resume", "method": method, "epoch": epoch, "args": args, "splits": splits, **_states(parts)}


def restore(parts: dict, saved: dict) -> None:
    """Load a resume record's states back into the same nested parts, in place."""
    for name, part in parts.items():
        if isinstance(part, dict):
            restore(part, saved[name])
        elif part is not None:
            part.load_state_dict(saved[name])
