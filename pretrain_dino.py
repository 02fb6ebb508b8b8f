"""DINO pretraining, the baseline CASS is compared with (Caron et al. 2021;
recipe of facebookresearch/dino): a student and an EMA teacher of one
architecture, multi-crop views, centring and sharpening. One architecture per
run, as in the CASS paper; the teacher backbone is saved for finetune.py.

    python pretrain_dino.py --data ./dermofit --arch resnet50 --epochs 100 --bs 16
    python pretrain_dino.py --data ./dermofit --arch vit_base_patch16_384 --epochs 100 --bs 16
    python pretrain_dino.py --demo        # tiny model on generated images, CPU
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from plumbing import checkpoint
from plumbing import flags
from plumbing import loop
from plumbing import pretraining
from plumbing import runtime as rt
from method.dino import (DINOHead, DINOLoss, MultiCropAugment, MultiCropNet, cancel_last_layer_grad, clip_gradients,
                         cosine_schedule, ema_update, local_size_for, param_groups)
from errors import UserError
from evaluation.features import val_knn_accuracy
from plumbing.models import check_arch, is_transformer, normalise, optimizer_kwargs, training_model
from plumbing.pixels import ImageDataset

# The official recipes: ViTs (paper defaults) and ResNet-50 (the repository README).
RECIPES = {
    "vit": dict(optimizer="adamw", lr=5e-4, weight_decay=0.04, weight_decay_end=0.4,
                global_scale=[0.4, 1.0], local_scale=[0.05, 0.4], drop_path=0.1),
    "cnn": dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4,
                global_scale=[0.14, 1.0], local_scale=[0.05, 0.14], drop_path=0.0),
}
COLLAPSE_KL = 0.1  # nats: student matches teacher ...
COLLAPSE_FRACTION = 0.1  # ... and the teacher's entropy is within 10% of 0 or of ln K
COLLAPSE_HINT = ("the loss sits at ln K (uniform outputs) or the teacher's entropy is near 0 (one output "
                 "dominates); see 'collapse' in log.jsonl, and try --momentum-teacher 0.9995 or another --teacher-temp")
DEMO_MODELS = dict(arch="test_resnet", out_dim=4096)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p, g = flags.stage_parser(__doc__, pretraining=True, epochs=100,
                              epochs_source="the CASS paper's DINO runs, Sec. 4.2",
                              out_default="runs/dino-<timestamp>; with --demo runs/demo-dino",
                              img_size_help="global crop size; the fine-tuning input size (App. C.5.2)", aug=False)
    # The CASS paper runs DINO with its official recipe (Caron et al. 2021, and the repository's README)
    recipe = g.paper
    recipe.add_argument("--arch", default="resnet50",
                        help="timm model name (Sec. 4.2: resnet50, vit_base_patch16_384)")
    recipe.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                        help="start from timm's ImageNet weights (Sec. 4.2); --no-pretrained: random init")
    recipe.add_argument("--out-dim", type=flags.positive_int, default=65536, help="K, the head's output dimension")
    recipe.add_argument("--local-crops", type=flags.non_negative_int, default=8, help="number of local crops")
    recipe.add_argument("--local-size", type=flags.positive_int,
                        help="local crop size (default: 96 * img-size / 224, a multiple of 16)")
    recipe.add_argument("--global-scale", type=float, nargs=2, help="global crop scale range (default: by recipe)")
    recipe.add_argument("--local-scale", type=float, nargs=2, help="local crop scale range (default: by recipe)")
    recipe.add_argument("--optimizer", choices=("sgd", "adamw"), help="default: adamw for Transformers, sgd for CNNs")
    recipe.add_argument("--lr", type=flags.positive_float, help="base lr at batch 256, scaled by the global batch / "
                        "256 (default: 5e-4 AdamW for Transformers, 0.03 SGD for CNNs)")
    recipe.add_argument("--min-lr", type=float, default=1e-6, help="final lr of the cosine schedule")
    recipe.add_argument("--warmup-epochs", type=flags.non_negative_int, default=10,
                        help="linear lr warm-up (clipped to run)")
    recipe.add_argument("--weight-decay", type=float, help="start of the weight-decay cosine (0.04 ViT, 1e-4 CNN)")
    recipe.add_argument("--weight-decay-end", type=float, help="end of the weight-decay cosine (0.4 ViT, 1e-4 CNN)")
    recipe.add_argument("--momentum-teacher", type=float, default=0.996,
                        help="teacher EMA momentum, cosine to 1 (the authors advise 0.9995 for small batches)")
    recipe.add_argument("--teacher-temp", type=flags.positive_float, default=0.07, help="final teacher temperature")
    recipe.add_argument("--warmup-teacher-temp", type=flags.positive_float, default=0.04,
                        help="initial teacher temperature")
    recipe.add_argument("--warmup-teacher-temp-epochs", type=flags.non_negative_int, default=30,
                        help="epochs of linear teacher-temperature warm-up (clipped to the run)")
    recipe.add_argument("--drop-path", type=float,
                        help="the student's stochastic depth; the teacher has none (0.1 for Transformers, 0 for CNNs)")
    recipe.add_argument("--clip-grad", type=float, default=3.0, help="per-parameter gradient norm cap (0: off)")
    recipe.add_argument("--freeze-last-layer", type=flags.non_negative_int, default=1,
                        help="epochs during which the head's last layer is not updated")
    g.running.add_argument("--weights", help="local file of ImageNet weights for --arch (offline machines)")
    return flags.parse_pretraining(p, argv, DEMO_MODELS)


def with_recipe(cfg: argparse.Namespace) -> argparse.Namespace:
    """Flags left unset take the recipe of the architecture's family (a new namespace)."""
    check_arch(cfg.arch)
    recipe = RECIPES["vit" if is_transformer(cfg.arch) else "cnn"]
    filled = {k: v for k, v in recipe.items() if getattr(cfg, k) is None}
    local_size = cfg.local_size or local_size_for(cfg.img_size)
    return argparse.Namespace(**{**vars(cfg), **filled, "local_size": local_size})


