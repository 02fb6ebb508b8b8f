"""End-to-end fine-tuning with focal loss on a label fraction (Sec. 4.3, App. C.6),
one run per seed, mean +- std over seeds as in the paper's tables.

    python finetune.py --ckpt runs/<run>/cnn.pt --frac 0.1 --seeds 0 1 2 3 4
    python finetune.py --arch resnet50 --data ./dermofit --frac 0.1     # supervised baseline
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from plumbing import checkpoint
from plumbing import finetuning as ft
from plumbing import flags
from plumbing import loop
from plumbing import runtime as rt
from evaluation import predictions
from data import DataIndex
from errors import UserError
from losses import CLASS_WEIGHTS, FOCAL_FORMS, class_weights, focal_loss
from evaluation.metrics import HEADLINES, evaluate, over_seeds, probabilities
from plumbing.backbone import Source
from plumbing.models import collect, optimizer_kwargs, prepare_for_training
from plumbing.splits import count, label_fraction


PROTOCOL = {False: "finetune", True: "linear"}  # by --linear; names the output folder and the results
# Adam's learning rate by protocol: App. C.6.2's for fine-tuning; ours for a linear probe, whose lone linear head
# on few labels needs larger steps to converge in --epochs
LR = {"finetune": 3e-4, "linear": 1e-3}
SEED_FILES = ("model_seed*.pt", "predictions_seed*.csv", "log.jsonl")  # what a run writes before results.json


def source_flags(p: argparse.ArgumentParser) -> None:
    """Where the network comes from."""
    p.add_argument("--ckpt", help="a model checkpoint (e.g. cnn.pt / vit.pt of a pretraining run): "
                   "architecture, image size, normalisation, data and split come from it")
    p.add_argument("--arch", help="timm model name for the supervised baseline (needs --data, no --ckpt)")
    p.add_argument("--weights", help="--arch only: local file of ImageNet weights (offline machines)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p, g = flags.stage_parser(__doc__, first=source_flags, epochs=50,
                              epochs_source="at most, with early stopping; App. C.6.2",
                              out_default="with --ckpt, finetune-<cnn|vit>-frac<f> (linear-... with --linear) "
                                          "beside the checkpoint; with --arch, "
                                          "runs/<method>-<arch>-<protocol>-frac<f>-<timestamp>",
                              img_size=None, img_size_help="--arch only (default 384); a checkpoint brings its own",
                              seed=False)  # --seeds and --split-seed
    g.paper.add_argument("--frac", type=flags.fraction, default=1.0,
                         help="fraction of the train split whose labels are used (Sec. 4.3: 0.01, 0.1, 1.0)")
    g.paper.add_argument("--seeds", type=flags.non_negative_int, nargs="+", default=[0],
                         help="one fine-tuning run per seed (Sec. 4.3: five)")
    g.paper.add_argument("--split-seed", type=flags.non_negative_int, default=0,
                         help="seed of a new 70/10/20 split (Sec. 4.1) when the checkpoint brings none")
    g.paper.add_argument("--lr", type=flags.positive_float,
                         help="Adam learning rate (default: 3e-4 as in App. C.6.2; for --linear 1e-3, ours)")
    g.paper.add_argument("--schedule", choices=("run", "published"), default="run",
                         help="cosine annealing to 1e-6 (App. C.6.2): run = one half-cosine over --epochs, stepped "
                              "per epoch; published = the published code's T_max 16 stepped every batch")
    g.paper.add_argument("--patience", type=flags.positive_int, default=5,
                         help="early stopping patience on validation loss (App. C.6.2)")
    g.paper.add_argument("--focal", choices=FOCAL_FORMS, default="sigmoid",
                         help="focal loss form: sigmoid on one-hot targets (App. C.6.2, published code) or softmax")
    g.paper.add_argument("--class-weights-from", choices=("train", "labelled"), default="train",
                         help="class counts the weights come from: the whole train split (the published code: "
                              "the data's class distribution) or only the labelled fraction")
    g.paper.add_argument("--class-weights", choices=CLASS_WEIGHTS, default="minmax",
                         help="focal class weights: counts min-max scaled into [0.2, 1] (App. C.6.2)")
    g.paper.add_argument("--alpha", type=flags.positive_float, default=1.0, help="focal alpha (App. C.6.2)")
    g.paper.add_argument("--gamma", type=float, default=2.0, help="focal gamma (App. C.6.2)")
    g.paper.add_argument("--metric", choices=tuple(HEADLINES), default="f1",
                         help="headline metric (App. D.1): macro F1, or macro recall (= balanced accuracy, "
                              "ISIC-2019)")
    g.ablations.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                             help="--arch only: start from timm's ImageNet weights (App. B: random vs ImageNet)")
    g.ours.add_argument("--linear", action="store_true",
                        help="linear probe: the backbone frozen, its features extracted once, only a new linear "
                             "head trained (same fractions, seeds, loss, early stopping and metrics)")
    g.ours.add_argument("--thresholds", choices=("fixed", "val"), default="fixed",
                        help="multi-label decisions: sigmoid > 0.5 for every label (the paper), or per label the "
                             "threshold maximising its F1 on the validation split (metrics.best_thresholds)")
    g.ours.add_argument("--resamples", type=flags.positive_int, default=1000,
                        help="bootstrap resamples of the test images (or groups) for the intervals")
    return p.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Flag errors found before any model is built or data read."""
    if args.gamma < 0:
        raise UserError(f"--gamma must be 0 or more, got {args.gamma}")
    if twice := sorted({s for s in args.seeds if args.seeds.count(s) > 1}):
        raise UserError(f"--seeds lists seed {twice[0]} more than once; each seed is one run")


