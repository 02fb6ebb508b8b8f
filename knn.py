"""Weighted k-nearest-neighbour evaluation of frozen features, as in DINO's
eval_knn (k 20, cosine similarity, temperature 0.07): train-split features
vote for each validation image's class with weight exp(sim / T). The
label-efficient signal that shows whether pretraining helps long before any
fine-tuning. Used every --knn-every epochs by the pretraining scripts, and on
its own:

    python knn.py --ckpt runs/<run>/cnn.pt          # data and split come from the checkpoint
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import checkpoint
from cli import new_parser, non_negative_int, positive_int, run_cli
from data import DataIndex, ImageDataset, index_data, make_loader, select
from models import collect, from_checkpoint
from runtime import pick_device


def features(model: nn.Module, loader, mean: list[float], std: list[float], device, dtype) -> torch.Tensor:
    """(N, D) L2-normalised pre-logit features of every image the loader yields, in order, on `device`."""
    was_training = model.training
    model.eval()
    feats, _ = collect(lambda x: model.forward_head(model.forward_features(x), pre_logits=True).flatten(1),
                       loader, mean, std, device, dtype)
    model.train(was_training)
    return F.normalize(feats, dim=1).to(device)


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Class scores (Q, C): the k most similar train images vote exp(cos / T) for their class."""
    sims = query @ train_feats.T
    top, idx = sims.topk(min(k, len(train_feats)), dim=1)
    votes = torch.zeros(len(query), num_classes, device=query.device)
    votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
    return votes


def knn_accuracy(model: nn.Module, index: DataIndex, parts: dict, size: int, mean, std, device, dtype,
                 *, bs: int = 64, workers: int = 0, cache=None, k: int = 20) -> float | None:
    """Top-1 accuracy of the weighted kNN classifier on the val split (None
    without single-label classes or a val split)."""
    if not index.labelled or index.multilabel or not parts["val"]:
        return None
    feats = {}
    for name in ("train", "val"):
        loader = make_loader(ImageDataset(index, parts[name], size, None, cache), bs, shuffle=False, seed=0,
                             workers=workers, shard=False)
        feats[name] = features(model, loader, mean, std, device, dtype)
    labels = {name: torch.as_tensor(index.targets[parts[name]], device=device) for name in ("train", "val")}
    scores = knn_predict(feats["train"], labels["train"], feats["val"], len(index.classes), k=k)
    return float((scores.argmax(1) == labels["val"]).float().mean())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = new_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="a model checkpoint of this project")
    p.add_argument("--data", help="the data set (default: the one the checkpoint names)")
    p.add_argument("--k", type=positive_int, default=20, help="neighbours (DINO: 20)")
    p.add_argument("--bs", type=positive_int, default=64, help="batch size for feature extraction")
    p.add_argument("--workers", type=non_negative_int, default=2, help="data-loading workers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> float | None:
    ckpt = checkpoint.load(args.ckpt, kind="model")
    device = pick_device(args.device)
    model = from_checkpoint(ckpt).to(device)
    index = index_data(args.data or ckpt["data"], workers=args.workers)
    parts = select(index, ckpt["splits"])
    acc = knn_accuracy(model, index, parts, ckpt["img_size"], ckpt["mean"], ckpt["std"], device, None,
                       bs=args.bs, workers=args.workers, k=args.k)
    print(f"kNN (k={args.k}) val accuracy of {args.ckpt}: "
          + ("n/a (needs single-label classes and a val split)" if acc is None else f"{acc:.4f}"))
    return acc


if __name__ == "__main__":
    run_cli(main, parse_args)
