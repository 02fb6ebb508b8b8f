"""Embeddings of a folder of images (or a labels CSV, or image files) from any model
checkpoint of this project, for retrieval, clustering, UMAP or a classifier of your own.

    python -m tools.embed --ckpt runs/<run>/vit.pt --images ./cases --out embeddings/vit

writes embeddings.npy, (N, D) float32 pre-logit features (what the head sees,
not L2-normalised unless --normalize), and embeddings.csv, row i describing
row i of the array: its path (relative to the folder, to the CSV's folder, or
to the deepest folder holding the image files) and, for labelled data, its
label (class name; ';'-joined names for multi-label data). Images are read as
in training (data.index_images): files that cannot be decoded are skipped,
counted, and have no row.
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from plumbing import checkpoint
from plumbing import flags
from plumbing import runtime as rt
from data import DataIndex, index_images
from evaluation.features import checkpoint_features


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = flags.new_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="a model checkpoint of this project (pretrained or fine-tuned)")
    p.add_argument("--images", nargs="+", required=True,
                   help="a folder of images (sub-folders are searched), a labels CSV, or image files")
    p.add_argument("--out", required=True, help="folder to write embeddings.npy and embeddings.csv to")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each embedding (unit norm: cosine = dot)")
    p.add_argument("--bs", type=flags.positive_int, default=64, help="batch size")
    p.add_argument("--workers", type=flags.non_negative_int, default=2, help="data-loading workers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p.parse_args(argv)


def write(out: Path, feats: np.ndarray, index: DataIndex) -> None:
    """embeddings.npy and embeddings.csv, row for row, each written atomically."""
    text = io.StringIO()
    writer = csv.writer(text)
    names = [index.label(i) for i in range(len(index.paths))] if index.labelled else None
    writer.writerow(["path"] if names is None else ["path", "label"])
    writer.writerows([[p] for p in index.paths] if names is None else zip(index.paths, names))
    checkpoint.atomic_write(out / "embeddings.npy", lambda f: np.save(f, feats))
    checkpoint.atomic_write(out / "embeddings.csv", lambda f: f.write(text.getvalue().encode()))


def main(args: argparse.Namespace) -> Path:
    ckpt = checkpoint.load(args.ckpt, kind="model")
    device = rt.pick_device(args.device)
    out = checkpoint.prepare_out_dir(Path(args.out))
    index = index_images(args.images, args.workers)
    feats, _ = checkpoint_features(ckpt, index, list(range(len(index.paths))), device, args.bs, args.workers)
    if args.normalize:
        feats = F.normalize(feats, dim=1)
    write(out, feats.numpy().astype(np.float32), index)
    kind = "L2-normalised" if args.normalize else "not normalised"
    print(f"{feats.shape[0]} embeddings of {feats.shape[1]} dims ({kind}), {len(index.skipped)} images skipped: "
          f"{out}/embeddings.npy + embeddings.csv")
    return out


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