@dataclass
class Seed:
    """One seed's network and data. `trained` is what the optimiser updates:
    the whole `model`, or (--linear) its new head, fed the frozen features."""
    model: nn.Module
    trained: nn.Module
    train: DataLoader
    val: DataLoader
    test: DataLoader
    inputs: Callable[[torch.Tensor], torch.Tensor]  # a batch -> the network's input


def prepare_seed(source: Source, data: ft.LabelledData, labelled: list[int],
                 features: dict[str, TensorDataset] | None, args: argparse.Namespace, seed: int,
                 device: torch.device) -> Seed:
    """A fresh copy of the source network with a new head for the data's
    classes, and its loaders: augmented labelled images and plain val and test
    images, or (--linear) the features of the same images."""
    model = source.network(redraw=not features)  # a random-init baseline draws its own network per seed
    model.reset_classifier(len(data.index.classes))
    model.to(device)
    if features:
        from evaluation import linear_probe  # ours: loaded where --linear is handled
        train, val, test = linear_probe.loaders(features, data.parts["train"], labelled, args.bs, seed)
        return Seed(model, model.get_classifier(), train, val, test, inputs=lambda x: x)
    prepare_for_training(model, source.timm_arch, device, args.grad_ckpt)
    train, val, test = data.loaders(labelled, source.img_size, source.intensity, args, seed, device)
    return Seed(model, model, train, val, test, inputs=source.normalise)


def train_one_epoch(net: nn.Module, run: Seed, loss_fn: Callable, device: torch.device, dtype: torch.dtype | None,
                    opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    batch_sched: torch.optim.lr_scheduler.LRScheduler | None, epoch: int) -> float:
    """One training pass, stepping `batch_sched` after every batch if given;
    the mean loss over every process's images. A step with a non-finite loss
    is skipped and counted as in pretraining (loop.NonFinite)."""
    net.train()
    run.train.sampler.set_epoch(epoch)
    total, seen, guard = torch.zeros((), device=device), 0, loop.NonFinite(dtype, epoch, kept="")
    for step, (x, y) in enumerate(tqdm(run.train, leave=False, desc="train", disable=not rt.is_main())):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with rt.autocast(device, dtype):
            logits = net(run.inputs(x))
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        if guard.skip(loss, step):  # not finite: no update
            continue
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if batch_sched:
            batch_sched.step()
        total += loss.detach() * len(x)
        seen += len(x)
    total = loop.EpochUsage.total({"loss": total, "images": torch.tensor(float(seen), device=device)})
    guard.require_progress(int(total["images"]))
    return total["loss"] / total["images"]


