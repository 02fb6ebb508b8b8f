"""End-to-end fine-tuning with focal loss on a label fraction (Sec. 4.3, App. C.6),
one run per seed, mean +- std over seeds as in the paper's tables.

    python finetune.py --ckpt runs/<run>/cnn.pt --frac 0.1 --seeds 0 1 2 3 4
    python finetune.py --arch resnet50 --data ./dermofit --frac 0.1     # supervised baseline
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import math
import time
from dataclasses import dataclass
from typing import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import checkpoint
import runtime as rt
from data import DataIndex, index_data
from errors import UserError
from losses import CLASS_WEIGHTS, FOCAL_FORMS, class_weights, focal_loss
from metrics import (HEADLINES, best_thresholds, evaluate_predictions, fit_temperature, headline_intervals,
                     sigmoid)
from models import (check_arch, collect, create_model, from_checkpoint, model_norm, normalise, optimizer_kwargs,
                    prepare_for_training)
from pixels import (AUTO, ImageCache, ImageDataset, Intensity, eval_loader, parse_intensity, train_augment,
                    train_loader)
from splits import label_fraction, make_splits, mark_duplicates, select


PROTOCOL = {False: "finetune", True: "linear"}  # by --linear; names the output folder and the results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = rt.new_parser(__doc__)
    rt.add_common_args(p, epochs=50, epochs_source="at most, with early stopping; App. C.6.2",
                       img_size=None, img_size_help="--arch only (default 384); a checkpoint brings its own",
                       seed=False)  # --seeds and --split-seed
    p.add_argument("--ckpt", help="a model checkpoint (e.g. cnn.pt / vit.pt of a pretraining run): "
                   "architecture, image size, normalisation, data and split come from it")
    p.add_argument("--arch", help="timm model name for the supervised baseline (needs --data, no --ckpt)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="--arch only: start from timm's ImageNet weights")
    p.add_argument("--weights", help="--arch only: local file of ImageNet weights (offline machines)")
    p.add_argument("--linear", action="store_true",
                   help="linear probe: the backbone frozen, its features extracted once, only a new linear head "
                        "trained (same fractions, seeds, loss, early stopping and metrics)")
    p.add_argument("--frac", type=rt.fraction, default=1.0,
                   help="fraction of the train split whose labels are used (Sec. 4.3: 0.01, 0.1, 1.0)")
    p.add_argument("--seeds", type=rt.non_negative_int, nargs="+", default=[0],
                   help="one fine-tuning run per seed (the paper: five)")
    p.add_argument("--split-seed", type=rt.non_negative_int, default=0,
                   help="seed of a new 70/10/20 split when the checkpoint brings none")
    p.add_argument("--lr", type=rt.positive_float,
                   help="Adam learning rate (default: 3e-4 as in App. C.6.2; 1e-3 for --linear, ours: a lone "
                        "linear head on few labels needs larger steps to converge within --epochs)")
    p.add_argument("--schedule", choices=("run", "published"), default="run",
                   help="cosine annealing to 1e-6 (App. C.6.2): run = one half-cosine over --epochs, stepped per "
                        "epoch; published = the published code's T_max 16 stepped every batch (cycles every 32)")
    p.add_argument("--patience", type=rt.positive_int, default=5,
                   help="early stopping patience on validation loss (App. C.6.2)")
    p.add_argument("--focal", choices=FOCAL_FORMS, default="sigmoid",
                   help="focal loss form: sigmoid on one-hot targets (published code) or softmax")
    p.add_argument("--class-weights-from", choices=("train", "labelled"), default="train",
                   help="class counts the weights come from: the whole train split (the published code: the "
                        "data's class distribution) or only the labelled fraction")
    p.add_argument("--class-weights", choices=CLASS_WEIGHTS, default="minmax",
                   help="focal class weights: counts min-max scaled into [0.2, 1] (App. C.6.2)")
    p.add_argument("--alpha", type=rt.positive_float, default=1.0, help="focal alpha (App. C.6.2)")
    p.add_argument("--gamma", type=float, default=2.0, help="focal gamma (App. C.6.2)")
    p.add_argument("--metric", choices=tuple(HEADLINES), default="f1",
                   help="headline metric: macro F1, or macro recall (= balanced accuracy, ISIC-2019)")
    p.add_argument("--thresholds", choices=("fixed", "val"), default="fixed",
                   help="multi-label decisions: sigmoid > 0.5 for every label (the paper), or per label the "
                        "threshold maximising its F1 on the validation split (ours; metrics.best_thresholds)")
    return p.parse_args(argv)


@dataclass
class Source:
    """The network fine-tuning starts from, and what is known about it."""
    model: nn.Module
    arch: str
    img_size: int
    mean: list[float]
    std: list[float]
    method: str  # cass, dino, supervised (ImageNet weights) or random-init
    role: str | None  # cnn / vit for a pretraining run's backbone
    data: str | None  # the data set it was pretrained on
    splits: dict[str, list[str]] | None  # the split it was pretrained with
    intensity: Intensity  # how its images' 16-bit, float or DICOM pixels became 0..255


def load_source(args: argparse.Namespace) -> Source:
    """The starting network, from --ckpt or from --arch."""
    if bool(args.ckpt) == bool(args.arch):
        raise UserError("pass either --ckpt (a pretrained checkpoint) or --arch with --data (supervised baseline)")
    if args.gamma < 0:
        raise UserError(f"--gamma must be 0 or more, got {args.gamma}")
    if args.ckpt:
        ckpt = checkpoint.load(args.ckpt, kind="model")
        if args.img_size and args.img_size != ckpt["img_size"]:
            raise UserError(f"--img-size {args.img_size} differs from the checkpoint's {ckpt['img_size']}")
        intensity = parse_intensity(ckpt.get("intensity", AUTO))  # checkpoints before --intensity: auto
        if args.intensity not in (AUTO, intensity):
            raise UserError(f"--intensity {' '.join(map(str, args.intensity))} differs from the checkpoint's "
                            f"{' '.join(map(str, intensity))}")
        return Source(from_checkpoint(ckpt), ckpt["arch"], ckpt["img_size"], ckpt["mean"], ckpt["std"],
                      ckpt["method"], ckpt.get("role"), ckpt.get("data"), ckpt.get("splits"), intensity)
    if not args.data:
        raise UserError("--arch needs --data")
    check_arch(args.arch)
    size = args.img_size or 384
    model = create_model(args.arch, img_size=size, pretrained=args.pretrained, weights=args.weights)
    method = "supervised" if args.pretrained or args.weights else "random-init"
    return Source(model, args.arch, size, *model_norm(model, args.norm), method, None, args.data, None,
                  args.intensity)


def choose_splits(source: Source, index: DataIndex, split_seed: int, together: bool) -> dict[str, list[str]]:
    """The pretraining run's split when it had one for labelled data, so
    pretraining never saw the test images; otherwise a new seeded split
    (`together`: duplicate images kept in one split, splits.make_splits)."""
    splits = source.splits
    if splits and splits.get("val") and splits.get("test"):
        if together:
            print("note: --duplicates together moves nothing here: the checkpoint's split is kept as made")
        return {k: splits[k] for k in ("train", "val", "test")}
    if splits:
        print("note: the checkpoint was pretrained on unlabelled data; making a new 70/10/20 split "
              "(pretraining may have seen some of its test images)")
    return make_splits(index, split_seed, together)


def frozen_features(source: Source, index: DataIndex, parts: dict[str, list[int]], cache: ImageCache | None,
                    args: argparse.Namespace, device: torch.device,
                    dtype: torch.dtype | None) -> dict[str, TensorDataset]:
    """--linear: the frozen backbone's pre-logit features (N, D) and targets of
    every split, extracted once (no augmentation) for all seeds."""
    model = source.model.to(device).eval()
    return {name: TensorDataset(*collect(
        lambda x: model.forward_head(model.forward_features(x), pre_logits=True).flatten(1),
        eval_loader(ImageDataset(index.root, *index.part(parts[name]), source.img_size, cache=cache,
                                 intensity=source.intensity), args.bs, workers=args.workers),
        source.mean, source.std, device, dtype)) for name in ("train", "val", "test")}


def train_one_epoch(net: nn.Module, loader: DataLoader, loss_fn, inputs: Callable[[torch.Tensor], torch.Tensor],
                    device: torch.device, dtype: torch.dtype | None, opt: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, batch_sched: torch.optim.lr_scheduler.LRScheduler | None) -> float:
    """One training pass, `inputs` turning a batch into the network's input
    (normalising images, or nothing for features), stepping `batch_sched` after
    every batch if given; the mean loss over every process's images."""
    net.train()
    total, seen = torch.zeros((), device=device), 0
    for x, y in tqdm(loader, leave=False, desc="train", disable=not rt.is_main()):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with rt.autocast(device, dtype):
            logits = net(inputs(x))
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if batch_sched:
            batch_sched.step()
        total += loss.detach() * len(x)
        seen += len(x)
    total, seen = rt.all_reduce_sum(torch.stack([total, torch.tensor(float(seen), device=device)])).tolist()
    return total / max(seen, 1)


