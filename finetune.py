"""End-to-end fine-tuning with focal loss on a label fraction (Sec. 4.3, App. C.6),
one run per seed, mean +- std over seeds as in the paper's tables.

    python finetune.py --ckpt runs/<run>/cnn.pt --frac 0.1 --seeds 0 1 2 3 4
    python finetune.py --arch resnet50 --data ./dermofit --frac 0.1     # supervised baseline
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import checkpoint
from cache import open_cache
from cli import add_common_args, add_norm_arg, fraction, new_parser, non_negative_int, positive_float, \
    positive_int, run_cli
from data import DataIndex, ImageDataset, index_data, label_fraction, make_loader, make_splits, select, \
    train_augment
from losses import CLASS_WEIGHTS, FOCAL_FORMS, class_weights, focal_loss
from metrics import HEADLINES, evaluate_predictions
from models import (check_arch, collect, create_model, from_checkpoint, model_norm, normalise, optimizer_kwargs,
                    prepare_for_training)
from runtime import (UserError, all_reduce_sum, amp_dtype, append_jsonl, autocast, ddp, default_out, grad_scaler,
                     is_main, main_first, prepare_out_dir, print_args, seed_everything, start_distributed,
                     world_size, write_json)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = new_parser(__doc__)
    add_common_args(p, epochs=50, bs=16, epochs_source="at most, with early stopping; App. C.6.2",
                    img_size=None, img_size_help="--arch only (default 384); a checkpoint brings its own")
    p.add_argument("--ckpt", help="a model checkpoint (e.g. cnn.pt / vit.pt of a pretraining run): "
                   "architecture, image size, normalisation, data and split come from it")
    p.add_argument("--arch", help="timm model name for the supervised baseline (needs --data, no --ckpt)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="--arch only: start from timm's ImageNet weights")
    p.add_argument("--weights", help="--arch only: local file of ImageNet weights (offline machines)")
    p.add_argument("--frac", type=fraction, default=1.0,
                   help="fraction of the train split whose labels are used (Sec. 4.3: 0.01, 0.1, 1.0)")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0],
                   help="one fine-tuning run per seed (the paper: five)")
    p.add_argument("--split-seed", type=non_negative_int, default=0,
                   help="seed of a new 70/10/20 split when the checkpoint brings none")
    p.add_argument("--lr", type=positive_float, default=3e-4, help="Adam learning rate (App. C.6.2)")
    p.add_argument("--patience", type=positive_int, default=5,
                   help="early stopping patience on validation loss (App. C.6.2)")
    p.add_argument("--focal", choices=FOCAL_FORMS, default="sigmoid",
                   help="focal loss form: sigmoid on one-hot targets (published code) or softmax")
    p.add_argument("--class-weights", choices=CLASS_WEIGHTS, default="minmax",
                   help="focal class weights: counts min-max scaled into [0.2, 1] (App. C.6.2)")
    p.add_argument("--alpha", type=positive_float, default=1.0, help="focal alpha (App. C.6.2)")
    p.add_argument("--gamma", type=float, default=2.0, help="focal gamma (App. C.6.2)")
    p.add_argument("--metric", choices=tuple(HEADLINES), default="f1",
                   help="headline metric: macro F1, or macro recall (= balanced accuracy, ISIC-2019)")
    add_norm_arg(p)
    return p.parse_args(argv)


def load_source(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """The starting network and what is known about it (arch, img_size, mean,
    std, method, data, splits), from --ckpt or from --arch."""
    if bool(args.ckpt) == bool(args.arch):
        raise UserError("pass either --ckpt (a pretrained checkpoint) or --arch with --data (supervised baseline)")
    if args.gamma < 0:
        raise UserError(f"--gamma must be 0 or more, got {args.gamma}")
    if args.ckpt:
        ckpt = checkpoint.load(args.ckpt, kind="model")
        if args.img_size and args.img_size != ckpt["img_size"]:
            raise UserError(f"--img-size {args.img_size} differs from the checkpoint's {ckpt['img_size']}")
        info = {k: ckpt.get(k) for k in ("arch", "img_size", "mean", "std", "method", "role", "data", "splits")}
        return from_checkpoint(ckpt), info
    if not args.data:
        raise UserError("--arch needs --data")
    check_arch(args.arch)
    size = args.img_size or 384
    model = create_model(args.arch, img_size=size, pretrained=args.pretrained, weights=args.weights)
    mean, std = model_norm(model, args.norm)
    method = "supervised" if args.pretrained or args.weights else "random-init"
    return model, {"arch": args.arch, "img_size": size, "mean": mean, "std": std, "method": method,
                   "role": None, "data": args.data, "splits": None}


def choose_splits(info: dict, index: DataIndex, split_seed: int) -> dict[str, list[str]]:
    """The pretraining run's split when it had one for labelled data, so
    pretraining never saw the test images; otherwise a new seeded split."""
    splits = info["splits"]
    if splits and splits.get("val") and splits.get("test"):
        return {k: splits[k] for k in ("train", "val", "test")}
    if splits:
        print("note: the checkpoint was pretrained on unlabelled data; making a new 70/10/20 split "
              "(pretraining may have seen some of its test images)")
    return make_splits(index, split_seed)


def train_epoch(model, loader, loss_fn, info, device, dtype, opt, scaler) -> float:
    """One training pass; the mean loss over every process's images."""
    model.train()
    total, seen = 0.0, 0
    for x, y in tqdm(loader, leave=False, desc="train", disable=not is_main()):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(normalise(x, info["mean"], info["std"]))
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        total += loss.item() * len(x)
        seen += len(x)
    total, seen = all_reduce_sum(torch.tensor([total, float(seen)], device=device)).tolist()  # NCCL: on GPU
    return total / max(seen, 1)