@dataclass
class Best:
    """The epoch early stopping keeps (App. C.6.2: the lowest validation loss)."""
    epoch: int
    val_loss: float
    val_logits: np.ndarray
    val_targets: np.ndarray
    state: dict[str, torch.Tensor]


def train_with_early_stopping(net: nn.Module, run: Seed, loss_fn: Callable, lr: float, args: argparse.Namespace,
                              seed: int, out: Path, device: torch.device,
                              dtype: torch.dtype | None) -> tuple[Best, int]:
    """The fine-tuning loop (App. C.6.2): Adam, cosine annealing to 1e-6, at
    most --epochs, stopping after --patience epochs without a lower
    validation loss; a line of log.jsonl per epoch. The best epoch and the number of epochs run."""
    opt = torch.optim.Adam(run.trained.parameters(), lr=lr, **optimizer_kwargs(device))
    per_batch = args.schedule == "published"
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=16 if per_batch else args.epochs, eta_min=1e-6)
    scaler = rt.grad_scaler(device, dtype)
    best, waited = None, 0
    for epoch in range(args.epochs):
        train_loss = train_one_epoch(net, run, loss_fn, device, dtype, opt, scaler, sched if per_batch else None, epoch)
        net.eval()
        logits, targets = collect(lambda x: net(run.inputs(x)), run.val, device, dtype)
        val_loss = loss_fn(logits, targets).item()
        val_loss = rt.all_reduce_sum(torch.tensor(val_loss, device=device)).item() / rt.world_size()  # one decision
        if not per_batch:
            sched.step()
        if not math.isfinite(val_loss):
            raise UserError(f"the validation loss became non-finite at epoch {epoch + 1} (seed {seed}); "
                            "try a lower --lr or --amp off")
        if rt.is_main():
            checkpoint.append_jsonl(out / "log.jsonl", {"seed": seed, "epoch": epoch + 1, "train_loss": train_loss,
                                                        "val_loss": val_loss, "lr": opt.param_groups[0]["lr"]})
        if best is None or val_loss < best.val_loss:
            best, waited = Best(epoch + 1, val_loss, logits.numpy(), targets.numpy(),
                                {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}), 0
        else:
            waited += 1
            if waited >= args.patience:
                break
    return best, epoch + 1


