"""CASS pretraining (Singh & Cirrone 2023, Sec. 3.1, Alg. 1, App. C.5): one
augmented view per image goes through a CNN and a Transformer, and 2 - 2 cos
between their logits pulls the two architectures together.

    python pretrain_cass.py --data ./dermofit --epochs 100 --bs 16
    python pretrain_cass.py --demo        # tiny models on generated images, CPU, about 10 s
    python pretrain_cass.py --resume runs/cass-20260101-120000
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from plumbing import checkpoint
from plumbing import flags
from plumbing import loop
from plumbing import pretraining
from plumbing import runtime as rt
from data import DataIndex
from errors import UserError
from losses import cass_loss
from evaluation.features import val_knn_accuracy
from plumbing.models import check_arch, normalise, optimizer_kwargs, training_model
from plumbing.pixels import ImageDataset, train_augment
from swa import SWA, default_start

HEAD_ACTS = {"none": lambda x: x, "softmax": lambda x: x.softmax(dim=1), "sigmoid": torch.sigmoid}
COLLAPSE_RATIO = 0.25  # batch std below a quarter of 1/sqrt(D): >~94% of the output is one shared direction
COLLAPSE_COS = 0.9
COLLAPSE_HINT = ("both arms map every image to nearly the same output (batch std far below 1/sqrt(D)) and agree "
                 "on it, so the low loss means little (the paper starts from ImageNet weights, --pretrained)")
ANTI_COLLAPSE = ("none", "variance", "predictor", "predictor+variance")  # ours: docs/collapse-study.md
DEMO_MODELS = dict(cnn="test_resnet", vit="test_vit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p, g = flags.stage_parser(__doc__, pretraining=True, epochs=100, epochs_source="App. C.5.3",
                              out_default="runs/cass-<timestamp>; with --demo runs/demo-cass")
    g.paper.add_argument("--cnn", default="resnet50", help="timm name of the CNN arm R (Sec. 3.1)")
    g.paper.add_argument("--vit", default="vit_base_patch16_384", help="timm name of the Transformer arm T (Sec. 3.1)")
    g.paper.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                         help="start from timm's ImageNet weights (Sec. 4.2); --no-pretrained: random init")
    g.paper.add_argument("--lr", type=flags.positive_float, default=1e-3,
                         help="Adam learning rate, both arms (App. C.5.3)")
    g.paper.add_argument("--t-max", type=int, default=16, help="cosine annealing T_max (App. C.5.3)")
    g.paper.add_argument("--eta-min", type=float, default=1e-6, help="cosine annealing minimum lr (App. C.5.3)")
    g.paper.add_argument("--sched-step", choices=("batch", "epoch"), default="batch",
                         help="step App. C.5.3's cosine schedule every batch (published code) or every epoch")
    g.paper.add_argument("--swa", action=argparse.BooleanOptionalAction, default=True,
                         help="stochastic weight averaging (Sec. 3.1)")
    g.paper.add_argument("--swa-start", type=int,
                         help="first epoch (1-based) averaged (Sec. 3.1 gives none); default: last quarter")
    g.ablations.add_argument("--cnn-opt", choices=("adam", "sgd"), default="adam",
                             help="optimiser of the CNN arm (Table 10 ablation: SGD, momentum 0.9)")
    g.ablations.add_argument("--head-act", choices=tuple(HEAD_ACTS), default="none",
                             help="activation on the logits before the loss (Table 11 ablation)")
    g.ours.add_argument("--anti-collapse", choices=ANTI_COLLAPSE, default="none",
                        help="none = the paper; add VICReg's variance hinge on each arm's outputs (variance), or "
                             "give each arm a SimSiam predictor that predicts the other arm's stopped output "
                             "(predictor), or both: anticollapse.py")
    g.ours.add_argument("--vit-lr", type=flags.positive_float,
                        help="learning rate of the Transformer arm alone (default: --lr, as in the paper)")
    g.ours.add_argument("--variance-weight", type=float, default=1.0, help="weight of each arm's variance hinge")
    g.ours.add_argument("--predictor-dim", type=flags.positive_int, default=512,
                        help="hidden width of the predictor MLP (D -> width -> D, BatchNorm, ReLU)")
    g.running.add_argument("--cnn-weights", help="local file of ImageNet weights for --cnn (offline machines)")
    g.running.add_argument("--vit-weights", help="local file of ImageNet weights for --vit (offline machines)")
    return flags.parse_pretraining(p, argv, DEMO_MODELS)


def validate(cfg: argparse.Namespace) -> argparse.Namespace:
    """Every flag error a user can make, before any data is read or model built; the settings."""
    check_arch(cfg.cnn)
    check_arch(cfg.vit)
    if cfg.swa_start is not None and not 1 <= cfg.swa_start <= cfg.epochs:
        raise UserError(f"--swa-start must be between 1 and --epochs ({cfg.epochs}), got {cfg.swa_start}")
    if cfg.eta_min < 0:
        raise UserError(f"--eta-min must be 0 or more, got {cfg.eta_min}")
    if cfg.t_max < 1:
        raise UserError(f"--t-max must be at least 1, got {cfg.t_max}")
    return cfg


@dataclass
class Arm:
    """One side of CASS: its own network, optimiser, schedule, SWA and input normalisation."""
    name: str
    arch: str
    model: nn.Module  # what is averaged and saved
    net: nn.Module  # what the training step calls (same parameters; maybe DDP-wrapped or compiled)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    swa: SWA | None
    mean: list[float]
    std: list[float]
    predictor: nn.Module | None = None  # --anti-collapse predictor: trained, never saved with the network
    pred_net: nn.Module | None = None  # what the step calls (DDP-wrapped)

    def train(self) -> None:
        self.model.train()
        if self.predictor:
            self.predictor.train()

    def resumable(self) -> dict:
        """What last.pt keeps of this arm."""
        return {"model": self.model, "opt": self.opt, "sched": self.sched, "swa": self.swa,
                "predictor": self.predictor}


def build_arm(name: str, arch: str, weights: str | None, cfg: argparse.Namespace, device: torch.device) -> Arm:
    model, mean, std = training_model(arch, device, grad_ckpt=cfg.grad_ckpt, norm=cfg.norm, img_size=cfg.img_size,
                                      pretrained=cfg.pretrained, weights=weights, weights_flag=f"--{name}-weights")
    net = rt.ddp(model, device)
    net = torch.compile(net) if cfg.compile else net
    predictor = None
    if cfg.anti_collapse.startswith("predictor"):
        from method.anticollapse import predictor  # ours, beyond the paper: only the option needs it
        predictor = predictor(model.num_classes, cfg.predictor_dim).to(device)
    params = [*model.parameters(), *(predictor.parameters() if predictor else [])]
    lr = cfg.vit_lr if name == "vit" and cfg.vit_lr else cfg.lr
    if name == "cnn" and cfg.cnn_opt == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, **optimizer_kwargs(device))
    else:
        opt = torch.optim.Adam(params, lr=lr, **optimizer_kwargs(device))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.t_max, eta_min=cfg.eta_min)
    start = cfg.swa_start - 1 if cfg.swa_start else default_start(cfg.epochs)
    swa = SWA(model, start) if cfg.swa else None
    return Arm(name, arch, model, net, opt, sched, swa, mean, std, predictor,
               rt.ddp(predictor, device) if predictor else None)


def collapse_signals(r: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """For one batch (B >= 2) of outputs (B, D) of each arm: the std across the
    batch of the L2-normalised outputs averaged over dimensions (about
    1/sqrt(D) when healthy, about 0 when every image maps to one direction),
    and the mean cosine between the arms."""
    rn, tn = F.normalize(r, dim=1), F.normalize(t, dim=1)
    return {"cnn_std": rn.std(0).mean(), "vit_std": tn.std(0).mean(), "cos": (rn * tn).sum(1).mean()}


def is_collapsed(std_r: float, std_t: float, cos: float, healthy: float) -> bool:
    """Both arms map every image to nearly one direction and agree on it: the
    trivial solution that drives the loss to 0 without the arms ever being
    exactly equal (so Alg. 1's noise never fires). A heuristic; docs/collapse-study.md."""
    return max(std_r, std_t) < COLLAPSE_RATIO * healthy and cos > COLLAPSE_COS


def objective(r: torch.Tensor, t: torch.Tensor, arms: list[Arm], cfg: argparse.Namespace) -> torch.Tensor:
    """The loss the step minimises: Eq. 1, the paper's (--anti-collapse none), or one of ours."""
    if cfg.anti_collapse == "none":
        return cass_loss(r, t)
    from method.anticollapse import objective as ours  # only the option needs it
    return ours(r, t, cfg.anti_collapse, cfg.variance_weight, [arm.pred_net for arm in arms])


class EpochWatch:
    """The monitoring beside the CASS step: the step's guard (loop.NonFinite), the progress bar and the loader's
    waits (loop.EpochUsage), and the epoch's sums (loss, images, Eq. 1, the collapse signals), kept on the device
    so that no step waits for them."""

    def __init__(self, loader: DataLoader, cfg: argparse.Namespace, device: torch.device, dtype: torch.dtype | None,
                 epoch: int):
        loader.sampler.set_epoch(epoch)
        self.usage, self.cfg, self.epoch = loop.EpochUsage(loader, device), cfg, epoch
        self.guard = loop.NonFinite(dtype, epoch)
        self.bar = tqdm(self.usage, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not rt.is_main())
        self.sums = {k: torch.zeros((), device=device) for k in ("loss", "images", "cnn_std", "vit_std", "cos",
                                                                 "spread", "eq1")}
        self.steps = 0

    def __iter__(self):
        return iter(self.bar)

    def add(self, loss: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> None:
        """One step taken: its loss and the batch's outputs (B, D) of each arm."""
        n, sums = len(r), self.sums
        sums["loss"] += loss.detach() * n
        sums["images"] += n
        # the paper's loss, also when the objective adds to it
        sums["eq1"] += (loss if self.cfg.anti_collapse == "none" else cass_loss(r.detach(), t.detach())).detach() * n
        if n > 1:  # a batch of one has no spread
            with torch.no_grad():
                for key, value in collapse_signals(r, t).items():
                    sums[key] += value * n
            sums["spread"] += n
        if self.steps % 10 == 0:
            self.bar.set_postfix(loss=f"{self.guard.loss:.4f}")  # read by the guard: no second wait
        self.steps += 1

    def record(self, lr: float, out_dim: int) -> dict:
        """The epoch's log record, its sums added over every process (the epoch's one wait for the device)."""
        total = self.usage.total(self.sums)
        seen, spread = int(total["images"]), max(total["spread"], 1)
        self.guard.require_progress(seen)
        std_r, std_t, cos = total["cnn_std"] / spread, total["vit_std"] / spread, total["cos"] / spread
        healthy = 1 / math.sqrt(out_dim)
        return {"epoch": self.epoch + 1, "loss": total["loss"] / seen, "lr": lr, **self.usage.record(seen),
                "eq1_loss": total["eq1"] / seen,
                "cnn_std": std_r, "vit_std": std_t, "healthy_std": healthy, "cos": cos,
                "collapse": is_collapsed(std_r, std_t, cos, healthy),
                "collapsed_arms": [name for name, std in (("cnn", std_r), ("vit", std_t))
                                   if std < COLLAPSE_RATIO * healthy]}


def train_one_epoch(arms: list[Arm], loader: DataLoader, scaler: torch.amp.GradScaler, cfg: argparse.Namespace,
                    device: torch.device, dtype: torch.dtype | None, epoch: int) -> dict:
    """One pass over the train split (Alg. 1); the epoch's log record."""
    cnn, vit = arms
    act = HEAD_ACTS[cfg.head_act]
    for arm in arms:
        arm.train()
    watch = EpochWatch(loader, cfg, device, dtype, epoch)
    for step, (x, _) in enumerate(watch):
        # ---- the CASS step: one view through both arms, Eq. 1 between their logits, both arms step
        x = x.to(device, non_blocking=True)
        with rt.autocast(device, dtype):
            r = cnn.net(normalise(x, cnn.mean, cnn.std))
            t = vit.net(normalise(x, vit.mean, vit.std))
        r, t = act(r.float()), act(t.float())
        loss = objective(r, t, arms, cfg)
        for arm in arms:
            arm.opt.zero_grad(set_to_none=True)
        if watch.guard.skip(loss, step):  # not finite: no update
            continue
        scaler.scale(loss).backward()
        for arm in arms:
            scaler.step(arm.opt)
        scaler.update()
        if cfg.sched_step == "batch":
            for arm in arms:
                arm.sched.step()
        watch.add(loss, r, t)
    if cfg.sched_step == "epoch":
        for arm in arms:
            arm.sched.step()
    return watch.record(cnn.opt.param_groups[0]["lr"], cnn.model.num_classes)


def save_models(arms: list[Arm], loader: DataLoader, cfg: argparse.Namespace, index: DataIndex, splits: dict,
                out: Path, device: torch.device) -> None:
    """cnn.pt and vit.pt: the SWA-averaged networks (BatchNorm refreshed on the
    training data), each loadable on its own by finetune.py."""
    loader.sampler.set_epoch(cfg.epochs)
    for arm in arms:
        batches = (normalise(x.to(device), arm.mean, arm.std) for x, _ in loader)
        model = arm.swa.finalize(arm.model, batches) if arm.swa else arm.model  # every process (SyncBatchNorm)
        if rt.is_main():
            pretraining.save_backbone(out / f"{arm.name}.pt", model, cfg, index, splits, arch=arm.arch,
                                      mean=arm.mean, std=arm.std, method="cass", role=arm.name,
                                      anti_collapse=cfg.anti_collapse, swa_averaged=arm.swa.count if arm.swa else 0)


def report_epoch(stats: dict, epoch: int, cfg: argparse.Namespace, warned: set[str]) -> set[str]:
    """The epoch's line; a suspected collapse of both arms together, or of one arm alone (its outputs nearly
    the same for every image while the loss may look healthy), explained once, then one short line an epoch.
    The warnings given so far."""
    knn = "".join(f", {k} {v:.3f}" for k, v in stats.items() if k.startswith("knn_") and v is not None)
    print(f"epoch {epoch + 1}: loss {stats['loss']:.4f}, {stats['images_per_s']} img/s, batch std cnn "
          f"{stats['cnn_std']:.4f} vit {stats['vit_std']:.4f} (healthy ~{stats['healthy_std']:.4f}), "
          f"cos {stats['cos']:.3f}{knn}{loop.EpochUsage.text(stats)}", flush=True)
    if stats["collapse"]:
        remedy = (f"; even with --anti-collapse {cfg.anti_collapse}" if cfg.anti_collapse != "none" else
                  "; from random initialisation see --anti-collapse (ours, beyond the paper; no option "
                  "of it helped on every data set measured, docs/study.md)")
        print(f"warning: collapse still suspected (epoch {epoch + 1})" if "both" in warned else
              f"warning: collapse suspected: {COLLAPSE_HINT}{remedy}", flush=True)
        return warned | {"both"}
    for arm in stats["collapsed_arms"]:
        print(f"warning: the {arm} arm still collapses (epoch {epoch + 1})" if arm in warned else
              f"warning: the {arm} arm's outputs are nearly the same for every image (batch std "
              f"{stats[f'{arm}_std']:.4f}, below a quarter of the healthy ~{stats['healthy_std']:.4f}) while the other "
              f"arm's are not: its features may be losing what tells images apart even if the loss looks fine "
              f"(watch knn_{arm}; docs/collapse-study.md)", flush=True)
    return warned | set(stats["collapsed_arms"])


def main(args: argparse.Namespace) -> Path:
    # ---- settings, device, run folder
    cfg, state, device, out = pretraining.start_run(args, "cass", validate)

    # ---- models first: a missing weights file fails in seconds, not after indexing the data
    rt.seed_everything(cfg.seed)
    arms = [build_arm("cnn", cfg.cnn, cfg.cnn_weights, cfg, device),
            build_arm("vit", cfg.vit, cfg.vit_weights, cfg, device)]
    if rt.is_main():  # weights, Adam's two moments and the SWA average
        pretraining.check_disk(out, [arm.model for arm in arms], copies=4)

    # ---- data: pretraining sees the train split only (Sec. 4.1)
    index, splits, parts, cache = pretraining.run_data(cfg, state, out, "square", cfg.img_size)
    train = ImageDataset(index.root, *index.part(parts["train"]), cfg.img_size, train_augment(cfg.aug), cache,
                         cfg.intensity)
    loader = pretraining.train_loader(train, cfg, device)

    # ---- precision, resume
    dtype, scaler = rt.precision(cfg.amp, device)
    resumable = {**{arm.name: arm.resumable() for arm in arms}, "scaler": scaler}
    saves = pretraining.Saves(out, cfg, device, "cass", resumable, splits)
    start = saves.restore(state)

    # ---- the epoch loop
    warned = set()
    with saves:
        for epoch in range(start, cfg.epochs):
            rt.seed_everything(cfg.seed * 100_003 + epoch)  # a resumed run draws the same noise and dropout
            stats = train_one_epoch(arms, loader, scaler, cfg, device, dtype, epoch)
            for arm in arms:
                if arm.swa:
                    arm.swa.update(arm.model, epoch)
            if rt.is_main():
                if cfg.knn_every and (epoch + 1) % cfg.knn_every == 0:
                    stats.update({f"knn_{arm.name}": val_knn_accuracy(
                        arm.model, index, parts, cfg.img_size, arm.mean, arm.std, device, dtype, bs=cfg.bs,
                        workers=cfg.workers, cache=cache, intensity=cfg.intensity) for arm in arms})
                checkpoint.append_jsonl(out / "log.jsonl", stats)
                warned = report_epoch(stats, epoch, cfg, warned)
            saves.after_epoch(epoch)

    save_models(arms, loader, cfg, index, splits, out, device)
    print(f"saved {out / 'cnn.pt'} and {out / 'vit.pt'}\nnext: python finetune.py --ckpt {out / 'cnn.pt'}"
          + (" --epochs 3" if cfg.demo else ""))
    return out


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
