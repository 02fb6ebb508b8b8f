"""CASS pretraining (Singh & Cirrone 2023, Sec. 3.1, Alg. 1, App. C.5): one
augmented view per image goes through a CNN and a Transformer, and 2 - 2 cos
between their logits pulls the two architectures together.

    python pretrain_cass.py --data ./dermofit --epochs 100 --bs 16
    python pretrain_cass.py --demo        # tiny models on generated images, CPU, about a minute
    python pretrain_cass.py --resume runs/cass-20260101-120000
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import checkpoint
import demo
import pretraining
from cli import add_common_args, add_norm_arg, new_parser, positive_float, run_cli
from data import select, train_augment
from knn import knn_accuracy
from losses import cass_loss
from models import (check_arch, create_model, model_norm, normalise, optimizer_kwargs,
                    prepare_for_training)
from runtime import UserError, all_reduce_sum, autocast, ddp, grad_scaler, is_main
from swa import SWA, default_start

HEAD_ACTS = {"none": lambda x: x, "softmax": lambda x: x.softmax(dim=1), "sigmoid": torch.sigmoid}
COLLAPSE_RATIO = 0.25  # batch std below a quarter of 1/sqrt(D): >~94% of the output is one shared direction
COLLAPSE_COS = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = new_parser(__doc__)
    add_common_args(p, epochs=100, bs=16, epochs_source="App. C.5.3")
    pretraining.add_run_args(p)
    p.add_argument("--cnn", default="resnet50", help="timm name of the CNN arm R (Sec. 3.1)")
    p.add_argument("--vit", default="vit_base_patch16_384", help="timm name of the Transformer arm T (Sec. 3.1)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from timm's ImageNet weights (Sec. 4.2); --no-pretrained: random init")
    p.add_argument("--cnn-weights", help="local file of ImageNet weights for --cnn (offline machines)")
    p.add_argument("--vit-weights", help="local file of ImageNet weights for --vit (offline machines)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate, both arms (App. C.5.3)")
    p.add_argument("--cnn-opt", choices=("adam", "sgd"), default="adam",
                   help="optimiser of the CNN arm (Table 10 ablation: SGD, momentum 0.9)")
    p.add_argument("--t-max", type=int, default=16, help="cosine annealing T_max (App. C.5.3)")
    p.add_argument("--eta-min", type=float, default=1e-6, help="cosine annealing minimum lr (App. C.5.3)")
    p.add_argument("--sched-step", choices=("batch", "epoch"), default="batch",
                   help="step the cosine schedule every batch (published code) or every epoch")
    p.add_argument("--swa", action=argparse.BooleanOptionalAction, default=True,
                   help="stochastic weight averaging (Sec. 3.1)")
    p.add_argument("--swa-start", type=int, help="first epoch (1-based) averaged; default: last quarter")
    p.add_argument("--head-act", choices=tuple(HEAD_ACTS), default="none",
                   help="activation on the logits before the loss (Table 11 ablation)")
    add_norm_arg(p)
    return pretraining.parse(p, argv, demo.CASS_MODELS)


def validate(cfg: argparse.Namespace) -> None:
    """Every flag error a user can make, before any data is read or model built."""
    check_arch(cfg.cnn)
    check_arch(cfg.vit)
    if cfg.swa_start is not None and not 1 <= cfg.swa_start <= cfg.epochs:
        raise UserError(f"--swa-start must be between 1 and --epochs ({cfg.epochs}), got {cfg.swa_start}")
    if cfg.eta_min < 0:
        raise UserError(f"--eta-min must be 0 or more, got {cfg.eta_min}")
    if cfg.t_max < 1:
        raise UserError(f"--t-max must be at least 1, got {cfg.t_max}")
    pretraining.check_out(cfg)


@dataclass
class Arm:
    """One side of CASS: its own network, optimiser, schedule, SWA and input normalisation."""
    name: str
    arch: str
    model: nn.Module  # what is averaged and saved
    net: nn.Module  # what the training step calls (same parameters; maybe compiled)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    swa: SWA | None
    mean: list[float]
    std: list[float]


def build_arm(name: str, arch: str, weights: str | None, cfg: argparse.Namespace, device: torch.device) -> Arm:
    model = create_model(arch, img_size=cfg.img_size, pretrained=cfg.pretrained, weights=weights,
                         weights_flag=f"--{name}-weights").to(device)
    prepare_for_training(model, arch, device, cfg.grad_ckpt)
    net = ddp(model, device)
    net = torch.compile(net) if cfg.compile else net
    if name == "cnn" and cfg.cnn_opt == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, **optimizer_kwargs(device))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, **optimizer_kwargs(device))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.t_max, eta_min=cfg.eta_min)
    start = cfg.swa_start - 1 if cfg.swa_start else default_start(cfg.epochs)
    swa = SWA(model, start) if cfg.swa else None
    return Arm(name, arch, model, net, opt, sched, swa, *model_norm(model, cfg.norm))


def collapse_signals(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[std_r, std_t, cos] for one batch (B >= 2): std across the batch of the
    L2-normalised outputs averaged over dimensions (about 1/sqrt(D) when
    healthy, about 0 when every image maps to one direction), and the mean
    cosine between the arms."""
    rn, tn = F.normalize(r, dim=1), F.normalize(t, dim=1)
    return torch.stack([rn.std(0).mean(), tn.std(0).mean(), (rn * tn).sum(1).mean()])


