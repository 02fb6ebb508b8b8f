"""Losses: CASS's cross-architecture loss (Eq. 1, Alg. 1), the focal loss of
fine-tuning (App. C.6.2) with its class weights, and DINO's loss (the baseline)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

CLASS_WEIGHTS = ("minmax", "inverse", "none")
FOCAL_FORMS = ("sigmoid", "softmax")


def cass_loss(r: torch.Tensor, t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Eq. 1: mean over the batch of 2 - 2 cos(r_i, t_i).

    r, t: (B, D) output logits of the CNN and the Transformer. Computed in
    float32 whatever the autocast dtype: the Alg. 1 noise (1e-6, 1e-10) would
    vanish in fp16. When r and t are identical, Gaussian noise is added to both
    (Alg. 1) so the loss keeps a non-zero gradient.
    """
    r, t = r.float(), t.float()
    if torch.equal(r, t):
        r = r + torch.randn_like(r) * 1e-9 + 1e-6
        t = t + torch.randn_like(t) * 1e-15 + 1e-10
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


class DINOLoss(nn.Module):
    """DINO's self-distillation loss (Caron et al. 2021).

    Teacher targets softmax((t - center) / tau_t) over the 2 global views,
    student log_softmax(s / tau_s) over all `ncrops` views; the cross-entropy
    is averaged over every (teacher view, different student view) pair. tau_t
    warms up linearly from `warmup_teacher_temp` over the first
    `warmup_teacher_temp_epochs` epochs (clipped to the run). The center is an
    EMA (`center_momentum`) of the teacher's batch mean, updated after the loss.
    student_output: (ncrops * B, K); teacher_output: (2 * B, K), views stacked.
    """

    def __init__(self, out_dim: int, ncrops: int, epochs: int, *, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.07, warmup_teacher_temp_epochs: int = 30,
                 student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        warm = min(warmup_teacher_temp_epochs, epochs)
        self.teacher_temps = [warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * e / max(warm - 1, 1)
                              for e in range(warm)] + [teacher_temp] * (epochs - warm)
        self.teacher_entropy = torch.zeros(())

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        student_output, teacher_output = student_output.float(), teacher_output.float()
        student = F.log_softmax(student_output / self.student_temp, dim=-1).chunk(self.ncrops)
        teacher = F.softmax((teacher_output - self.center) / self.teacher_temps[epoch], dim=-1).detach()
        self.teacher_entropy = -(teacher * teacher.clamp_min(1e-30).log()).sum(-1).mean().detach()
        total, terms = 0.0, 0
        for t_view, q in enumerate(teacher.chunk(2)):
            for s_view, log_p in enumerate(student):
                if s_view != t_view:
                    total = total + (-q * log_p).sum(dim=-1).mean()
                    terms += 1
        self.update_center(teacher_output)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = teacher_output.sum(dim=0, keepdim=True)
        if dist.is_initialized():  # the center follows the global batch under torchrun
            dist.all_reduce(batch_center)
        batch_center = batch_center / (len(teacher_output) * (dist.get_world_size() if dist.is_initialized() else 1))
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