def validate(cfg: argparse.Namespace) -> argparse.Namespace:
    """The recipe's settings filled in (with_recipe) and checked, before any data is read or model built."""
    cfg = with_recipe(cfg)
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(cfg, name)
        if not 0 < lo <= hi <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be two numbers with 0 < low <= high <= 1")
    if cfg.clip_grad < 0 or cfg.min_lr < 0 or not 0 <= cfg.drop_path < 1:
        raise UserError("--clip-grad and --min-lr must be 0 or more, --drop-path in [0, 1)")
    if not 0 <= cfg.momentum_teacher <= 1:
        raise UserError(f"--momentum-teacher must be in [0, 1], got {cfg.momentum_teacher}")
    if warning := warmup_warning(cfg):
        print(warning, flush=True)
    return cfg


def warmup_warning(cfg: argparse.Namespace) -> str | None:
    """One `warning:` line naming each warm-up that the run ends before (None when none): both are
    squeezed into the run, so a short run never trains at the settings its flags name. The lr's needs
    an epoch after it to reach its peak and decay; the teacher temperature's ends in its last epoch."""
    late = ([f"--warmup-epochs {cfg.warmup_epochs} (the lr rises to the end and never decays)"]
            if cfg.warmup_epochs >= cfg.epochs else []) + \
        ([f"--warmup-teacher-temp-epochs {cfg.warmup_teacher_temp_epochs}"]
         if cfg.warmup_teacher_temp_epochs > cfg.epochs else [])
    return (f"warning: warm-up squeezed into the run's {cfg.epochs} epochs: {', '.join(late)}; shorten it for a "
            "short run") if late else None


def build(cfg: argparse.Namespace, device: torch.device) -> tuple[MultiCropNet, MultiCropNet, list, list]:
    """Student and teacher (same start, no gradient for the teacher, no
    stochastic depth in the teacher, as in the official code), input mean and
    std. Seeded first: the head's (and a random init's) draws follow --seed."""
    rt.seed_everything(cfg.seed)
    extra = {"dynamic_img_size": True} if is_transformer(cfg.arch) else {}  # local crops are smaller
    nets = []
    for drop_path in (cfg.drop_path, 0.0):
        backbone, mean, std = training_model(cfg.arch, device, grad_ckpt=cfg.grad_ckpt, norm=cfg.norm,
                                             img_size=cfg.img_size, num_classes=0, pretrained=cfg.pretrained,
                                             weights=cfg.weights, **extra,
                                             **({"drop_path_rate": drop_path} if drop_path else {}))
        nets.append(MultiCropNet(backbone, DINOHead(backbone.num_features, cfg.out_dim)).to(device))
    student, teacher = nets
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher, mean, std


