"""CASS pretraining (Singh & Cirrone 2023, Sec. 3.1, Alg. 1, App. C.5): one
augmented view per image goes through a CNN and a Transformer, and 2 - 2 cos
between their logits pulls the two architectures together.

    python pretrain_cass.py --data ./dermofit --epochs 100 --bs 16
    python pretrain_cass.py --demo        # tiny models on generated images, CPU, about a minute
    python pretrain_cass.py --resume runs/cass-20260101-120000
"""
from __future__ import annotations

import argparse
import json
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
from cli import add_common_args, add_norm_arg, new_parser, positive_float, run_cli
from data import ImageDataset, index_data, make_loader, make_splits, select, train_augment
from losses import cass_loss
from models import check_arch, create_model, model_norm, normalise
from runtime import (UserError, amp_dtype, append_jsonl, autocast, default_out, grad_scaler, pick_device,
                     prepare_out_dir, print_args, seed_everything, write_json)
from swa import SWA, default_start

HEAD_ACTS = {"none": lambda x: x, "softmax": lambda x: x.softmax(dim=1), "sigmoid": torch.sigmoid}
COLLAPSE_RATIO = 0.25  # batch std below a quarter of 1/sqrt(D): >~94% of the output is one shared direction
COLLAPSE_COS = 0.9
MAX_NONFINITE = 10  # consecutive skipped fp16 steps before the run is stopped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = new_parser(__doc__)
    add_common_args(p, epochs=100, bs=16, epochs_source="App. C.5.3")
    p.add_argument("--demo", action="store_true",
                   help=f"generate a small image set; defaults become {demo.SETTINGS} (no data, GPU or internet needed)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt "
                   "(its own settings are used; only --workers and --device may change)")
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
    args = p.parse_args(argv)
    if args.demo:  # the demo's settings become defaults, so explicit flags still win
        p.set_defaults(**demo.SETTINGS)
        args = p.parse_args(argv)
    return args


def resolve(args: argparse.Namespace) -> tuple[argparse.Namespace, dict | None]:
    """The run's effective settings (a new namespace) and, when resuming, the saved state."""
    if args.resume:
        state = checkpoint.load(Path(args.resume) / "last.pt", kind="resume")
        saved = dict(state["args"], workers=args.workers, device=args.device, resume=args.resume)
        print(f"resuming {args.resume} at epoch {state['epoch'] + 1}; settings come from the run")
        return argparse.Namespace(**saved), state
    if args.demo:
        out = args.out or "runs/demo"
        data = demo.make_demo_dataset(Path(out) / "data", seed=args.seed)
        return argparse.Namespace(**{**vars(args), "data": str(data), "out": out}), None
    if not args.data:
        raise UserError("pass --data PATH (or --demo to try it on generated images, or --resume RUN_DIR)")
    return argparse.Namespace(**{**vars(args), "out": args.out or str(default_out("cass"))}), None


def validate(cfg: argparse.Namespace) -> None:
    """Every flag error a user can make, before any data is read or model built."""
    check_arch(cfg.cnn)
    check_arch(cfg.vit)
    if cfg.swa_start is not None and not 1 <= cfg.swa_start <= cfg.epochs:
        raise UserError(f"--swa-start must be between 1 and --epochs ({cfg.epochs}), got {cfg.swa_start}")
    if cfg.bs < 2:
        raise UserError("--bs must be at least 2: BatchNorm and the collapse signals need two images per batch")
    if cfg.t_max < 1:
        raise UserError(f"--t-max must be at least 1, got {cfg.t_max}")
    if not cfg.resume and not cfg.demo and (Path(cfg.out) / "last.pt").exists():
        raise UserError(f"{cfg.out} already holds a run; continue it with --resume {cfg.out} or pick another --out")


@dataclass
class Arm:
    """One side of CASS: its own network, optimiser, schedule, SWA and input normalisation."""
    name: str
    arch: str
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    swa: SWA | None
    mean: list[float]
    std: list[float]


