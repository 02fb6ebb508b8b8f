"""The pieces of DINO (Caron et al. 2021; facebookresearch/dino) that the
baseline needs beyond CASS's: projection head, multi-crop views and network,
per-step schedules, teacher EMA, gradient clipping, last-layer freezing, and
the self-distillation loss with its centring."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn
from torchvision.transforms import v2


class DINOHead(nn.Module):
    """in_dim -> 2048 -> 2048 -> 256 MLP (GELU), L2 normalisation, then a
    weight-normalised linear layer to `out_dim` with its norm fixed to 1
    (DINO's norm_last_layer=True: each output row is a unit vector)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=1))


class MultiCropNet(nn.Module):
    """Backbone + head over a list of views: views of one resolution go
    through the backbone together, the head sees all of them at once.
    Returns (sum of view batch sizes, out_dim), views stacked in order."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        feats, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
                end += 1
            feats.append(self.backbone(torch.cat(views[start:end])))
            start = end
        return self.head(torch.cat(feats))


def _pil_blur(image: Image.Image) -> Image.Image:
    """DINO's Gaussian blur: Pillow's, radius (sigma) drawn from U(0.1, 2) by torch's generator, so that each
    image's seeded draw decides it (torchvision's exact 39 x 39 kernel at 384 px took about 100 times as long)."""
    return image.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(()).uniform_(0.1, 2.0))))


def _blur(p: float) -> v2.RandomApply:
    return v2.RandomApply([v2.Lambda(_pil_blur)], p=p)


class MultiCropAugment:
    """2 global crops (`global_size`, blur p=1 on the first; blur p=0.1 and
    solarize p=0.2 on the second) and `local_crops` crops at `local_size`
    (blur p=0.5); every view: flip p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1)
    p=0.8, grayscale p=0.2. Input: an RGB PIL image; output: a list of them."""

    def __init__(self, global_size: int, local_size: int, local_crops: int,
                 global_scale: tuple[float, float], local_scale: tuple[float, float]):
        def crop(size, scale):
            return v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC)

        flip_jitter = [v2.RandomHorizontalFlip(0.5),
                       v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(0.2)]
        self.global1 = v2.Compose([crop(global_size, global_scale), *flip_jitter, _blur(1.0)])
        self.global2 = v2.Compose([crop(global_size, global_scale), *flip_jitter, _blur(0.1),
                                   v2.RandomSolarize(128, p=0.2)])
        self.local = v2.Compose([crop(local_size, local_scale), *flip_jitter, _blur(0.5)])
        self.local_crops = local_crops

    def __call__(self, image: Image.Image) -> list[Image.Image]:
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.local_crops)]


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """One value per training step: linear warm-up, then cosine from `base` to `final`."""
    warmup = np.linspace(warmup_start, base, warmup_epochs * steps_per_epoch, endpoint=False) \
        if warmup_epochs else np.array([])
    steps = np.arange(epochs * steps_per_epoch - len(warmup))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's per-parameter clipping: each gradient's own L2 norm is capped at `clip`."""
    for p in model.parameters():
        if p.grad is not None:
            coef = clip / (p.grad.norm(2) + 1e-6)
            p.grad.mul_(coef.clamp(max=1.0))


def cancel_last_layer_grad(model: MultiCropNet, epoch: int, freeze_epochs: int) -> None:
    """No update of the head's last layer during the first `freeze_epochs` epochs."""
    if epoch < freeze_epochs:
        model.head.last_layer.weight.grad = None


def param_groups(model: nn.Module) -> list[dict]:
    """Weights get weight decay; biases and 1-D parameters (norms) do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def local_size_for(global_size: int) -> int:
    """DINO's 96 px local crops at 224 px global crops, scaled to `global_size`
    and rounded to a multiple of 16 (a ViT's patch size)."""
    return max(16, 16 * round(96 * global_size / 224 / 16))


class DINOLoss(nn.Module):
    """DINO's self-distillation loss (Caron et al. 2021).

    Teacher targets softmax((t - center) / tau_t) over the 2 global views,
    student log_softmax(s / tau_s) over all `ncrops` views; the cross-entropy
    is averaged over every (teacher view, different student view) pair. tau_t
    warms up linearly from `warmup_teacher_temp` over the first
    `warmup_teacher_temp_epochs` epochs (clipped to the run). The center is an
    EMA (`center_momentum`) of the teacher's batch mean: the caller updates it
    with `update_center` after a finite step, so a non-finite batch never
    reaches it. student_output: (ncrops * B, K); teacher_output: (2 * B, K),
    views stacked. Returns (loss, mean entropy of the teacher's targets).
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

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        student_output, teacher_output = student_output.float(), teacher_output.float()
        student = F.log_softmax(student_output / self.student_temp, dim=-1).chunk(self.ncrops)
        teacher = F.softmax((teacher_output - self.center) / self.teacher_temps[epoch], dim=-1).detach()
        entropy = -(teacher * teacher.clamp_min(1e-30).log()).sum(-1).mean().detach()
        total, terms = 0.0, 0
        for t_view, q in enumerate(teacher.chunk(2)):
            for s_view, log_p in enumerate(student):
                if s_view != t_view:
                    total = total + (-q * log_p).sum(dim=-1).mean()
                    terms += 1
        return total / terms, entropy

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)
        if dist.is_initialized():  # the center follows the global batch under torchrun
            dist.all_reduce(batch_center)
        batch_center = batch_center / (len(teacher_output) * (dist.get_world_size() if dist.is_initialized() else 1))
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