def evaluate(model, loader, loss_fn, info, device, dtype) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean loss, logits (N, C), targets) over a whole split."""
    model.eval()
    logits, targets = collect(model, loader, info["mean"], info["std"], device, dtype)
    return loss_fn(logits, targets).item(), logits.numpy(), targets.numpy()


def run_seed(base: nn.Module, info: dict, index: DataIndex, parts: dict, cache, args, seed: int, out: Path,
             device, dtype) -> dict:
    """Fine-tune one copy of `base` end to end; the best-validation weights are tested once."""
    seed_everything(seed)
    start = time.perf_counter()
    labelled = label_fraction(index, parts["train"], args.frac, seed)
    model = copy.deepcopy(base)
    model.reset_classifier(len(index.classes))
    model.to(device)
    prepare_for_training(model, info["arch"], device, args.grad_ckpt)
    net = ddp(model, device)
    net = torch.compile(net) if args.compile else net
    loss_fn = partial(focal_loss, alpha=args.alpha, gamma=args.gamma, form=args.focal,
                      weights=class_weights(index.class_counts(labelled), args.class_weights))
    size, pin = info["img_size"], device.type == "cuda"
    train_loader = make_loader(ImageDataset(index, labelled, size, train_augment(size, args.aug), cache), args.bs,
                               shuffle=True, seed=seed, workers=args.workers, pin_memory=pin)
    # every process evaluates the whole val and test sets: identical numbers everywhere under torchrun
    val_loader, test_loader = (make_loader(ImageDataset(index, parts[name], size, None, cache), args.bs,
                                           shuffle=False, seed=seed, workers=args.workers, pin_memory=pin,
                                           shard=False) for name in ("val", "test"))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, **optimizer_kwargs(device))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs, eta_min=1e-6)
    scaler = grad_scaler(device, dtype)
    best_loss, best_state, best_epoch, waited = float("inf"), None, 0, 0
    for epoch in range(args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_loss = train_epoch(net, train_loader, loss_fn, info, device, dtype, opt, scaler)
        val_loss, _, _ = evaluate(net, val_loader, loss_fn, info, device, dtype)
        val_loss = all_reduce_sum(torch.tensor(val_loss, device=device)).item() / world_size()  # one decision
        sched.step()
        if not math.isfinite(val_loss):
            raise UserError(f"the validation loss became non-finite at epoch {epoch + 1} (seed {seed}); "
                            "try a lower --lr or --amp off")
        if is_main():
            append_jsonl(out / "log.jsonl", {"seed": seed, "epoch": epoch + 1, "train_loss": train_loss,
                                             "val_loss": val_loss, "lr": opt.param_groups[0]["lr"]})
        if val_loss < best_loss:
            best_loss, best_epoch, waited = val_loss, epoch + 1, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= args.patience:
                break
    model.load_state_dict(best_state)
    test_loss, logits, targets = evaluate(net, test_loader, loss_fn, info, device, dtype)
    metrics = evaluate_predictions(targets, logits, index.multilabel)
    if is_main():
        checkpoint.save(checkpoint.model_record(
            model, arch=info["arch"], img_size=size, mean=info["mean"], std=info["std"], method=info["method"],
            role=info["role"], finetuned=True, classes=index.classes, multilabel=index.multilabel,
            data=str(index.source), seed=seed, frac=args.frac, epoch=best_epoch), out / f"model_seed{seed}.pt")
    headline = HEADLINES[args.metric]
    print(f"seed {seed}: {len(labelled)} labelled images, best epoch {best_epoch}/{epoch + 1}, "
          f"val loss {best_loss:.4f}, test {headline} {metrics[headline]:.4f}", flush=True)
    return {"seed": seed, "best_epoch": best_epoch, "epochs_run": epoch + 1, "val_loss": best_loss,
            "test_loss": test_loss, "test": metrics, "seconds": round(time.perf_counter() - start, 2),
            "labelled_files": [index.paths[i] for i in labelled]}


def summarise(runs: list[dict]) -> dict:
    """mean and std (over seeds, ddof 1) of every scalar test metric."""
    keys = [k for k, v in runs[0]["test"].items() if isinstance(v, float)]
    values = {k: np.array([r["test"][k] for r in runs]) for k in keys}
    return {k: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
            for k, v in values.items()}


def main(args: argparse.Namespace) -> dict:
    device = start_distributed(args.device)
    base, info = load_source(args)
    stem = f"{Path(args.ckpt).stem}-frac{args.frac:g}" if args.ckpt else None
    out = (Path(args.out) if args.out else Path(args.ckpt).parent / f"finetune-{stem}" if args.ckpt else
           default_out(f"{info['method']}-{args.arch}-frac{args.frac:g}"))
    if is_main():
        prepare_out_dir(out)
    print_args(args)
    dtype = amp_dtype(args.amp, device)

    index = index_data(args.data or info["data"], workers=args.workers,
                       memo_dir=args.cache_dir if args.cache == "on" else None)
    if not index.labelled:
        raise UserError(f"{index.source} has no labels; fine-tuning needs class folders or a labels CSV")
    if index.multilabel and args.focal == "softmax":
        raise UserError("--focal softmax needs single-label data; this data set is multi-label")
    splits = choose_splits(info, index, args.split_seed)
    parts = select(index, splits)
    for name in ("train", "val", "test"):
        if not parts[name]:
            raise UserError(f"the {name} split is empty; the data set is too small to split 70/10/20")
    if is_main():
        write_json(out / "splits.json", {"data": str(index.source), "classes": index.classes,
                                         "skipped": index.skipped, **splits})
        (out / "log.jsonl").unlink(missing_ok=True)

    cache = main_first(lambda: open_cache(index, "square", info["img_size"], args.cache_dir, args.workers)) \
        if args.cache == "on" else None
    runs = [run_seed(base, info, index, parts, cache, args, seed, out, device, dtype) for seed in args.seeds]
    summary = summarise(runs)
    headline = HEADLINES[args.metric]
    results = {"method": info["method"], "arch": info["arch"], "role": info["role"], "frac": args.frac,
               "metric": headline, "classes": index.classes, "multilabel": index.multilabel,
               "summary": summary, "runs": runs, "config": vars(args), "source": args.ckpt or args.arch}
    if is_main():
        write_json(out / "results.json", results)
    s = summary[headline]
    print(f"{info['method']} {info['arch']} frac {args.frac:g}: test {headline} "
          f"{s['mean']:.4f} +- {s['std']:.4f} over {len(runs)} seed(s); results in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_cli(main, parse_args)
