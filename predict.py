"""Predict classes for new images with one or more fine-tuned checkpoints.
Several --ckpt (e.g. the fine-tuned CNN and ViT of one CASS run) are ensembled
by averaging their probabilities: one answer to the paper's open question of
which arm to trust at inference (App. D.2).

    python predict.py --ckpt runs/<run>/finetune-cnn-frac1/model_seed0.pt --images ./new_cases --out predictions.csv
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

import checkpoint
import runtime as rt
from data import index_data
from errors import UserError
from models import collect, from_checkpoint
from pixels import AUTO, ImageDataset, eval_loader

THRESHOLD = 0.5  # multi-label decision threshold, as in fine-tuning's metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = rt.new_parser(__doc__)
    p.add_argument("--ckpt", nargs="+", required=True, help="fine-tuned checkpoint(s) (model_seed<N>.pt)")
    p.add_argument("--images", required=True, help="a folder of images (sub-folders are searched), or a labels CSV")
    p.add_argument("--out", default="predictions.csv", help="CSV to write")
    p.add_argument("--bs", type=rt.positive_int, default=32, help="batch size")
    p.add_argument("--workers", type=rt.non_negative_int, default=2, help="data-loading workers")
    p.add_argument("--calibrated", action="store_true",
                   help="divide each model's logits by the temperature fitted on its validation split "
                        "(better-calibrated probabilities; the predicted classes do not change)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p.parse_args(argv)


def load_models(paths: list[str]) -> list[dict]:
    """Fine-tuned checkpoints that agree on their classes."""
    ckpts = [checkpoint.load(p, kind="model") for p in paths]
    for path, ckpt in zip(paths, ckpts):
        if not ckpt.get("finetuned"):
            raise UserError(f"{path} is a pretrained backbone without a classifier; fine-tune it with finetune.py")
        if (ckpt["classes"], ckpt["multilabel"]) != (ckpts[0]["classes"], ckpts[0]["multilabel"]):
            raise UserError(f"{path} predicts other classes than {paths[0]}; an ensemble needs the same classes")
    return ckpts


def probabilities(ckpt: dict, dataset_for, device, bs: int, workers: int, calibrated: bool) -> torch.Tensor:
    """(N, C) probabilities of one checkpoint: sigmoid per class for
    multi-label models, softmax over classes otherwise (the argmax of the logits
    either way), of the logits divided by the checkpoint's temperature if `calibrated`."""
    model = from_checkpoint(ckpt).to(device).eval()
    loader = eval_loader(dataset_for(ckpt["img_size"], ckpt.get("intensity", AUTO)), bs, workers=workers)
    logits, _ = collect(model, loader, ckpt["mean"], ckpt["std"], device, None)
    if calibrated:
        if "temperature" not in ckpt:
            raise UserError("--calibrated needs checkpoints fine-tuned since the temperature is fitted and saved")
        logits = logits / ckpt["temperature"]
    return torch.sigmoid(logits) if ckpt["multilabel"] else logits.softmax(dim=1)


def main(args: argparse.Namespace) -> Path:
    ckpts = load_models(args.ckpt)
    device = rt.pick_device(args.device)
    index = index_data(args.images, workers=args.workers)
    probs = torch.stack([probabilities(c, lambda size, intensity: ImageDataset(index.root, index.paths, index.targets,
                                                                               size, intensity=intensity),
                                       device, args.bs, args.workers, args.calibrated) for c in ckpts]).mean(0)
    classes, multilabel = ckpts[0]["classes"], ckpts[0]["multilabel"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "prediction"] + [f"p_{c}" for c in classes])
        for path, p in zip(index.paths, probs):
            chosen = [classes[i] for i in range(len(classes)) if p[i] >= THRESHOLD] if multilabel \
                else [classes[int(p.argmax())]]
            writer.writerow([path, ";".join(chosen)] + [f"{v:.6f}" for v in p.tolist()])
        for item in index.skipped:
            writer.writerow([item["path"], f"skipped: {item['reason']}"] + [""] * len(classes))
    print(f"{len(index.paths)} predictions ({len(ckpts)} model(s)), {len(index.skipped)} skipped: {out}")
    return out


if __name__ == "__main__":
    rt.run_cli(main, parse_args)