def build_arm(name: str, arch: str, weights: str | None, cfg: argparse.Namespace, device: torch.device) -> Arm:
    model = create_model(arch, img_size=cfg.img_size, pretrained=cfg.pretrained, weights=weights,
                         weights_flag=f"--{name}-weights").to(device)
    if name == "cnn" and cfg.cnn_opt == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.t_max, eta_min=cfg.eta_min)
    start = cfg.swa_start - 1 if cfg.swa_start else default_start(cfg.epochs)
    swa = SWA(model, start) if cfg.swa else None
    return Arm(name, arch, model, opt, sched, swa, *model_norm(model, cfg.norm))


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
    loss_sum, signal_sum = torch.zeros((), device=device), torch.zeros(3, device=device)
    seen = signal_seen = nonfinite = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
    for step, (x, _) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        with autocast(device, dtype):
            r = cnn.model(normalise(x, cnn.mean, cnn.std))
            t = vit.model(normalise(x, vit.mean, vit.std))
        r, t = act(r.float()), act(t.float())
        loss = cass_loss(r, t)
        for arm in arms:
            arm.opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            nonfinite += 1
            if not scaler.is_enabled() or nonfinite > MAX_NONFINITE:
                raise UserError(f"the loss became non-finite at epoch {epoch + 1}, step {step + 1}; last.pt "
                                "holds the last complete epoch (try a lower --lr or --amp off)")
            continue
        nonfinite = 0
        scaler.scale(loss).backward()
        for arm in arms:
            scaler.step(arm.opt)
        scaler.update()
        if cfg.sched_step == "batch":
            for arm in arms:
                arm.sched.step()
        loss_sum += loss.detach() * len(x)
        seen += len(x)
        if len(x) > 1:
            with torch.no_grad():
                signal_sum += collapse_signals(r, t) * len(x)
            signal_seen += len(x)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if cfg.sched_step == "epoch":
        for arm in arms:
            arm.sched.step()
    seconds = time.perf_counter() - start
    std_r, std_t, cos = (signal_sum / max(signal_seen, 1)).tolist()
    healthy = 1 / math.sqrt(r.shape[1])
    return {"epoch": epoch + 1, "loss": loss_sum.item() / max(seen, 1),
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
        model = arm.swa.finalize(arm.model, batches) if arm.swa else arm.model
        record = checkpoint.model_record(
            model, arch=arm.arch, img_size=cfg.img_size, mean=arm.mean, std=arm.std, method="cass",
            role=arm.name, data=str(index.source), splits=splits, classes=index.classes,
            multilabel=index.multilabel, args=vars(cfg), epoch=cfg.epochs,
            swa_averaged=arm.swa.count if arm.swa else 0)
        checkpoint.save(record, out / f"{arm.name}.pt")


def keep_log_until(path: Path, epoch: int) -> None:
    """Drop log lines of epochs after `epoch` (a fresh run keeps none, a resumed
    one those of the epochs its last.pt holds)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= epoch]
        path.write_text("".join(line + "\n" for line in lines))


def main(args: argparse.Namespace) -> Path:
    cfg, state = resolve(args)
    validate(cfg)
    print_args(cfg)
    out = prepare_out_dir(Path(cfg.out))
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    dtype = amp_dtype(cfg.amp, device)

    # models first: a missing weights file fails in seconds, not after indexing the data
    arms = [build_arm("cnn", cfg.cnn, cfg.cnn_weights, cfg, device),
            build_arm("vit", cfg.vit, cfg.vit_weights, cfg, device)]

    index = index_data(cfg.data, workers=cfg.workers)
    splits = state["splits"] if state else make_splits(index, cfg.seed)
    write_json(out / "splits.json", {"data": str(index.source), "layout": index.layout, "seed": cfg.seed,
                                     "classes": index.classes, "skipped": index.skipped, **splits})
    write_json(out / "args.json", vars(cfg))
    keep_log_until(out / "log.jsonl", state["epoch"] if state else 0)
    train = select(index, splits)["train"]  # never val or test images (Sec. 4.1)
    dataset = ImageDataset(index, train, cfg.img_size, train_augment(cfg.img_size, cfg.aug))
    loader = make_loader(dataset, cfg.bs, shuffle=True, seed=cfg.seed, workers=cfg.workers,
                         drop_last=True, pin_memory=device.type == "cuda")

    scaler = grad_scaler(device, dtype)
    start = restore(arms, scaler, state) if state else 0

    for epoch in range(start, cfg.epochs):
        seed_everything(cfg.seed * 100_003 + epoch)  # dropout, drop-path, Alg. 1 noise: resumable too
        stats = train_one_epoch(arms, loader, scaler, cfg, device, dtype, epoch)
        for arm in arms:
            if arm.swa:
                arm.swa.update(arm.model, epoch)
        append_jsonl(out / "log.jsonl", stats)
        print(f"epoch {stats['epoch']}: loss {stats['loss']:.4f}, {stats['images_per_s']} img/s, batch std "
              f"cnn {stats['cnn_std']:.4f} vit {stats['vit_std']:.4f} (healthy ~{stats['healthy_std']:.4f}), "
              f"cos {stats['cos']:.3f}", flush=True)
        if stats["collapse"]:
            print("warning: collapse suspected: both arms map every image to nearly the same output "
                  "(batch std far below 1/sqrt(D)) and agree on it, so the low loss means little; "
                  "ImageNet initialisation (the paper's setting) avoids this", flush=True)
        checkpoint.save(resume_state(arms, scaler, cfg, splits, epoch), out / "last.pt")

    save_models(arms, loader, cfg, index, splits, out, device)
    print(f"saved {out / 'cnn.pt'} and {out / 'vit.pt'}\nnext: python finetune.py --ckpt {out / 'cnn.pt'}"
          + (" --epochs 10" if cfg.demo else ""))
    return out


if __name__ == "__main__":
    run_cli(main, parse_args)
