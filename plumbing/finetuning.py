"""What runs around finetune.py's seeds: the run's start (the network it starts
from, its settings and folder), the labelled data (every image indexed, the split,
each part's image ids, the decode-once cache, a seed's loaders), the folder claimed
under the run's identity so that it holds one run, and what each seed leaves there."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from timm.models import safe_model_name
from torch import nn
from torch.utils.data import DataLoader

from plumbing import backbone
from plumbing import checkpoint
from plumbing import runtime as rt
from data import DataIndex
from errors import UserError
from plumbing.backbone import Source
from plumbing.flags import EXECUTION
from plumbing.pixels import ImageCache, ImageDataset, Intensity, eval_loader, train_augment, train_loader
from plumbing.splits import select


def start(args: argparse.Namespace, protocol: str, check: Callable[[argparse.Namespace], None]) \
        -> tuple[torch.device, torch.dtype | None, Source, argparse.Namespace, Path]:
    """A fine-tuning run's start: the process (rt.start_process), `check(args)` (the script's own checks), the
    network to start from (backbone.from_args), the settings printed, --amp's autocast dtype, and where the run
    goes (made once the data is known: claim). (device, dtype, source, cfg: the settings with the data the
    checkpoint names unless --data and the new split's seed --split-seed, run folder)."""
    device = rt.start_process(args)
    check(args)
    source = backbone.from_args(args)
    cfg = argparse.Namespace(**{**vars(args), "data": args.data or source.data, "seed": args.split_seed})
    rt.print_args(args)
    if args.out:
        out = Path(args.out)
    elif args.ckpt:  # beside the checkpoint
        out = Path(args.ckpt).parent / f"{protocol}-{Path(args.ckpt).stem}-frac{args.frac:g}"
    else:
        out = checkpoint.default_out(f"{source.method}-{safe_model_name(args.arch)}-{protocol}-frac{args.frac:g}")
    return device, rt.amp_dtype(args.amp, device), source, cfg, out


@dataclass
class LabelledData:
    """A fine-tuning run's data: the index, the split (splits.json's relative paths) and each part's image ids,
    and with --cache on the decode-once cache (open_cache)."""
    index: DataIndex
    splits: dict
    parts: dict[str, list[int]]
    cache: ImageCache | None = None

    def open_cache(self, size: int, intensity: Intensity, args: argparse.Namespace) -> None:
        """With --cache on, every image decoded once at `size` (rt.image_cache), for every seed."""
        if args.cache == "on":
            self.cache = rt.image_cache(self.index, "square", size, args.cache_dir, args.workers, intensity)

    def loaders(self, labelled: list[int], size: int, intensity: Intensity, args: argparse.Namespace, seed: int,
                device: torch.device) -> tuple[DataLoader, DataLoader, DataLoader]:
        """A seed's loaders: the `labelled` train images augmented (--aug), this process's share of the seeded
        batches; the plain val and test images, whole in every process (identical numbers everywhere under
        torchrun)."""
        pin, index = device.type == "cuda", self.index
        train = train_loader(ImageDataset(index.root, *index.part(labelled), size, train_augment(args.aug), self.cache,
                                          intensity), args.bs, seed=seed, workers=args.workers, rank=rt.rank(),
                             world=rt.world_size(), pin_memory=pin)
        val, test = (eval_loader(ImageDataset(index.root, *index.part(self.parts[name]), size, cache=self.cache,
                                              intensity=intensity), args.bs, workers=args.workers, pin_memory=pin)
                     for name in ("val", "test"))
        return train, val, test


def labelled_data(cfg: argparse.Namespace, checkpoint_splits: dict | None,
                  check: Callable[[DataIndex], None]) -> LabelledData:
    """cfg.data indexed and fingerprinted, `check(index)` (the script's checks that depend on the data), its
    split (choose_splits) and each part's image ids, kept apart by group (a split made before groups were known
    may leak a patient)."""
    index = rt.index_and_fingerprint(cfg)
    check(index)
    splits = choose_splits(checkpoint_splits, index, cfg)
    parts = select(index, splits, apart=True)
    for name in ("train", "val", "test"):
        if not parts[name]:
            raise UserError(f"the {name} split is empty; the data set is too small to split 70/10/20")
    return LabelledData(index, splits, parts)


def choose_splits(checkpoint_splits: dict | None, index: DataIndex,
                  cfg: argparse.Namespace) -> dict[str, list[str]]:
    """The pretraining run's split (`checkpoint_splits`) when it had one for labelled data, so that pretraining
    never saw the test images; otherwise a new seeded split (rt.new_split); duplicate images listed either way."""
    from plumbing.fingerprints import list_duplicates  # the duplicate check, ours
    splits = checkpoint_splits
    if splits and splits.get("val") and splits.get("test"):
        if cfg.duplicates == "together":
            print("note: --duplicates together moves nothing here: the checkpoint's split is kept as made")
        return list_duplicates(index, {k: splits[k] for k in ("train", "val", "test", "sizes") if k in splits})
    if splits:
        print("note: the checkpoint was pretrained on unlabelled data; making a new 70/10/20 split "
              "(pretraining may have seen some of its test images)")
    return rt.new_split(index, cfg)


def claim(out: Path, args: argparse.Namespace, source: Source, data: LabelledData,
          seed_files: tuple[str, ...]) -> None:
    """The run really starts (rank 0): its folder is claimed (claim_folder) under the run's identity (every flag
    but where and how fast it runs, and the source's identity), and splits.json written."""
    if rt.is_main():
        identity = {**{k: v for k, v in vars(args).items() if k not in ("out", *EXECUTION)},
                    "source": source.identity}
        claim_folder(out, json.loads(json.dumps(identity, default=str)), seed_files)  # as run.json reads back
        rt.write_splits(out, data.index, data.splits)


def claim_folder(out: Path, identity: dict, seed_files: tuple[str, ...]) -> None:
    """Make `out` this run's folder: run.json (`identity`) from the start, results.json once every seed is done.
    A folder holding a finished run, an unfinished run of another identity, or files (`seed_files` patterns) of
    an unknown run is refused; an unfinished run of the same identity starts over, its seed files removed. So a
    folder holds one run, and results.json never sits beside another run's files."""
    checkpoint.prepare_out_dir(out)
    if (out / "results.json").exists():
        raise UserError(f"{out} already holds a finished fine-tuning run; pick another --out (report.py pools the "
                        "seeds of runs with equal settings) or remove the folder")
    left = sorted(p for pattern in seed_files for p in out.glob(pattern))
    if (out / "run.json").exists():
        before = json.loads((out / "run.json").read_text())
        # (a run.json of an older version may still hold EXECUTION flags: they never tell runs apart)
        if differ := sorted(k for k in before.keys() | identity.keys()
                            if k not in EXECUTION and before.get(k) != identity.get(k)):
            raise UserError(f"{out} holds an unfinished fine-tuning run of other settings ({differ[0]}: "
                            f"{before.get(differ[0])} there, {identity.get(differ[0])} here); pick another --out "
                            "or remove the folder")
        print(f"note: {out} holds an unfinished run of these settings; starting it over")
        for path in left:
            path.unlink()
    elif left:
        raise UserError(f"{out} holds files of another run ({left[0].name}); pick another --out or remove them")
    checkpoint.write_json(out / "run.json", identity)


def save_model(path: Path, model: nn.Module, source: Source, data: LabelledData, **record) -> None:
    """A fine-tuned network (model_seed<N>.pt) with everything predict.py and a later reader need, `record`
    (seed, fraction, epoch, protocol, temperature, thresholds) included."""
    index = data.index
    checkpoint.save(checkpoint.model_record(
        model, arch=source.arch, img_size=source.img_size, mean=source.mean, std=source.std, method=source.method,
        role=source.role, finetuned=True, classes=index.classes, multilabel=index.multilabel,
        data=str(index.source), splits={name: [index.paths[i] for i in part] for name, part in data.parts.items()},
        intensity=source.intensity, **record, **source.record), path)
