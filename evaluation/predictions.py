"""The per-image prediction file, predictions_seed<N>.csv: finetune.py writes
one per seed, one row per test image (path, group, true label(s), the
probability of every class), so report.py can recompute any metric and its
interval from the files alone; and the multi-label thresholds a fine-tuned
model decides at, as recorded in its checkpoint and results.json."""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from plumbing.checkpoint import atomic_write
from data import DataIndex
from errors import UserError


@dataclass(frozen=True)
class Predictions:
    """One seed's file, rows sorted by path so that seeds and rows line up."""
    paths: tuple[str, ...]
    targets: np.ndarray  # (N,) class ids, or (N, C) bool for multi-label data
    probs: np.ndarray  # (N, C) softmax, or sigmoid per label
    groups: tuple[str, ...] | None  # of each image; None in files without groups


def write(path: Path, index: DataIndex, ids: list[int], probs: np.ndarray) -> str:
    """Atomically: a row per image of `index` at positions `ids`, its true class name(s) (DataIndex.label),
    its group (empty without groups) and each class's probability (probs (len(ids), C)) in full: the shortest
    text that reads back as the same float64, so any metric recomputed from the file equals the recorded one
    (a rounded probability can cross a validation threshold). Returns the file's SHA-256, which results.json
    records so that report.py never pairs a score with another run's file."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path", "group", "true", *(f"p_{c}" for c in index.classes)])
    for i, p in zip(ids, probs):
        writer.writerow([index.paths[i], index.groups[i] if index.groups else "", index.label(i),
                         *(repr(float(v)) for v in p)])
    data = text.getvalue().encode()
    atomic_write(path, lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()


@cache
def read(path: Path, classes: tuple[str, ...], multilabel: bool) -> Predictions:
    """A file as `write` wrote it (cached: report.py's tables, pairs and figures all read it)."""
    with open(path, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda row: row["path"])
    at = {c: k for k, c in enumerate(classes)}
    try:
        probs = np.array([[float(row[f"p_{c}"]) for c in classes] for row in rows]).reshape(len(rows), len(classes))
        truth = [[at[c] for c in row["true"].split(";") if c] for row in rows]
    except KeyError as err:
        raise UserError(f"{path} does not match the classes of its results.json (no {err})") from None
    targets = np.array([np.isin(range(len(classes)), t) for t in truth]).reshape(len(rows), len(classes)) \
        if multilabel else np.array([t[0] for t in truth], dtype=int)
    # an image without a group is its own, as in data.py
    groups = tuple(row.get("group") or row["path"] for row in rows) if any(row.get("group") for row in rows) else None
    return Predictions(tuple(row["path"] for row in rows), targets, probs, groups)


def thresholds(named: dict[str, float] | None, classes: list[str] | tuple[str, ...]) -> np.ndarray:
    """(C,) the multi-label thresholds recorded as {class: t}; 0.5 each where none were recorded (fixed
    thresholds, or files written before thresholds could be chosen)."""
    return np.array([named[c] for c in classes] if named else [0.5] * len(classes), dtype=float)
