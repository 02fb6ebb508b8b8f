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
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import checkpoint
import demo
import pretraining
from cli import add_common_args, add_norm_arg, new_parser, non_negative_int, positive_float, positive_int, \
    run_cli
from dino import (DINOHead, MultiCropAugment, MultiCropNet, cancel_last_layer_grad, clip_gradients,
                  cosine_schedule, ema_update, local_size_for, param_groups)
from data import select
from knn import knn_accuracy
from losses import DINOLoss
from models import (check_arch, create_model, is_transformer, model_norm, normalise, optimizer_kwargs,
                    prepare_for_training)
from runtime import (UserError, all_reduce_sum, autocast, ddp, grad_scaler, is_main,
                     sync_batchnorm)

# The official recipes: ViTs (paper defaults) and ResNet-50 (the repository README).
RECIPES = {
    "vit": dict(optimizer="adamw", lr=5e-4, weight_decay=0.04, weight_decay_end=0.4,
                global_scale=[0.4, 1.0], local_scale=[0.05, 0.4]),
    "cnn": dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4,
                global_scale=[0.14, 1.0], local_scale=[0.05, 0.14]),
}
COLLAPSE_KL = 0.1  # nats: student matches teacher ...
COLLAPSE_FRACTION = 0.1  # ... and the teacher's entropy is within 10% of 0 or of ln K


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = new_parser(__doc__)
    add_common_args(p, epochs=100, bs=16, epochs_source="the CASS paper's DINO runs, Sec. 4.2",
                    img_size_help="global crop size; the fine-tuning input size")
    pretraining.add_run_args(p)
    p.add_argument("--arch", default="resnet50", help="timm model name (the paper: resnet50, vit_base_patch16_384)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from timm's ImageNet weights (Sec. 4.2); --no-pretrained: random init")
    p.add_argument("--weights", help="local file of ImageNet weights for --arch (offline machines)")
    p.add_argument("--out-dim", type=positive_int, default=65536, help="K, the head's output dimension")
    p.add_argument("--local-crops", type=non_negative_int, default=8, help="number of local crops")
    p.add_argument("--local-size", type=positive_int,
                   help="local crop size (default: 96 * img-size / 224, a multiple of 16)")
    p.add_argument("--global-scale", type=float, nargs=2, help="global crop scale range (default: by recipe)")
    p.add_argument("--local-scale", type=float, nargs=2, help="local crop scale range (default: by recipe)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), help="default: adamw for Transformers, sgd for CNNs")
    p.add_argument("--lr", type=positive_float, help="base lr at batch 256, scaled by bs/256 "
                   "(default: 5e-4 AdamW for Transformers, 0.03 SGD for CNNs)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="final lr of the cosine schedule")
    p.add_argument("--warmup-epochs", type=non_negative_int, default=10, help="linear lr warm-up (clipped to run)")
    p.add_argument("--weight-decay", type=float, help="start of the weight-decay cosine (0.04 ViT, 1e-4 CNN)")
    p.add_argument("--weight-decay-end", type=float, help="end of the weight-decay cosine (0.4 ViT, 1e-4 CNN)")
    p.add_argument("--momentum-teacher", type=float, default=0.996,
                   help="teacher EMA momentum, cosine to 1 (the authors advise 0.9995 for small batches)")
    p.add_argument("--teacher-temp", type=positive_float, default=0.07, help="final teacher temperature")
    p.add_argument("--warmup-teacher-temp", type=positive_float, default=0.04, help="initial teacher temperature")
    p.add_argument("--warmup-teacher-temp-epochs", type=non_negative_int, default=30,
                   help="epochs of linear teacher-temperature warm-up (clipped to the run)")
    p.add_argument("--clip-grad", type=float, default=3.0, help="per-parameter gradient norm cap (0: off)")
    p.add_argument("--freeze-last-layer", type=non_negative_int, default=1,
                   help="epochs during which the head's last layer is not updated")
    add_norm_arg(p)
    return pretraining.parse(p, argv, demo.DINO_MODEL)


def with_recipe(cfg: argparse.Namespace) -> argparse.Namespace:
    """Flags left unset take the recipe of the architecture's family."""
    check_arch(cfg.arch)
    recipe = RECIPES["vit" if is_transformer(cfg.arch) else "cnn"]
    filled = {k: v for k, v in recipe.items() if getattr(cfg, k) is None}
    local_size = cfg.local_size or local_size_for(cfg.img_size)
    return argparse.Namespace(**{**vars(cfg), **filled, "local_size": local_size})


def validate(cfg: argparse.Namespace) -> None:
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(cfg, name)
        if not 0 < lo <= hi <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be two numbers with 0 < low <= high <= 1")
    if cfg.clip_grad < 0 or cfg.min_lr < 0:
        raise UserError("--clip-grad and --min-lr must be 0 or more")
    if not 0 <= cfg.momentum_teacher <= 1:
        raise UserError(f"--momentum-teacher must be in [0, 1], got {cfg.momentum_teacher}")
    pretraining.check_out(cfg)


def build(cfg: argparse.Namespace, device: torch.device) -> tuple[MultiCropNet, MultiCropNet, list, list]:
    """Student and teacher (same start, no gradient for the teacher), input mean and std."""
    extra = {"dynamic_img_size": True} if is_transformer(cfg.arch) else {}  # local crops are smaller
    backbone = create_model(cfg.arch, img_size=cfg.img_size, num_classes=0, pretrained=cfg.pretrained,
                            weights=cfg.weights, **extra)
    prepare_for_training(backbone, cfg.arch, device, cfg.grad_ckpt)
    student = MultiCropNet(backbone, DINOHead(backbone.num_features, cfg.out_dim)).to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher, *model_norm(backbone, cfg.norm)


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


def schedules(cfg: argparse.Namespace, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """Per-step lr, weight decay and teacher momentum, indexed by global step
    (so resuming needs no scheduler state)."""
    return {"lr": cosine_schedule(cfg.lr * cfg.bs / 256, cfg.min_lr, cfg.epochs, steps_per_epoch,
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
class Nets:
    """Student and teacher, and what the step calls for each (DDP-wrapped, compiled or themselves)."""
    student: MultiCropNet
    teacher: MultiCropNet
    student_step: nn.Module
    teacher_step: nn.Module


def train_one_epoch(nets: Nets, loss_fn, loader, opt, scaler, sched, norm, cfg, device, dtype, epoch: int) -> dict:
    student, teacher = nets.student, nets.teacher
    student.train()
    teacher.train()
    loader.sampler.set_epoch(epoch)
    sums, nonfinite = torch.zeros(3, device=device), 0  # loss, teacher entropy, images
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not is_main())
    for step, (views, _) in enumerate(bar):
        it = epoch * len(loader) + step
        for i, group in enumerate(opt.param_groups):
            group["lr"] = float(sched["lr"][it])
            if i == 0:  # only the weights are decayed
                group["weight_decay"] = float(sched["wd"][it])
        views = [normalise(v.to(device, non_blocking=True), *norm) for v in views]
        with autocast(device, dtype):
            with torch.no_grad():
                t_out = nets.teacher_step(views[:2])  # the teacher sees the global views only
            s_out = nets.student_step(views)
        loss = loss_fn(s_out, t_out, epoch)
        opt.zero_grad(set_to_none=True)
        nonfinite = pretraining.nonfinite_streak(loss, scaler, nonfinite, epoch, step)
        if nonfinite:
            continue
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if cfg.clip_grad:
            clip_gradients(student, cfg.clip_grad)
        cancel_last_layer_grad(student, epoch, cfg.freeze_last_layer)
        scaler.step(opt)
        scaler.update()
        ema_update(teacher, student, sched["momentum"][it])
        n = len(views[0])
        sums += torch.stack([loss.detach() * n, loss_fn.teacher_entropy * n, torch.tensor(float(n), device=device)])
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    loss_sum, entropy_sum, seen = all_reduce_sum(sums).tolist()  # waits for the device: timing is honest
    seconds = time.perf_counter() - start
    loss, entropy, seen = loss_sum / max(seen, 1), entropy_sum / max(seen, 1), int(seen)
    pretraining.require_progress(seen, epoch)
    last = epoch * len(loader) + len(loader) - 1
    return {"epoch": epoch + 1, "loss": loss, "lr": float(sched["lr"][last]), "wd": float(sched["wd"][last]),
            "momentum": float(sched["momentum"][last]), "teacher_temp": loss_fn.teacher_temps[epoch],
            "seconds": round(seconds, 3), "images": seen, "images_per_s": round(seen / seconds, 2),
            "teacher_entropy": entropy, "kl": loss - entropy, "ln_k": math.log(cfg.out_dim),
            "collapse": collapse_kind(loss, entropy, cfg.out_dim)}


def describe(stats: dict) -> str:
    return (f"loss {stats['loss']:.4f} (ln K {stats['ln_k']:.2f}), teacher entropy {stats['teacher_entropy']:.3f}, "
            f"KL {stats['kl']:.3f}, {stats['images_per_s']} img/s")


def main(args: argparse.Namespace) -> Path:
    device, cfg, state = pretraining.start(args, "dino")
    cfg = with_recipe(cfg)
    validate(cfg)
    out, dtype = pretraining.setup(cfg, device)
    student, teacher, mean, std = build(cfg, device)
    if is_main():  # student, teacher and up to two optimiser moments
        pretraining.check_disk(out, [student], copies=4)
    augment = MultiCropAugment(cfg.img_size, cfg.local_size, cfg.local_crops, tuple(cfg.global_scale),
                               tuple(cfg.local_scale))
    # the crops come from the original image, or from a cached copy whose longer side is 2 x img-size
    index, splits, loader = pretraining.train_data(cfg, state, out, None, augment, device,
                                                   cache_spec=("fit", 2 * cfg.img_size))
    opt, loss_fn = optimizer_and_loss(cfg, student, device)
    scaler = grad_scaler(device, dtype)
    sched = schedules(cfg, len(loader))
    start = 0
    if state:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        opt.load_state_dict(state["opt"])
        loss_fn.load_state_dict(state["loss"])
        scaler.load_state_dict(state["scaler"])
        start = state["epoch"]
    student_step, teacher_step = ddp(student, device), sync_batchnorm(teacher, device)
    nets = Nets(student, teacher, *(torch.compile(n) if cfg.compile else n for n in (student_step, teacher_step)))

    def resume_state(epoch: int) -> dict:
        return {"kind": "resume", "method": "dino", "epoch": epoch + 1, "args": vars(cfg), "splits": splits,
                "student": checkpoint.plain_state_dict(student), "teacher": checkpoint.plain_state_dict(teacher),
                "opt": opt.state_dict(), "loss": loss_fn.state_dict(), "scaler": scaler.state_dict()}

    pretraining.run_epochs(
        cfg, out, start,
        lambda epoch: train_one_epoch(nets, loss_fn, loader, opt, scaler, sched, (mean, std), cfg, device, dtype,
                                      epoch),
        resume_state, describe,
        "the loss sits at ln K (uniform outputs) or the teacher's entropy is near 0 (one output dominates); "
        "see 'collapse' in log.jsonl, and try --momentum-teacher 0.9995 or another --teacher-temp",
        lambda: {"knn_teacher": knn_accuracy(teacher.backbone, index, select(index, splits), cfg.img_size, mean,
                                             std, device, dtype, bs=cfg.bs, workers=cfg.workers)})
    role = "vit" if is_transformer(cfg.arch) else "cnn"
    if is_main():
        record = pretraining.backbone_record(teacher.backbone, cfg, index, splits, arch=cfg.arch, role=role,
                                             method="dino", mean=mean, std=std)
        checkpoint.save(record, out / f"{role}.pt")
    print(f"saved the teacher backbone to {out / f'{role}.pt'}\n"
          f"next: python finetune.py --ckpt {out / f'{role}.pt'}" + (" --epochs 10" if cfg.demo else ""))
    return out


if __name__ == "__main__":
    run_cli(main, parse_args)