def is_collapsed(std_r: float, std_t: float, cos: float, healthy: float) -> bool:
    """Both arms map every image to nearly one direction and agree on it: the
    trivial solution that drives the loss to 0 without the arms ever being
    exactly equal (so Alg. 1's noise never fires). A heuristic; see README."""
    return max(std_r, std_t) < COLLAPSE_RATIO * healthy and cos > COLLAPSE_COS


def train_one_epoch(arms: list[Arm], loader, scaler, cfg, device, dtype, epoch: int) -> dict:
    cnn, vit = arms
    act = HEAD_ACTS[cfg.head_act]
    loader.sampler.set_epoch(epoch)
    for arm in arms:
        arm.model.train()
    sums = torch.zeros(6, device=device)  # loss, images, std_r, std_t, cos, images with signals
    nonfinite = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not is_main())
    for step, (x, _) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        with autocast(device, dtype):
            r = cnn.net(normalise(x, cnn.mean, cnn.std))
            t = vit.net(normalise(x, vit.mean, vit.std))
        r, t = act(r.float()), act(t.float())
        loss = cass_loss(r, t)
        for arm in arms:
            arm.opt.zero_grad(set_to_none=True)
        nonfinite = pretraining.nonfinite_streak(loss, scaler, nonfinite, epoch, step)
        if nonfinite:
            continue
        scaler.scale(loss).backward()
        for arm in arms:
            scaler.step(arm.opt)
        scaler.update()
        if cfg.sched_step == "batch":
            for arm in arms:
                arm.sched.step()
        n = len(x)
        with torch.no_grad():
            sums[0] += loss.detach() * n
            sums[1] += n
            if n > 1:  # a batch of one has no spread
                sums[2:5] += collapse_signals(r, t) * n
                sums[5] += n
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if cfg.sched_step == "epoch":
        for arm in arms:
            arm.sched.step()
    loss_sum, seen, *signal_sum, signal_seen = all_reduce_sum(sums).tolist()  # waits for the device
    seconds = time.perf_counter() - start
    std_r, std_t, cos = (v / max(signal_seen, 1) for v in signal_sum)
    healthy = 1 / math.sqrt(cnn.model.num_classes)
    seen = int(seen)
    pretraining.require_progress(seen, epoch)
    return {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1),
            "lr": cnn.opt.param_groups[0]["lr"], "seconds": round(seconds, 3),
            "images": seen, "images_per_s": round(seen / seconds, 2), "cnn_std": std_r, "vit_std": std_t,
            "healthy_std": healthy, "cos": cos, "collapse": is_collapsed(std_r, std_t, cos, healthy)}


