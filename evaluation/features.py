"""Features of frozen networks: pre-logit features of every image a loader yields, those of a saved
checkpoint, DINO's weighted kNN classifier over them, and the kNN monitor the pretraining scripts log every
--knn-every epochs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data import DataIndex
from plumbing.models import collect, from_checkpoint, normalise, pre_logits
from plumbing.pixels import AUTO, ImageCache, ImageDataset, Intensity, eval_loader


def extract_features(model: nn.Module, loader, mean: list[float], std: list[float], device: torch.device,
                     dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, D) float32 pre-logit features on the CPU, not normalised, and the
    targets) of every image the loader yields, in order. The model runs in
    eval mode (BatchNorm's running statistics, no dropout) and is left in the
    mode it was in, so a training loop can call this between steps."""
    was_training = model.training
    model.eval()
    try:
        features = pre_logits(model)
        return collect(lambda x: features(normalise(x, mean, std)), loader, device, dtype)
    finally:
        model.train(was_training)


def split_features(model: nn.Module, index: DataIndex, ids: list[int], size: int, mean: list[float],
                   std: list[float], device: torch.device, dtype: torch.dtype | None, *, bs: int, workers: int,
                   cache: ImageCache | None = None, intensity: Intensity = AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """`extract_features` of the images `ids` of `index`, read unaugmented at `size` (from `cache` when given)."""
    dataset = ImageDataset(index.root, *index.part(ids), size, cache=cache, intensity=intensity)
    return extract_features(model, eval_loader(dataset, bs, workers=workers), mean, std, device, dtype)


def checkpoint_features(ckpt: dict, index: DataIndex, ids: list[int], device: torch.device, bs: int,
                        workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`split_features` with the network the checkpoint describes, read at its image size and intensity
    setting and normalised with its statistics; in fp32 (no autocast), so that the features do not depend on
    the GPU's precision."""
    return split_features(from_checkpoint(ckpt).to(device), index, ids, ckpt["img_size"], ckpt["mean"],
                          ckpt["std"], device, None, bs=bs, workers=workers, intensity=ckpt.get("intensity", AUTO))


def knn_accuracy(train: tuple[torch.Tensor, torch.Tensor], query: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of DINO's weighted kNN classifier (eval_knn: k 20, cosine,
    T 0.07): the k most similar train features vote exp(cos / T) for their
    class. train, query: (features (N, D), class ids (N,)), on one device;
    the features are L2-normalised here, so that the dot product is the cosine."""
    (train_feats, train_labels), (query_feats, query_labels) = train, query
    train_feats, query_feats = F.normalize(train_feats, dim=1), F.normalize(query_feats, dim=1)
    top, idx = (query_feats @ train_feats.T).topk(min(k, len(train_feats)), dim=1)
    votes = torch.zeros(len(query_feats), num_classes, device=query_feats.device)
    votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
    return float((votes.argmax(1) == query_labels).float().mean())


def val_knn_accuracy(model: nn.Module, index: DataIndex, parts: dict[str, list[int]], size: int,
                     mean: list[float], std: list[float], device: torch.device, dtype: torch.dtype | None, *,
                     bs: int, workers: int, cache: ImageCache | None = None, k: int = 20,
                     intensity: Intensity = AUTO) -> float | None:
    """`knn_accuracy` on the val split with the train split's features as the
    memory; None without single-label classes or a val split."""
    if not index.labelled or index.multilabel or not parts["val"] or not parts["train"]:
        return None
    train, val = (split_features(model, index, parts[name], size, mean, std, device, dtype, bs=bs, workers=workers,
                                 cache=cache, intensity=intensity) for name in ("train", "val"))
    # on the training device: a GPU ranks the (val x train) similarities far faster
    return knn_accuracy(*[(f.to(device), t.to(device)) for f, t in (train, val)], len(index.classes), k)
