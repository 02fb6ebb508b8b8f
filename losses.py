"""Losses: CASS's cross-architecture loss (Eq. 1, Alg. 1) and the focal loss
of fine-tuning (App. C.6.2) with its class weights. DINO's loss is in dino.py."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

CLASS_WEIGHTS = ("minmax", "inverse", "none")
FOCAL_FORMS = ("sigmoid", "softmax")


def cass_loss(r: torch.Tensor, t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Eq. 1: mean over the batch of 2 - 2 cos(r_i, t_i).

    r, t: (B, D) output logits of the CNN and the Transformer. Computed in
    float32 whatever the autocast dtype: the Alg. 1 noise (1e-6, 1e-10) would
    vanish in fp16. When r and t are identical, Gaussian noise is added to both
    (Alg. 1) so the loss keeps a non-zero gradient; whether they are is decided
    on the device (torch.where), so the host never waits for the step to get there.
    """
    r, t = r.float(), t.float()
    same = (r == t).all()
    r = torch.where(same, r + torch.randn_like(r) * 1e-9 + 1e-6, r)
    t = torch.where(same, t + torch.randn_like(t) * 1e-15 + 1e-10, t)
    cos = (F.normalize(r, dim=1, eps=eps) * F.normalize(t, dim=1, eps=eps)).sum(dim=1)
    return (2 - 2 * cos).mean()


def class_weights(counts: Sequence[int], scheme: str = "minmax") -> torch.Tensor | None:
    """Per-class loss weights from training counts (C,).

    minmax: the paper's "min-max normalised class distribution" scaled into
    [0.2, 1]: the most frequent class gets 1.0, the rarest 0.2 (App. C.6.2; this
    up-weights frequent classes). inverse: N / (C * n_c). none: no weights.
    """
    if scheme == "none":
        return None
    c = torch.as_tensor(counts, dtype=torch.float32)
    if scheme == "minmax":
        span = c.max() - c.min()
        return 0.2 + 0.8 * (c - c.min()) / span if span > 0 else torch.ones_like(c)
    if scheme == "inverse":
        return c.sum() / (len(c) * c.clamp(min=1))
    raise ValueError(f"unknown class-weight scheme {scheme!r}; choose from {CLASS_WEIGHTS}")


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 1.0, gamma: float = 2.0,
               weights: torch.Tensor | None = None, form: str = "sigmoid") -> torch.Tensor:
    """Focal loss (Lin et al. 2017), alpha 1 and gamma 2 as in App. C.6.2.

    logits: (B, C). targets: (B,) class ids or (B, C) multi-hot. weights: (C,).
    sigmoid (the paper's): per class, on one-hot / multi-hot targets, averaged over
    batch and classes as the published code does (a sum over classes is C times
    larger, so logged losses would not compare with it). softmax: multi-class only.
    `alpha` scales the loss; unlike torchvision's sigmoid_focal_loss it does not
    weight positives against negatives, which at alpha=1 would zero the negatives.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    if form == "sigmoid":
        hot = F.one_hot(targets, num_classes).float() if targets.dim() == 1 else targets.float()
        ce = F.binary_cross_entropy_with_logits(logits, hot, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * hot + (1 - p) * (1 - hot)
        loss = alpha * (1 - p_t) ** gamma * ce
        if weights is not None:
            loss = loss * weights.to(loss.device)
        return loss.mean()
    if form == "softmax":
        if targets.dim() != 1:
            raise ValueError("the softmax focal loss needs single-label targets")
        log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
        loss = -alpha * (1 - log_p.exp()) ** gamma * log_p
        if weights is not None:
            loss = loss * weights.to(loss.device)[targets]
        return loss.mean()
    raise ValueError(f"unknown focal form {form!r}; choose from {FOCAL_FORMS}")