def optimizer_and_loss(cfg: argparse.Namespace, student: MultiCropNet,
                       device: torch.device) -> tuple[torch.optim.Optimizer, DINOLoss]:
    """SGD (momentum 0.9) or AdamW over decayed / non-decayed groups; the lr and
    weight decay are set every step from the schedules."""
    extra = {"momentum": 0.9} if cfg.optimizer == "sgd" else {}
    optimizer = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.AdamW
    opt = optimizer(param_groups(student), lr=0.0, **extra, **optimizer_kwargs(device))
    loss_fn = DINOLoss(cfg.out_dim, 2 + cfg.local_crops, cfg.epochs, teacher_temp=cfg.teacher_temp,
                       warmup_teacher_temp=cfg.warmup_teacher_temp,
                       warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs).to(device)
    return opt, loss_fn


def schedules(cfg: argparse.Namespace, steps_per_epoch: int, world: int) -> dict[str, np.ndarray]:
    """Per-step lr, weight decay and teacher momentum, indexed by global step
    (so resuming needs no scheduler state). The lr scales with the global
    batch, --bs times the `world` processes, as in the official code."""
    return {"lr": cosine_schedule(cfg.lr * cfg.bs * world / 256, cfg.min_lr, cfg.epochs, steps_per_epoch,
                                  warmup_epochs=min(cfg.warmup_epochs, cfg.epochs)),
            "wd": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch),
            "momentum": cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps_per_epoch)}


def collapse_kind(loss: float, entropy: float, out_dim: int) -> str | None:
    """'uniform' (teacher and student flat: loss stuck at ln K), 'one-dimension'
    (one output dominates: teacher entropy near 0), or None."""
    kl = loss - entropy
    if kl > COLLAPSE_KL:
        return None
    if entropy > (1 - COLLAPSE_FRACTION) * math.log(out_dim):
        return "uniform"
    return "one-dimension" if entropy < COLLAPSE_FRACTION * math.log(out_dim) else None


@dataclass
class Training:
    """Everything a DINO step reads or updates."""
    student: MultiCropNet
    teacher: MultiCropNet
    student_step: nn.Module  # what the step calls: the student, DDP-wrapped or compiled
    teacher_step: nn.Module
    loss_fn: DINOLoss
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedules: dict[str, np.ndarray]  # per global step: lr, wd, momentum
    mean: list[float]
    std: list[float]

    def resumable(self) -> dict:
        """What last.pt keeps."""
        return {"student": self.student, "teacher": self.teacher, "opt": self.opt, "loss": self.loss_fn,
                "scaler": self.scaler}


def train_one_epoch(run: Training, loader: DataLoader, cfg: argparse.Namespace, device: torch.device,
                    dtype: torch.dtype | None, epoch: int) -> dict:
    """One pass over the train split; the epoch's log record."""
    run.student.train()
    run.teacher.train()
    loader.sampler.set_epoch(epoch)
    sums = {k: torch.zeros((), device=device) for k in ("loss", "entropy", "images")}
    guard, usage = loop.NonFinite(dtype, epoch), loop.EpochUsage(loader, device)
    bar = tqdm(usage, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not rt.is_main())
    for step, (views, _) in enumerate(bar):
        it = epoch * len(loader) + step
        for i, group in enumerate(run.opt.param_groups):
            group["lr"] = float(run.schedules["lr"][it])
            if i == 0:  # only the weights are decayed
                group["weight_decay"] = float(run.schedules["wd"][it])
        views = [normalise(v.to(device, non_blocking=True), run.mean, run.std) for v in views]
        with rt.autocast(device, dtype):
            with torch.no_grad():
                t_out = run.teacher_step(views[:2])  # the teacher sees the global views only
            s_out = run.student_step(views)
        loss, entropy = run.loss_fn(s_out, t_out, epoch)
        run.opt.zero_grad(set_to_none=True)
        if guard.skip(loss, step):  # not finite: no update, the center and the teacher stay
            continue
        run.loss_fn.update_center(t_out)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.opt)
        if cfg.clip_grad:
            clip_gradients(run.student, cfg.clip_grad)
        cancel_last_layer_grad(run.student, epoch, cfg.freeze_last_layer)
        run.scaler.step(run.opt)
        run.scaler.update()
        ema_update(run.teacher, run.student, run.schedules["momentum"][it])
        n = len(views[0])
        sums["loss"] += loss.detach() * n
        sums["entropy"] += entropy * n
        sums["images"] += n
        if step % 10 == 0:
            bar.set_postfix(loss=f"{guard.loss:.4f}")  # read by the guard: no second wait
    total = usage.total(sums)
    seen = int(total["images"])
    guard.require_progress(seen)
    loss, entropy = total["loss"] / seen, total["entropy"] / seen
    last = epoch * len(loader) + len(loader) - 1
    return {"epoch": epoch + 1, "loss": loss, "lr": float(run.schedules["lr"][last]),
            "wd": float(run.schedules["wd"][last]), "momentum": float(run.schedules["momentum"][last]),
            "teacher_temp": run.loss_fn.teacher_temps[epoch], **usage.record(seen), "teacher_entropy": entropy,
            "kl": loss - entropy, "ln_k": math.log(cfg.out_dim), "collapse": collapse_kind(loss, entropy, cfg.out_dim)}