def resume_state(arms: list[Arm], scaler, cfg, splits: dict, epoch: int) -> dict:
    """Everything needed to continue after `epoch` (0-based, complete). The data
    order and augmentations are a function of (seed, epoch), so no RNG state is needed."""
    arm_states = {arm.name: {"model": checkpoint.plain_state_dict(arm.model), "opt": arm.opt.state_dict(),
                             "sched": arm.sched.state_dict(),
                             "swa": arm.swa.state_dict() if arm.swa else None} for arm in arms}
    return {"kind": "resume", "method": "cass", "epoch": epoch + 1, "args": vars(cfg), "splits": splits,
            "scaler": scaler.state_dict(), **arm_states}


def restore(arms: list[Arm], scaler, state: dict) -> int:
    for arm in arms:
        saved = state[arm.name]
        arm.model.load_state_dict(saved["model"])
        arm.opt.load_state_dict(saved["opt"])
        arm.sched.load_state_dict(saved["sched"])
        if arm.swa:
            arm.swa.load_state_dict(saved["swa"])
    scaler.load_state_dict(state["scaler"])
    return state["epoch"]


def save_models(arms: list[Arm], loader, cfg, index, splits: dict, out: Path, device) -> None:
    """cnn.pt and vit.pt: the SWA-averaged networks (BatchNorm refreshed on the
    training data), each loadable on its own by finetune.py."""
    loader.sampler.set_epoch(cfg.epochs)
    for arm in arms:
        batches = (normalise(x.to(device), arm.mean, arm.std) for x, _ in loader)
        model = arm.swa.finalize(arm.model, batches) if arm.swa else arm.model  # every process (SyncBatchNorm)
        if is_main():
            record = pretraining.backbone_record(model, cfg, index, splits, arch=arm.arch, role=arm.name,
                                                 method="cass", mean=arm.mean, std=arm.std,
                                                 swa_averaged=arm.swa.count if arm.swa else 0)
            checkpoint.save(record, out / f"{arm.name}.pt")


def describe(stats: dict) -> str:
    return (f"loss {stats['loss']:.4f}, {stats['images_per_s']} img/s, batch std cnn {stats['cnn_std']:.4f} "
            f"vit {stats['vit_std']:.4f} (healthy ~{stats['healthy_std']:.4f}), cos {stats['cos']:.3f}")


def main(args: argparse.Namespace) -> Path:
    device, cfg, state = pretraining.start(args, "cass")
    validate(cfg)
    out, dtype = pretraining.setup(cfg, device)
    # models first: a missing weights file fails in seconds, not after indexing the data
    arms = [build_arm("cnn", cfg.cnn, cfg.cnn_weights, cfg, device),
            build_arm("vit", cfg.vit, cfg.vit_weights, cfg, device)]
    if is_main():  # weights, Adam's two moments and the SWA average
        pretraining.check_disk(out, [arm.model for arm in arms], copies=4)
    index, splits, loader = pretraining.train_data(cfg, state, out, cfg.img_size,
                                                   train_augment(cfg.img_size, cfg.aug), device,
                                                   cache_spec=("square", cfg.img_size))
    scaler = grad_scaler(device, dtype)
    start = restore(arms, scaler, state) if state else 0

    def train_epoch(epoch: int) -> dict:
        stats = train_one_epoch(arms, loader, scaler, cfg, device, dtype, epoch)
        for arm in arms:
            if arm.swa:
                arm.swa.update(arm.model, epoch)
        return stats

    parts = select(index, splits)

    def monitor() -> dict:
        return {f"knn_{arm.name}": knn_accuracy(arm.model, index, parts, cfg.img_size, arm.mean, arm.std, device,
                                                dtype, bs=cfg.bs, workers=cfg.workers, cache=loader.dataset.cache)
                for arm in arms}

    pretraining.run_epochs(
        cfg, out, start, train_epoch, lambda epoch: resume_state(arms, scaler, cfg, splits, epoch), describe,
        "both arms map every image to nearly the same output (batch std far below 1/sqrt(D)) and agree on "
        "it, so the low loss means little (the paper starts from ImageNet weights, --pretrained)", monitor)
    save_models(arms, loader, cfg, index, splits, out, device)
    print(f"saved {out / 'cnn.pt'} and {out / 'vit.pt'}\nnext: python finetune.py --ckpt {out / 'cnn.pt'}"
          + (" --epochs 10" if cfg.demo else ""))
    return out


if __name__ == "__main__":
    run_cli(main, parse_args)
