"""Networks: building timm models (ImageNet, local-file or random
initialisation), their input normalisation, rebuilding one from a checkpoint,
and running one over a loader (evaluation, prediction, features, kNN)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from data import DataIndex
from errors import UserError
from pixels import AUTO, ImageCache, ImageDataset, Intensity, eval_loader


def check_arch(name: str) -> None:
    """Fail early, before any data is read, on a name timm does not know."""
    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r} "
                        "(python -c \"import timm; print(timm.list_models('*vit*'))\" lists names)")


def is_transformer(arch: str) -> bool:
    """timm marks Transformers (ViT, DeiT, Swin, ...) as fixed-input-size models."""
    pretrained = timm.get_pretrained_cfg(arch)
    return bool(pretrained is not None and pretrained.fixed_input_size)


def create_model(arch: str, *, img_size: int, num_classes: int | None = None, pretrained: bool = False,
                 weights: str | None = None, weights_flag: str = "--weights", **extra) -> nn.Module:
    """A timm model. Fixed-input-size models (ViT, DeiT, Swin) are built for
    `img_size` (timm resamples position embeddings); `weights` is a local file
    of ImageNet weights for machines without internet."""
    check_arch(arch)
    kwargs = dict(extra)
    if is_transformer(arch):
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights:
        if not Path(weights).is_file():
            raise UserError(f"{weights_flag} {weights} does not exist")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights), custom_load=False)
    try:
        return timm.create_model(arch, pretrained=bool(pretrained or weights), **kwargs)
    except Exception as err:  # hub and file errors come in many types
        if weights:
            raise UserError(f"could not initialise {arch} from {weights}: {err}") from None
        if pretrained:
            raise UserError(f"could not fetch ImageNet weights for {arch} ({type(err).__name__}); without "
                            f"internet pass {weights_flag} FILE with a local weights file, or --no-pretrained "
                            "for random initialisation") from None
        raise


def prepare_for_training(model: nn.Module, arch: str, device: torch.device, grad_ckpt: bool) -> None:
    """In place: channels_last for CNNs on CUDA (the tensor-core friendly
    layout) and, if asked, timm's gradient checkpointing."""
    if device.type == "cuda" and not is_transformer(arch):
        model.to(memory_format=torch.channels_last)
    if grad_ckpt:
        model.set_grad_checkpointing(True)


def optimizer_kwargs(device: torch.device) -> dict:
    """Fused single-kernel optimiser steps where CUDA offers them."""
    return {"fused": True} if device.type == "cuda" else {}


def model_norm(model: nn.Module, norm: str) -> tuple[list[float], list[float]]:
    """(mean, std) the model's inputs are normalised with. `model`: what its
    (pretrained) weights expect, e.g. 0.5/0.5 for timm's vit_base_patch16_384;
    `imagenet`: the paper's App. C.5.2 ImageNet statistics for every model."""
    if norm == "imagenet":
        return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    expected = model.pretrained_cfg
    return list(expected.get("mean", IMAGENET_DEFAULT_MEAN)), list(expected.get("std", IMAGENET_DEFAULT_STD))


@functools.lru_cache(maxsize=16)
def _scale(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Made once per device: a fresh host-to-GPU copy every step would stall the step."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float32 normalised inputs, on x's device."""
    m, s = _scale(tuple(mean), tuple(std), x.device)
    return (x.float() - m) / s


@torch.no_grad()
def collect(fn: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device,
            dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(batch on `device`) for every batch of the loader, in order, as float32
    on the CPU, and the targets: evaluation, prediction, features."""
    outs, targets = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outs.append(fn(x.to(device, non_blocking=True)).float().cpu())
        targets.append(y)
    return torch.cat(outs), torch.cat(targets)


def from_checkpoint(ckpt: dict) -> nn.Module:
    """The exact network a checkpoint describes (its own head), weights loaded strictly."""
    model = create_model(ckpt["arch"], img_size=ckpt["img_size"], num_classes=ckpt["num_classes"])
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint weights do not fit {ckpt['arch']}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return model


def pre_logits(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, 3, H, W) normalised images -> (B, D) pooled features, what the
    classifier sees (D = model.num_features): the same for a backbone's 1000-
    or 0-output head and a fine-tuned one."""
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)


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


def checkpoint_features(ckpt: dict, index: DataIndex, ids: list[int], device: torch.device, bs: int,
                        workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`extract_features` of the images `ids` of `index` with the network the
    checkpoint describes, read at its image size and intensity setting and
    normalised with its statistics; in fp32 (no autocast), so that the
    features do not depend on the GPU's precision."""
    dataset = ImageDataset(index.root, *index.part(ids), ckpt["img_size"], intensity=ckpt.get("intensity", AUTO))
    return extract_features(from_checkpoint(ckpt).to(device), eval_loader(dataset, bs, workers=workers),
                            ckpt["mean"], ckpt["std"], device, None)


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
    train, val = (extract_features(model, eval_loader(ImageDataset(index.root, *index.part(parts[name]), size,
                                                                   cache=cache, intensity=intensity),
                                                      bs, workers=workers), mean, std, device, dtype)
                  for name in ("train", "val"))
    # on the training device: a GPU ranks the (val x train) similarities far faster
    return knn_accuracy(*[(f.to(device), t.to(device)) for f, t in (train, val)], len(index.classes), k)
