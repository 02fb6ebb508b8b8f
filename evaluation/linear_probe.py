"""finetune.py --linear (ours, beyond the paper): the linear probe. The frozen
backbone's pre-logit features of every split are extracted once, without
augmentation, and only a new linear head is trained on them, with fine-tuning's
label fractions, seeds, loss, early stopping and evaluation."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from data import DataIndex
from evaluation.features import extract_features
from plumbing.pixels import ImageCache, ImageDataset, Intensity, eval_loader, train_loader

LR = 1e-3  # a lone linear head on few labels needs larger steps than fine-tuning's 3e-4 to converge in --epochs


def frozen_features(model: nn.Module, index: DataIndex, parts: dict[str, list[int]], size: int, mean: list[float],
                    std: list[float], intensity: Intensity, cache: ImageCache | None, bs: int, workers: int,
                    device: torch.device, dtype: torch.dtype | None) -> dict[str, TensorDataset]:
    """(features (N, D), targets) of the train, val and test images, for every seed."""
    model = model.to(device)
    return {name: TensorDataset(*extract_features(
        model, eval_loader(ImageDataset(index.root, *index.part(parts[name]), size, cache=cache, intensity=intensity),
                           bs, workers=workers), mean, std, device, dtype)) for name in ("train", "val", "test")}


def loaders(features: dict[str, TensorDataset], train_ids: list[int], labelled: list[int], bs: int, seed: int,
            rank: int, world: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Shuffled batches of the labelled images' features (a subset of `train_ids`, in whose order the train
    features lie), and the val and test features in order."""
    at = {i: k for k, i in enumerate(train_ids)}
    rows = [at[i] for i in labelled]
    train = train_loader(TensorDataset(*(t[rows] for t in features["train"].tensors)), bs, seed=seed, workers=0,
                         rank=rank, world=world)
    return train, eval_loader(features["val"], bs, workers=0), eval_loader(features["test"], bs, workers=0)
