"""The run records a report reads: every fine-tuning run's results.json under some folders, the network each
started from (by checkpoint hash, so a moved folder or a `cd` neither splits nor merges rows), the experiment it
belongs to, and each experiment's seeds at a label fraction gathered into one Cell, each seed once, its
prediction file checked against the hash results.json recorded."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from errors import UserError
from evaluation import predictions
from evaluation.predictions import Predictions
from plumbing.checkpoint import sha256
from plumbing.flags import EXECUTION


# results.json config entries that do not tell experiments apart: the seed list
# (seeds pool into one cell), where and how fast the run went (flags.EXECUTION), and flags that
# another part of the key already carries (data set, checkpoint, backbone,
# label fraction, metric, protocol; --pretrained through the method).
NOT_SETTINGS = frozenset({"seeds", "seed", "out", *EXECUTION, "data", "ckpt", "arch", "weights", "frac",
                          "metric", "linear", "pretrained", "resamples"})


# finetune.LR, which a test compares: evaluation imports no stage script
DEFAULT_LR = {"finetune": 3e-4, "linear": 1e-3}


@dataclass(frozen=True, order=True)
class Source:
    """The network a row's runs started from. `key` tells sources apart: the SHA-256 of the checkpoint (or
    --weights file) that finetune.py records as source_id, so that neither `cd` nor a moved folder splits or
    merges rows; the timm name; the text typed, for results.json files older than source_id. `shown` names it."""
    key: str
    shown: str = field(compare=False)


def source_of(result: dict, root: Path) -> Source:
    """A results.json's Source, its checkpoint's folder shown relative to `root` (the searched folders')."""
    found = result.get("source_id")
    if not found:
        return Source(str(Path(result["source"])), pretraining_run(result["source"]))
    if "sha256" not in found:
        return Source(f"timm:{found['arch']}", "-")
    path = Path(found["path"])
    if not result["config"].get("ckpt"):  # a --weights file
        return Source(found["sha256"], path.name)
    folder = path.parent
    return Source(found["sha256"], folder.relative_to(root).as_posix() if folder.is_relative_to(root) and
                  folder != root else str(folder))


def data_set(folder: Path, result: dict) -> str:
    """The data set a results.json was measured on: its resolved path, which finetune.py records under `resolved`
    (config["data"] is None whenever the checkpoint brought the data); for older files the one in splits.json
    beside it, else the config's."""
    if data := result.get("resolved", {}).get("data"):
        return data
    splits = folder / "splits.json"
    if splits.is_file():
        return json.loads(splits.read_text())["data"]
    return result["config"].get("data") or "unknown data set"


def load_results(folders: list[Path]) -> list[dict]:
    """Every results.json under the folders once (folders may nest), with its data set and Source."""
    results, root = [], common_root(folders)
    for path in sorted({p.resolve() for f in folders for p in f.rglob("results.json")}):
        r = json.loads(path.read_text())
        results.append({**r, "data_set": data_set(path.parent, r), "folder": path.parent,
                        "source_of": source_of(r, root)})
    return results


def common_root(folders: list[Path]) -> Path:
    """The deepest folder holding all the searched ones: run names are shown relative to it."""
    return Path(os.path.commonpath([f.resolve() for f in folders]))


def pretraining_run(source: str) -> str:
    """The folder of the fine-tuned checkpoint (one pretraining run); "-" for a timm backbone."""
    return str(Path(source).parent) if source.endswith(".pt") else "-"


def resolved(result: dict) -> dict:
    """The settings a run used, so that runs differing only in how a value was recorded compare equal: an unset
    --img-size as the size the checkpoint brought (finetune.py records it under `resolved`; files without that
    key keep it unset), and a learning rate equal to its protocol's default (finetune.LR) as unset, so that
    rows name a rate only where one was chosen (a linear probe's own default is no setting of its row)."""
    config = result["config"]
    default_lr = DEFAULT_LR[result.get("protocol", "finetune")]
    return {**config, "img_size": config.get("img_size") or result.get("resolved", {}).get("img_size"),
            "lr": None if config.get("lr") in (None, default_lr) else config.get("lr")}


def experiment(result: dict) -> tuple:
    """What a row stands for: method, backbone, protocol (fine-tuning or linear probe), checkpoint, and the
    remaining resolved settings as sorted (flag, JSON value) pairs; seeds of equal experiments pool."""
    settings = tuple(sorted((k, json.dumps(v)) for k, v in resolved(result).items() if k not in NOT_SETTINGS))
    return result["method"], result["arch"], result.get("protocol", "finetune"), result["source_of"], settings


@dataclass
class Cell:
    """Every seed of one experiment at one label fraction on one data set, in the order found: its id (None in
    files without one), headline score, labelled images (None where unrecorded), prediction file (None where
    finetune.py wrote none) and multi-label thresholds ((C,), 0.5 each where results.json records none); and the
    folder each seed id came from."""
    classes: tuple[str, ...]
    multilabel: bool
    origins: dict[int, Path] = field(default_factory=dict)
    seeds: list[int | None] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    labelled: list[tuple[str, ...] | None] = field(default_factory=list)
    files: list[Path | None] = field(default_factory=list)
    thresholds: list[np.ndarray] = field(default_factory=list)


def collect_cells(results: list[dict]) -> dict[tuple, Cell]:
    """(data set, metric, experiment, label fraction) -> Cell; seeds of one
    experiment pool also when split over several results.json files, each seed
    once. A seed found twice, or a prediction file other than the one its
    results.json recorded (by SHA-256), is a UserError: either would put
    numbers of two runs in one cell."""
    cells: dict[tuple, Cell] = {}
    for r in results:
        key = (r["data_set"], r["metric"], experiment(r), r["frac"])
        cell = cells.setdefault(key, Cell(tuple(r.get("classes", ())), r.get("multilabel", False)))
        for run in r["runs"]:
            seed = run.get("seed")
            if (twice := cell.origins.get(seed)) is not None:
                raise UserError(f"seed {seed} of one experiment is in both {twice} and {r['folder']}; counted twice "
                                "it would shrink the std and the interval: report on folders that hold it once")
            if seed is not None:
                cell.origins[seed] = r["folder"]
            cell.seeds.append(seed)
            cell.scores.append(run["test"][r["metric"]])
            cell.labelled.append(tuple(sorted(run["labelled_files"])) if "labelled_files" in run else None)
            file = r["folder"] / f"predictions_seed{seed}.csv"
            recorded = (run.get("predictions") or {}).get("sha256")
            if recorded and file.is_file() and sha256(file) != recorded:
                raise UserError(f"{file} is not the prediction file its results.json recorded (another run wrote "
                                "it); re-run that fine-tuning into a new folder")
            cell.files.append(file if file.is_file() else None)
            cell.thresholds.append(predictions.thresholds(run.get("thresholds"), cell.classes))
    return cells


def seed_predictions(cell: Cell) -> list[Predictions]:
    """The predictions of every seed of the cell that has a file."""
    return [predictions.read(f, cell.classes, cell.multilabel) for f in cell.files if f]