def run_seed(source: Source, data: ft.LabelledData, features: dict[str, TensorDataset] | None, lr: float,
             args: argparse.Namespace, seed: int, out: Path, device: torch.device, dtype: torch.dtype | None) -> dict:
    """One fine-tuning run (App. C.6): train with early stopping, restore the
    best weights, evaluate (metrics.evaluate), write the prediction file and the model."""
    rt.seed_everything(seed)
    start = time.perf_counter()
    index, parts = data.index, data.parts
    labelled = label_fraction(index, parts["train"], args.frac, seed)
    run = prepare_seed(source, data, labelled, features, args, seed, device)
    net = rt.ddp(run.trained, device)
    net = torch.compile(net) if args.compile else net
    weights = class_weights(index.class_counts(parts["train"] if args.class_weights_from == "train" else labelled),
                            args.class_weights)
    loss_fn = partial(focal_loss, alpha=args.alpha, gamma=args.gamma, form=args.focal,
                      weights=None if weights is None else weights.to(device))  # copied once, not every step
    best, epochs_run = train_with_early_stopping(net, run, loss_fn, lr, args, seed, out, device, dtype)
    run.model.load_state_dict(best.state)
    net.eval()
    logits, targets = collect(lambda x: net(run.inputs(x)), run.test, device, dtype)
    headline = HEADLINES[args.metric]
    found = evaluate(best.val_logits, best.val_targets, logits.numpy(), targets.numpy(), index.multilabel, headline,
                     val_thresholds=args.thresholds == "val", resamples=args.resamples, seed=seed,
                     groups=np.array([index.groups[i] for i in parts["test"]]) if index.groups else None)
    thresholds = dict(zip(index.classes, found["thresholds"].tolist())) if index.multilabel else None
    written = None
    if rt.is_main():  # the test images' probabilities, and the network
        name = f"predictions_seed{seed}.csv"
        written = {"file": name, "sha256": predictions.write(out / name, index, parts["test"], probabilities(
            logits.double().numpy(), index.multilabel))}
        ft.save_model(out / f"model_seed{seed}.pt", run.model, source, data, seed=seed, frac=args.frac,
                      epoch=best.epoch, protocol=PROTOCOL[args.linear],
                      temperature=found["calibration"]["temperature"], thresholds=thresholds)
    print(f"seed {seed}: {len(labelled)} labelled images, best epoch {best.epoch}/{epochs_run}, "
          f"val loss {best.val_loss:.4f}, test {headline} {found['test'][headline]:.4f}", flush=True)
    return {"seed": seed, "best_epoch": best.epoch, "epochs_run": epochs_run, "val_loss": best.val_loss,
            "test_loss": loss_fn(logits, targets).item(), "test": found["test"],
            "seconds": round(time.perf_counter() - start, 2), "test_ci95": found["test_ci95"],
            "thresholds": thresholds, "calibration": found["calibration"],
            "class_weights": None if weights is None else [round(w, 6) for w in weights.tolist()],
            "labelled": count(index, labelled), "labelled_files": [index.paths[i] for i in labelled],
            "predictions": written}


def validate(index: DataIndex, args: argparse.Namespace) -> None:
    """Flag errors that depend on the data."""
    if not index.labelled:
        raise UserError(f"{index.source} has no labels; fine-tuning needs class folders or a labels CSV")
    if index.multilabel and args.focal == "softmax":
        raise UserError("--focal softmax needs single-label data; this data set is multi-label")
    if args.thresholds == "val" and not index.multilabel:
        raise UserError("--thresholds val needs multi-label data; multi-class decisions take the most probable class")


def main(args: argparse.Namespace) -> dict:
    # ---- settings, device, the network to start from, where the run goes
    # cfg: args with the data the checkpoint names (unless --data) and --split-seed as the seed of a new split
    device, dtype, source, cfg, out = ft.start(args, PROTOCOL[args.linear], check=check_flags)

    # ---- data: the pretraining run's split when it has one (Sec. 4.1)
    data = ft.labelled_data(cfg, source.splits, check=partial(validate, args=args))
    ft.claim(out, args, source, data, SEED_FILES)  # the run really starts: its folder appears, or is refused
    data.open_cache(source.img_size, source.intensity, args)
    features, lr = None, args.lr or LR[PROTOCOL[args.linear]]
    if args.linear:
        from evaluation import linear_probe  # ours: loaded where --linear is handled
        features = linear_probe.frozen_features(source, data, args.bs, args.workers, device, dtype)

    # ---- one fine-tuning run per seed (Sec. 4.3)
    runs = [run_seed(source, data, features, lr, args, seed, out, device, dtype) for seed in args.seeds]
    index = data.index
    summary, headline = over_seeds(runs), HEADLINES[args.metric]
    results = {"method": source.method, "arch": source.arch, "role": source.role, "protocol": PROTOCOL[args.linear],
               "frac": args.frac, "metric": headline, "classes": index.classes, "multilabel": index.multilabel,
               "summary": summary, "runs": runs, "config": vars(args), "source": args.ckpt or args.arch,
               "source_id": source.identity,
               # what the unset flags became, so that report.py compares what ran
               "resolved": {"img_size": source.img_size, "lr": lr, "data": str(index.source)}}
    if rt.is_main():
        checkpoint.write_json(out / "results.json", results)
    s = summary[headline]
    print(f"{source.method} {source.arch} frac {args.frac:g}: test {headline} "
          f"{s['mean']:.4f} +- {s['std']:.4f} over {len(runs)} seed(s); results in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
