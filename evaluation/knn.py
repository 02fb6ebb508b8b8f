"""Weighted k-nearest-neighbour evaluation of frozen features, as in DINO's
eval_knn (k 20, cosine similarity, temperature 0.07): train-split features
vote for each validation image's class with weight exp(sim / T). The
label-efficient signal that shows whether pretraining helps long before any
fine-tuning. The pretraining scripts log it every --knn-every epochs
(evaluation/features.py: val_knn_accuracy); this script computes it for a saved checkpoint:

    python -m evaluation.knn --ckpt runs/<run>/cnn.pt          # data and split come from the checkpoint
"""
from __future__ import annotations

import argparse

from plumbing import checkpoint
from plumbing import flags
from plumbing import runtime as rt
from data import index_data
from errors import UserError
from evaluation.features import val_knn_accuracy
from plumbing.models import from_checkpoint
from plumbing.pixels import AUTO
from plumbing.splits import select


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = flags.new_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="a model checkpoint of this project")
    p.add_argument("--data", help="the data set (default: the one the checkpoint names)")
    p.add_argument("--k", type=flags.positive_int, default=20, help="neighbours (DINO: 20)")
    p.add_argument("--bs", type=flags.positive_int, default=64, help="batch size for feature extraction")
    p.add_argument("--workers", type=flags.non_negative_int, default=2, help="data-loading workers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> float | None:
    ckpt = checkpoint.load(args.ckpt, kind="model")
    device = rt.pick_device(args.device)
    model = from_checkpoint(ckpt).to(device)
    if not ckpt.get("splits"):  # a checkpoint of an older format may lack it
        raise UserError(f"{args.ckpt} carries no train/val split to evaluate on")
    index = index_data(args.data or ckpt["data"], workers=args.workers)
    parts = select(index, ckpt["splits"])
    acc = val_knn_accuracy(model, index, parts, ckpt["img_size"], ckpt["mean"], ckpt["std"], device, None,
                           bs=args.bs, workers=args.workers, k=args.k, intensity=ckpt.get("intensity", AUTO))
    print(f"kNN (k={args.k}) val accuracy of {args.ckpt}: "
          + ("n/a (needs single-label classes and a val split)" if acc is None else f"{acc:.4f}"))
    return acc


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