def evaluate(net: nn.Module, split: DataLoader | TensorDataset, loss_fn, source: Source, device: torch.device,
             dtype: torch.dtype | None) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean loss, logits (N, C), targets) over a whole split: its images
    (a loader) or, for --linear, its features (a TensorDataset)."""
    net.eval()
    if isinstance(split, TensorDataset):
        with torch.no_grad():
            logits, targets = net(split.tensors[0].to(device)).float().cpu(), split.tensors[1]
    else:
        logits, targets = collect(net, split, source.mean, source.std, device, dtype)
    return loss_fn(logits, targets).item(), logits.numpy(), targets.numpy()


def run_seed(source: Source, index: DataIndex, parts: dict[str, list[int]], cache: ImageCache | None,
             features: dict[str, TensorDataset] | None, args: argparse.Namespace, seed: int, out: Path,
             device: torch.device, dtype: torch.dtype | None) -> dict:
    """Fine-tune one copy of the source network end to end, or with `features`
    (--linear) train only its new linear head on them; the best-validation
    weights are tested once."""
    rt.seed_everything(seed)
    start = time.perf_counter()
    labelled = label_fraction(index, parts["train"], args.frac, seed)
    # a random-init baseline draws its own random network per seed; a pretrained one starts from its weights
    model = create_model(source.arch, img_size=source.img_size) if source.method == "random-init" and not features \
        else copy.deepcopy(source.model)
    model.reset_classifier(len(index.classes))
    model.to(device)
    trained = model.get_classifier() if features else model  # the head is the same module inside `model`
    if not features:
        prepare_for_training(model, source.arch, device, args.grad_ckpt)
    net = rt.ddp(trained, device)
    net = torch.compile(net) if args.compile else net
    counted = parts["train"] if args.class_weights_from == "train" else labelled
    weights = class_weights(index.class_counts(counted), args.class_weights)
    loss_fn = partial(focal_loss, alpha=args.alpha, gamma=args.gamma, form=args.focal,
                      weights=weights)
    size, pin, rank, world = source.img_size, device.type == "cuda", rt.rank(), rt.world_size()
    # every process evaluates the whole val and test sets: identical numbers everywhere under torchrun
    if features:
        at = {i: k for k, i in enumerate(parts["train"])}
        rows = [at[i] for i in labelled]
        train = train_loader(TensorDataset(*(t[rows] for t in features["train"].tensors)), args.bs, seed=seed,
                             workers=0, rank=rank, world=world)
        val, test, inputs = features["val"], features["test"], (lambda x: x)
    else:
        train = train_loader(ImageDataset(index.root, *index.part(labelled), size, train_augment(size, args.aug),
                                          cache, source.intensity), args.bs, seed=seed, workers=args.workers,
                             rank=rank, world=world, pin_memory=pin)
        val, test = (eval_loader(ImageDataset(index.root, *index.part(parts[name]), size, cache=cache,
                                              intensity=source.intensity), args.bs,
                                 workers=args.workers, pin_memory=pin) for name in ("val", "test"))
        inputs = partial(normalise, mean=source.mean, std=source.std)
    lr = args.lr or (1e-3 if features else 3e-4)
    opt = torch.optim.Adam(trained.parameters(), lr=lr, **optimizer_kwargs(device))
    per_batch = args.schedule == "published"
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=16 if per_batch else args.epochs, eta_min=1e-6)
    scaler = rt.grad_scaler(device, dtype)
    best_loss, best_state, best_epoch, waited = float("inf"), None, 0, 0
    for epoch in range(args.epochs):
        train.sampler.set_epoch(epoch)
        train_loss = train_one_epoch(net, train, loss_fn, inputs, device, dtype, opt, scaler,
                                     sched if per_batch else None)
        val_loss, logits, val_targets = evaluate(net, val, loss_fn, source, device, dtype)
        val_loss = rt.all_reduce_sum(torch.tensor(val_loss, device=device)).item() / rt.world_size()  # one decision
        if not per_batch:
            sched.step()
        if not math.isfinite(val_loss):
            raise UserError(f"the validation loss became non-finite at epoch {epoch + 1} (seed {seed}); "
                            "try a lower --lr or --amp off")
        if rt.is_main():
            checkpoint.append_jsonl(out / "log.jsonl", {"seed": seed, "epoch": epoch + 1, "train_loss": train_loss,
                                                        "val_loss": val_loss, "lr": opt.param_groups[0]["lr"]})
        if val_loss < best_loss:  # early stopping on validation loss (App. C.6.2)
            best_loss, best_epoch, waited, val_logits = val_loss, epoch + 1, 0, logits
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= args.patience:
                break
    model.load_state_dict(best_state)
    # calibration on the best epoch's val logits, kept from the loop rather than recomputed
    temperature = fit_temperature(val_logits, val_targets, index.multilabel)
    # on the uncalibrated probabilities, which the test metrics and predict.py decide on
    thresholds = best_thresholds(val_targets, sigmoid(val_logits)) if args.thresholds == "val" \
        else np.full(len(index.classes), 0.5)
    named = dict(zip(index.classes, thresholds.tolist())) if index.multilabel else None
    test_loss, logits, targets = evaluate(net, test, loss_fn, source, device, dtype)
    metrics = evaluate_predictions(targets, logits, index.multilabel, thresholds)
    calibrated = evaluate_predictions(targets, logits / temperature, index.multilabel)
    if rt.is_main():
        write_predictions(out / f"predictions_seed{seed}.csv", index, parts["test"], logits)
        checkpoint.save(checkpoint.model_record(
            model, arch=source.arch, img_size=size, mean=source.mean, std=source.std, method=source.method,
            role=source.role, finetuned=True, classes=index.classes, multilabel=index.multilabel,
            data=str(index.source), splits={name: [index.paths[i] for i in ids] for name, ids in parts.items()},
            seed=seed, frac=args.frac, epoch=best_epoch, protocol=PROTOCOL[args.linear],
            intensity=source.intensity, temperature=temperature, thresholds=named), out / f"model_seed{seed}.pt")
    headline = HEADLINES[args.metric]
    print(f"seed {seed}: {len(labelled)} labelled images, best epoch {best_epoch}/{epoch + 1}, "
          f"val loss {best_loss:.4f}, test {headline} {metrics[headline]:.4f}", flush=True)
    return {"seed": seed, "best_epoch": best_epoch, "epochs_run": epoch + 1, "val_loss": best_loss,
            "test_loss": test_loss, "test": metrics, "seconds": round(time.perf_counter() - start, 2),
            "test_ci95": headline_intervals(targets, logits, index.multilabel, headline, seed=seed,
                                            groups=np.array([index.groups[i] for i in parts["test"]])
                                            if index.groups else None,  # whole patients resampled
                                            thresholds=thresholds),
            "thresholds": named,
            "calibration": {"temperature": temperature, "brier": calibrated["brier"], "ece": calibrated["ece"]},
            "class_weights": None if weights is None else [round(w, 6) for w in weights.tolist()],
            "labelled_files": [index.paths[i] for i in labelled]}


def write_predictions(path: Path, index: DataIndex, ids: list[int], logits: np.ndarray) -> None:
    """One row per test image: its path, group (patient or lesion, empty
    without groups), true label(s) (';'-joined for multi-label data) and the
    probability of every class (softmax, or sigmoid per label), so any metric
    and its interval can be recomputed later from the file alone."""
    probs = sigmoid(logits) if index.multilabel else np.exp(logits - logits.max(1, keepdims=True))
    probs = probs if index.multilabel else probs / probs.sum(1, keepdims=True)
    rows = [["path", "group", "true", *(f"p_{c}" for c in index.classes)]]
    for i, p in zip(ids, probs):
        truth = [index.classes[c] for c in np.flatnonzero(index.targets[i])] if index.multilabel \
            else [index.classes[index.targets[i]]]
        rows.append([index.paths[i], index.groups[i] if index.groups else "", ";".join(truth),
                     *(f"{v:.6f}" for v in p)])
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    checkpoint.atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def summarise(runs: list[dict]) -> dict:
    """mean and std (over seeds, ddof 1) of every scalar test metric defined in every seed."""
    keys = [k for k, v in runs[0]["test"].items() if isinstance(v, float)
            and all(isinstance(r["test"][k], float) for r in runs)]
    values = {k: np.array([r["test"][k] for r in runs]) for k in keys}
    return {k: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
            for k, v in values.items()}


def main(args: argparse.Namespace) -> dict:
    device = rt.start_distributed(args.device)
    rt.set_threads(args.threads, args.workers)
    source = load_source(args)
    stem = f"{PROTOCOL[args.linear]}-{Path(args.ckpt).stem}-frac{args.frac:g}" if args.ckpt else None
    out = (Path(args.out) if args.out else Path(args.ckpt).parent / stem if args.ckpt else
           checkpoint.default_out(f"{source.method}-{args.arch}-{PROTOCOL[args.linear]}-frac{args.frac:g}"))
    if rt.is_main():
        checkpoint.prepare_out_dir(out)
    rt.print_args(args)
    dtype = rt.amp_dtype(args.amp, device)

    index = index_data(args.data or source.data, workers=args.workers, fingerprints=True,
                       memo_dir=args.cache_dir if args.cache == "on" else None, group_col=args.group_col)
    if not index.labelled:
        raise UserError(f"{index.source} has no labels; fine-tuning needs class folders or a labels CSV")
    if index.multilabel and args.focal == "softmax":
        raise UserError("--focal softmax needs single-label data; this data set is multi-label")
    if args.thresholds == "val" and not index.multilabel:
        raise UserError("--thresholds val needs multi-label data; multi-class decisions take the most probable class")
    splits = mark_duplicates(index, choose_splits(source, index, args.split_seed, args.duplicates == "together"))
    parts = select(index, splits, apart=True)  # a split made before groups were known may leak a patient
    for name in ("train", "val", "test"):
        if not parts[name]:
            raise UserError(f"the {name} split is empty; the data set is too small to split 70/10/20")
    if rt.is_main():
        checkpoint.write_json(out / "splits.json", {"data": str(index.source), "classes": index.classes,
                                                    "skipped": index.skipped, **splits,
                                                    **({"groups": dict(zip(index.paths, index.groups))}
                                                       if index.groups else {})})
        (out / "log.jsonl").unlink(missing_ok=True)

    cache = rt.image_cache(index, "square", source.img_size, args.cache_dir, args.workers, source.intensity) \
        if args.cache == "on" else None
    features = frozen_features(source, index, parts, cache, args, device, dtype) if args.linear else None
    runs = [run_seed(source, index, parts, cache, features, args, seed, out, device, dtype) for seed in args.seeds]
    summary = summarise(runs)
    headline = HEADLINES[args.metric]
    results = {"method": source.method, "arch": source.arch, "role": source.role, "protocol": PROTOCOL[args.linear],
               "frac": args.frac,
               "metric": headline, "classes": index.classes, "multilabel": index.multilabel,
               "summary": summary, "runs": runs, "config": vars(args), "source": args.ckpt or args.arch}
    if rt.is_main():
        checkpoint.write_json(out / "results.json", results)
    s = summary[headline]
    print(f"{source.method} {source.arch} frac {args.frac:g}: test {headline} "
          f"{s['mean']:.4f} +- {s['std']:.4f} over {len(runs)} seed(s); results in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    rt.run_cli(main, parse_args)
