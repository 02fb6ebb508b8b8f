"""The network fine-tuning starts from: a model checkpoint of this project (a
pretrained backbone, with the image size, normalisation, intensity setting,
data and split it was pretrained with) or a timm model, with ImageNet weights
or random initialisation (the supervised baselines)."""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from plumbing import checkpoint
from errors import UserError
from plumbing import models
from plumbing.models import arch_record, create_model, from_checkpoint, model_norm
from plumbing.pixels import AUTO, Intensity, parse_intensity


@dataclass
class Source:
    """The starting network and what is known about it."""
    model: nn.Module
    arch: str
    img_size: int
    mean: list[float]
    std: list[float]
    method: str  # cass, dino, supervised (ImageNet weights) or random-init
    role: str | None  # cnn / vit for a pretraining run's backbone
    data: str | None  # the data set it was pretrained on
    splits: dict[str, list[str]] | None  # the split it was pretrained with
    intensity: Intensity  # how its images' 16-bit, float or DICOM pixels became 0..255
    record: dict  # models.arch_record: what a checkpoint of it keeps to rebuild without the folder or the Hub
    identity: dict  # named so that `cd` and moved folders change nothing: a file's resolved path and SHA-256

    @property
    def timm_arch(self) -> str:
        """The name is_transformer and create_model take for it, also once an
        hf-hub:/local-dir: name's folder is gone or the Hub out of reach."""
        return self.record.get("timm_arch", self.arch)

    def network(self, redraw: bool) -> nn.Module:
        """A network to fine-tune: a random-init baseline's own new random draw when `redraw` (one per seed),
        else a copy of the source's weights."""
        if redraw and self.method == "random-init":
            return create_model(self.arch, img_size=self.img_size)
        return copy.deepcopy(self.model)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the network's normalised inputs."""
        return models.normalise(x, self.mean, self.std)


def from_args(args: argparse.Namespace) -> Source:
    """The network finetune.py starts from: --ckpt, or --arch for --data."""
    if bool(args.ckpt) == bool(args.arch):
        raise UserError("pass either --ckpt (a pretrained checkpoint) or --arch with --data (supervised baseline)")
    if args.ckpt:
        return from_file(args.ckpt, args.img_size, args.intensity)
    if not args.data:
        raise UserError("--arch needs --data")
    return from_timm(args.arch, args.data, args.img_size or 384, args.pretrained, args.weights, args.norm,
                     args.intensity)


def file_identity(path: str) -> dict:
    """A file named so that `cd` and moved folders change nothing: its resolved path and SHA-256 (the report
    groups runs by the hash)."""
    return {"path": str(Path(path).resolve()), "sha256": checkpoint.sha256(path)}


def from_file(path: str, img_size: int | None, intensity: Intensity) -> Source:
    """A model checkpoint; `img_size` and `intensity`, when given (not None / auto), must be its own."""
    ckpt = checkpoint.load(path, kind="model")
    if img_size and img_size != ckpt["img_size"]:
        raise UserError(f"--img-size {img_size} differs from the checkpoint's {ckpt['img_size']}")
    saved = parse_intensity(ckpt.get("intensity", AUTO))  # checkpoints before --intensity: auto
    if intensity not in (AUTO, saved):
        raise UserError(f"--intensity {' '.join(map(str, intensity))} differs from the checkpoint's "
                        f"{' '.join(map(str, saved))}")
    return Source(from_checkpoint(ckpt), ckpt["arch"], ckpt["img_size"], ckpt["mean"], ckpt["std"], ckpt["method"],
                  ckpt.get("role"), ckpt.get("data"), ckpt.get("splits"), saved,
                  {key: ckpt[key] for key in ("timm_arch", "model_args") if key in ckpt}, file_identity(path))


def from_timm(arch: str, data: str, img_size: int, pretrained: bool, weights: str | None, norm: str,
              intensity: Intensity) -> Source:
    """A timm model for `data`: ImageNet weights (downloaded, or the local file `weights`) or random init."""
    model = create_model(arch, img_size=img_size, pretrained=pretrained, weights=weights)
    method = "supervised" if pretrained or weights else "random-init"
    identity = file_identity(weights) if weights else {"arch": arch, "pretrained": pretrained}
    return Source(model, arch, img_size, *model_norm(model, norm), method, None, data, None, intensity,
                  arch_record(arch), identity)
