"""Ours, beyond the paper (--anti-collapse; docs/collapse-study.md): objectives
that keep CASS's arms from mapping every image to one shared direction, which
from random initialisation drives Eq. 1 to 0 without the arms ever being
exactly equal (so Alg. 1's noise never fires). pretrain_cass.py imports this
module only when the option is not `none`, the paper's objective."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from losses import cass_loss


def variance_hinge(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's variance term (Bardes et al. 2022) on one arm's outputs z (B, D),
    L2-normalised and scaled by sqrt(D) so that outputs pointing in random
    directions have a standard deviation of about 1 in every dimension (the
    `healthy_std` of the collapse signals, in these units): the mean over
    dimensions of relu(1 - std_d) is 0 when every dimension spreads at least as
    much as random directions would, and 1 when the whole batch maps to one
    direction. (VICReg's covariance term is left out: at CASS's batch of 16 and
    D = 1000 outputs it is about D / B even for random directions and drowns
    the rest of the loss.)"""
    z = F.normalize(z.float(), dim=1) * z.shape[1] ** 0.5
    return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()


def predictor(dim: int, width: int) -> nn.Module:
    """SimSiam's predictor MLP for one arm's outputs (B, D): D -> width -> D, BatchNorm, ReLU."""
    return nn.Sequential(nn.Linear(dim, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                         nn.Linear(width, dim))


def objective(r: torch.Tensor, t: torch.Tensor, mode: str, variance_weight: float,
              predictors: list[nn.Module | None]) -> torch.Tensor:
    """The loss for the CNN's and the Transformer's outputs r, t (B, D): `variance`,
    Eq. 1 plus `variance_weight` times each arm's variance hinge; `predictor`,
    SimSiam's symmetric form, each arm's predictor (CNN's first) on its own
    output against the other arm's output with its gradient stopped;
    `predictor+variance`, the predictor's loss plus the variance hinges."""
    if mode not in ("variance", "predictor", "predictor+variance"):
        raise ValueError(f"unknown anti-collapse objective {mode!r}")
    if mode.startswith("predictor"):
        cnn, vit = predictors
        loss = 0.5 * (cass_loss(cnn(r), t.detach()) + cass_loss(vit(t), r.detach()))
    else:
        loss = cass_loss(r, t)
    if mode.endswith("variance"):
        loss = loss + variance_weight * (variance_hinge(r) + variance_hinge(t))
    return loss
