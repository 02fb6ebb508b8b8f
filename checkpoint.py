"""Checkpoints: plain dicts of tensors and Python values, written atomically,
read with torch.load(weights_only=True) only (no code runs on loading).

Two kinds share one format tag: `model` (one network: everything finetune.py
and later tools need to rebuild it) and `resume` (a pretraining run's state).
"""
from __future__ import annotations

import os
import re
import pickle
from pathlib import Path

import torch
from torch import nn

from runtime import UserError

FORMAT = "cass-reference/1"


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU state_dict without DataParallel/DDP or torch.compile prefixes."""
    return {re.sub(r"(^|\.)(_orig_mod|module)\.", r"\1", key): value.detach().cpu()
            for key, value in model.state_dict().items()}


def save(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill
    during the save leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **obj}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        kept = "the previous one is intact" if path.exists() else "nothing was written"
        raise UserError(f"could not write {path} ({getattr(err, 'strerror', None) or err}); {kept}") from None


def load(path: str | Path, kind: str) -> dict:
    """A checkpoint of this project of the given kind, or a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
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
        raise UserError(f"{path} is a {obj.get('kind')!r} checkpoint, expected a {kind!r} one")
    return obj


def model_record(model: nn.Module, *, arch: str, img_size: int, mean: list[float], std: list[float],
                 method: str, **info) -> dict:
    """What a `model` checkpoint holds; `info` adds role, data, splits, args, epoch, classes..."""
    return {"kind": "model", "arch": arch, "state_dict": plain_state_dict(model),
            "num_classes": int(model.num_classes), "img_size": int(img_size),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std], "method": method, **info}
