"""finetune.py --linear (ours, beyond the paper): the linear probe. The frozen
backbone's pre-logit features of every split are extracted once, without
augmentation, and only a new linear head is trained on them, with fine-tuning's
label fractions, seeds, loss, early stopping and evaluation."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from evaluation.features import split_features
from plumbing import runtime as rt
from plumbing.backbone import Source
from plumbing.finetuning import LabelledData
from plumbing.pixels import eval_loader, train_loader


def frozen_features(source: Source, data: LabelledData, bs: int, workers: int, device: torch.device,
                    dtype: torch.dtype | None) -> dict[str, TensorDataset]:
    """(features (N, D), targets) of the train, val and test images, for every seed."""
    model = source.model.to(device)
    return {name: TensorDataset(*split_features(model, data.index, data.parts[name], source.img_size, source.mean,
                                                source.std, device, dtype, bs=bs, workers=workers, cache=data.cache,
                                                intensity=source.intensity)) for name in ("train", "val", "test")}


def loaders(features: dict[str, TensorDataset], train_ids: list[int], labelled: list[int], bs: int,
            seed: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Shuffled batches of the labelled images' features (a subset of `train_ids`, in whose order the train
    features lie), and the val and test features in order."""
    at = {i: k for k, i in enumerate(train_ids)}
    rows = [at[i] for i in labelled]
    train = train_loader(TensorDataset(*(t[rows] for t in features["train"].tensors)), bs, seed=seed, workers=0,
                         rank=rt.rank(), world=rt.world_size())
    return train, eval_loader(features["val"], bs, workers=0), eval_loader(features["test"], bs, workers=0)