def report_epoch(stats: dict, epoch: int, warned: bool) -> bool:
    """The epoch's line; a suspected collapse explained once, then one short line an epoch. Whether it was."""
    knn = f", knn_teacher {stats['knn_teacher']:.3f}" if stats.get("knn_teacher") is not None else ""
    print(f"epoch {epoch + 1}: loss {stats['loss']:.4f} (ln K {stats['ln_k']:.2f}), teacher entropy "
          f"{stats['teacher_entropy']:.3f}, KL {stats['kl']:.3f}, {stats['images_per_s']} img/s{knn}"
          f"{loop.EpochUsage.text(stats)}", flush=True)
    if stats["collapse"]:
        print(f"warning: collapse still suspected (epoch {epoch + 1})" if warned else
              f"warning: collapse suspected: {COLLAPSE_HINT}", flush=True)
    return warned or bool(stats["collapse"])


def main(args: argparse.Namespace) -> Path:
    # ---- settings, device, run folder
    cfg, state, device, out = pretraining.start_run(args, "dino", validate)

    # ---- models first: a missing weights file fails in seconds, not after indexing the data
    student, teacher, mean, std = build(cfg, device)
    if rt.is_main():  # student, teacher and up to two optimiser moments
        pretraining.check_disk(out, [student], copies=4)

    # ---- data: the train split only; crops come from the original image, or from a
    # cached copy whose longer side is 2 x img-size
    index, splits, parts, cache = pretraining.run_data(cfg, state, out, "fit", 2 * cfg.img_size)
    augment = MultiCropAugment(cfg.img_size, cfg.local_size, cfg.local_crops, tuple(cfg.global_scale),
                               tuple(cfg.local_scale))
    # the kNN monitor reads square images at img-size: a cache of its own
    knn_cache = rt.image_cache(index, "square", cfg.img_size, cfg.cache_dir, cfg.workers, cfg.intensity) \
        if cfg.cache == "on" and cfg.knn_every and index.labelled and not index.multilabel else None
    train = ImageDataset(index.root, *index.part(parts["train"]), None, augment, cache, cfg.intensity)
    loader = pretraining.train_loader(train, cfg, device)

    # ---- optimiser, loss, schedules, precision, resume
    opt, loss_fn = optimizer_and_loss(cfg, student, device)
    dtype, scaler = rt.precision(cfg.amp, device)
    student_step, teacher_step = rt.ddp(student, device), rt.sync_batchnorm(teacher, device)
    if cfg.compile:
        student_step, teacher_step = torch.compile(student_step), torch.compile(teacher_step)
    run = Training(student, teacher, student_step, teacher_step, loss_fn, opt, scaler,
                   schedules(cfg, len(loader), rt.world_size()), mean, std)
    saves = pretraining.Saves(out, cfg, device, "dino", run.resumable(), splits)
    start = saves.restore(state)

    # ---- the epoch loop
    warned = False
    with saves:
        for epoch in range(start, cfg.epochs):
            rt.seed_everything(cfg.seed * 100_003 + epoch)  # a resumed run draws the same dropout
            stats = train_one_epoch(run, loader, cfg, device, dtype, epoch)  # the teacher's EMA is per step
            if rt.is_main():
                if cfg.knn_every and (epoch + 1) % cfg.knn_every == 0:
                    stats["knn_teacher"] = val_knn_accuracy(teacher.backbone, index, parts, cfg.img_size, mean, std,
                                                            device, dtype, bs=cfg.bs, workers=cfg.workers,
                                                            cache=knn_cache, intensity=cfg.intensity)
                checkpoint.append_jsonl(out / "log.jsonl", stats)
                warned = report_epoch(stats, epoch, warned)
            saves.after_epoch(epoch)

    role = "vit" if is_transformer(cfg.arch) else "cnn"
    if rt.is_main():
        pretraining.save_backbone(out / f"{role}.pt", teacher.backbone, cfg, index, splits, arch=cfg.arch,
                                  mean=mean, std=std, method="dino", role=role)
    print(f"saved the teacher backbone to {out / f'{role}.pt'}\n"
          f"next: python finetune.py --ckpt {out / f'{role}.pt'}" + (" --epochs 3" if cfg.demo else ""))
    return out


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
