"""Networks: building timm models (ImageNet, local-file or random
initialisation; timm's registry names and its hf-hub:ORG/NAME and
local-dir:FOLDER names), their input normalisation, rebuilding one from a checkpoint,
and running one over a loader. Imports no data module: features and kNN are in evaluation/features.py."""
from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import _hub, load_model_config_from_hf, parse_model_name
from torch import nn

from errors import UserError


def timm_source(name: str) -> tuple[str, dict] | None:
    """(timm architecture, build arguments) that an `hf-hub:ORG/NAME`
    or `local-dir:FOLDER` name stands for, read from its config.json (a Hub
    name's is kept in huggingface_hub's cache, but every call asks the Hub
    whether it changed); None for a name of timm's registry."""
    try:
        source, model_id = parse_model_name(name)
    except ValueError as err:  # e.g. "org/name" without a prefix: timm's message names both prefixes
        raise UserError(str(err)) from None
    except AssertionError:  # timm before local-dir: knew only timm: and hf-hub: names
        raise UserError(f"this timm {timm.__version__} does not know the prefix of {name}; upgrade timm") from None
    if source in (None, "timm"):  # a registry name (timm 1.0.10 calls its source "timm", later ones None)
        return None
    if source == "local-dir":
        if not (Path(model_id) / "config.json").is_file():
            raise UserError(f"{name}: {model_id} is not a folder with a config.json "
                            "(one timm's save_for_hf or export.py wrote)")
        if not hasattr(_hub, "load_model_config_from_path"):
            raise UserError(f"this timm {timm.__version__} does not read local-dir: folders; upgrade timm")
        _, architecture, model_args = _hub.load_model_config_from_path(model_id)
    else:
        try:
            _, architecture, model_args = load_model_config_from_hf(model_id)
        except Exception as err:  # offline, unknown repo, no access: huggingface_hub raises many types
            raise UserError(f"could not fetch {name} from the Hugging Face Hub ({type(err).__name__}); without "
                            f"internet download it elsewhere (huggingface-cli download {model_id} --local-dir "
                            "FOLDER) and pass local-dir:FOLDER, or pass its timm architecture name with --weights "
                            "FILE") from None
    if not timm.is_model(architecture):
        raise UserError(f"{name} is a {architecture!r}, which this timm {timm.__version__} does not know")
    return architecture, dict(model_args)


def check_arch(name: str) -> None:
    """Fail early, before any data is read, on a name timm does not know, a
    missing local-dir: folder or an unreachable hf-hub: model."""
    if timm_source(name) is None and not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r} "
                        "(python -c \"import timm; print(timm.list_models('*vit*'))\" lists names; "
                        "hf-hub:ORG/NAME and local-dir:FOLDER name models outside the registry)")


def arch_record(name: str) -> dict:
    """What a checkpoint keeps, beyond the name, so that it rebuilds without
    the folder or the Hub: for hf-hub: and local-dir: names the timm
    architecture and the build arguments their config.json gives; nothing
    for registry names."""
    source = timm_source(name)
    if source is None:
        return {}
    architecture, model_args = source
    # the checkpoint's own img_size and num_classes describe its weights, not the folder's
    return {"timm_arch": architecture,
            "model_args": {k: v for k, v in model_args.items() if k not in ("img_size", "num_classes")}}


def is_transformer(arch: str) -> bool:
    """timm marks Transformers (ViT, DeiT, Swin, ...) as fixed-input-size
    models. For an hf-hub:/local-dir: name its architecture's mark counts, not
    its config.json's (save_for_hf writes False for a ViT that interpolates
    its position embeddings): the model must be built at --img-size, as
    from_checkpoint rebuilds it from the architecture."""
    source = timm_source(arch)
    pretrained = timm.get_pretrained_cfg(source[0] if source else arch)
    return bool(pretrained is not None and pretrained.fixed_input_size)


def hub_answers(arch: str, timeout: float = 3.0) -> bool:
    """Whether timm can get `arch`'s ImageNet weights: a copy in the Hugging Face cache (which huggingface_hub
    falls back to when the Hub cannot be reached), or the Hub (HF_ENDPOINT's host) answering. Offline, timm's
    download retries for about a minute before it fails. Not asked with HF_HUB_OFFLINE on or behind a proxy
    (a direct connection proves nothing there)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or \
            any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True
    hub_id = getattr(timm.get_pretrained_cfg(arch), "hf_hub_id", None)
    if hub_id and any(isinstance(huggingface_hub.try_to_load_from_cache(hub_id, name), str)
                      for name in ("model.safetensors", "pytorch_model.bin")):
        return True
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create_model(arch: str, *, img_size: int, num_classes: int | None = None, pretrained: bool = False,
                 weights: str | None = None, weights_flag: str = "--weights", **extra) -> nn.Module:
    """A timm model. Fixed-input-size models (ViT, DeiT, Swin, also a DINOv2 at
    patch 14) are built for `img_size` (timm resamples position embeddings
    when it loads weights made at another size); `weights` is a local file of
    ImageNet weights for machines without internet. `pretrained` with an
    hf-hub:/local-dir: name loads that model's own weights."""
    source = timm_source(arch)  # read once: an hf-hub: name asks the Hub each time
    if source is None:
        check_arch(arch)
    kwargs = dict(extra)
    if is_transformer(source[0] if source else arch):
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights:
        if source is not None:
            raise UserError(f"{weights_flag} is for a timm architecture name; {arch} brings its own weights")
        if not Path(weights).is_file():
            raise UserError(f"{weights_flag} {weights} does not exist")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights), custom_load=False)
    elif pretrained and source is None and not hub_answers(arch):
        raise UserError(f"no connection to the Hugging Face Hub for {arch}'s ImageNet weights: pass {weights_flag} "
                        "FILE (a local weights file), set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face "
                        "cache, or --no-pretrained for random initialisation")
    try:
        return timm.create_model(arch, pretrained=bool(pretrained or weights), **kwargs)
    except Exception as err:  # hub and file errors come in many types
        if weights:
            raise UserError(f"could not initialise {arch} from {weights}: {err}") from None
        if pretrained and source is not None:
            raise UserError(f"could not load the weights of {arch} ({type(err).__name__}: {err})") from None
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


def training_model(arch: str, device: torch.device, *, grad_ckpt: bool, norm: str,
                   **create) -> tuple[nn.Module, list[float], list[float]]:
    """A network to pretrain: create_model(arch, **create) on `device`, prepared (prepare_for_training), and
    the (mean, std) of its inputs (model_norm)."""
    model = create_model(arch, **create).to(device)
    prepare_for_training(model, arch, device, grad_ckpt)
    return model, *model_norm(model, norm)


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


def rebuild_arch(ckpt: dict) -> str:
    """The timm name a checkpoint's network is rebuilt from: the recorded
    architecture of an hf-hub:/local-dir: model (`arch_record`), which needs
    neither the Hub nor the folder, else the name it was trained with."""
    return ckpt.get("timm_arch", ckpt["arch"])


def from_checkpoint(ckpt: dict) -> nn.Module:
    """The exact network a checkpoint describes (its own head), weights loaded
    strictly. An hf-hub:/local-dir: model is rebuilt from the architecture and
    build arguments the checkpoint recorded (`arch_record`), so neither the
    Hub nor the folder is needed any more."""
    model = create_model(rebuild_arch(ckpt), img_size=ckpt["img_size"], num_classes=ckpt["num_classes"],
                         **ckpt.get("model_args", {}))
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
