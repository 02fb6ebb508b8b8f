"""Predict classes for new images with one or more fine-tuned checkpoints.
Several --ckpt (e.g. the fine-tuned CNN and ViT of one CASS run) are ensembled
by averaging their probabilities: one answer to the paper's open question of
which arm to trust at inference (App. D.2).

    python -m tools.predict --ckpt runs/<run>/finetune-cnn-frac1/model_seed0.pt --images ./new_cases \
        --out predictions.csv
    python -m tools.predict --ckpt runs/<run>/finetune-cnn-frac1/model_seed0.pt --images case1.jpg case2.dcm

A --ckpt may also be an ONNX file of a fine-tuned model written by `export.py --onnx`,
run with onnxruntime (on the CPU) and decided as its checkpoint would be.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy.special import expit, logit

from plumbing import checkpoint
from plumbing import flags
from evaluation import predictions
from plumbing import runtime as rt
from data import index_images
from errors import UserError
from evaluation.metrics import decide, indicator, probabilities
from plumbing.models import collect, from_checkpoint, normalise
from plumbing.pixels import AUTO, ImageDataset, eval_loader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = flags.new_parser(__doc__)
    p.add_argument("--ckpt", nargs="+", required=True,
                   help="fine-tuned checkpoint(s) (model_seed<N>.pt), or their `export.py --onnx` files (.onnx)")
    p.add_argument("--images", nargs="+", required=True,
                   help="a folder of images (sub-folders are searched), a labels CSV, or image files")
    p.add_argument("--out", default="predictions.csv", help="CSV to write")
    p.add_argument("--bs", type=flags.positive_int, default=32, help="batch size")
    p.add_argument("--workers", type=flags.non_negative_int, default=2, help="data-loading workers")
    p.add_argument("--calibrated", action="store_true",
                   help="divide each model's logits by the temperature fitted on its validation split "
                        "(better-calibrated probabilities; a single model's predictions do not change, an "
                        "ensemble decides on the mean calibrated probabilities)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p.parse_args(argv)


def load_onnx(path: str) -> dict:
    """An `export.py --onnx` file as a member: its metadata (the checkpoint's fields) and, under "onnx",
    an onnxruntime session."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"{path}: running ONNX files needs onnxruntime: pip install 'onnxruntime>=1.20'") from None
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime reports a missing or broken file in several types
        raise UserError(f"{path} is not a readable ONNX file ({type(err).__name__})") from None
    meta = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
    if "img_size" not in meta:
        raise UserError(f"{path} was not written by export.py --onnx (its metadata has no img_size)")
    return meta | {"onnx": session}


def load_models(paths: list[str]) -> list[dict]:
    """Fine-tuned checkpoints (or their ONNX files) that agree on their classes."""
    ckpts = [load_onnx(p) if p.endswith(".onnx") else checkpoint.load(p, kind="model") for p in paths]
    for path, ckpt in zip(paths, ckpts):
        if not ckpt.get("finetuned"):
            raise UserError(f"{path} is a pretrained backbone without a classifier; fine-tune it with finetune.py")
        if (ckpt["classes"], ckpt["multilabel"]) != (ckpts[0]["classes"], ckpts[0]["multilabel"]):
            raise UserError(f"{path} predicts other classes than {paths[0]}; an ensemble needs the same classes")
    return ckpts


def logits_of(ckpt: dict, dataset_for, device, bs: int, workers: int) -> np.ndarray:
    """(N, C) float64 logits of one checkpoint's model (or ONNX file's) on the images."""
    loader = eval_loader(dataset_for(ckpt["img_size"], ckpt.get("intensity", AUTO)), bs, workers=workers)
    if "onnx" in ckpt:  # the file normalises inside; it takes the loader's uint8 pixels as 0..1 floats
        return np.concatenate([ckpt["onnx"].run(None, {"image": x.numpy().astype(np.float32) / 255})[0]
                               for x, _ in loader]).astype(np.float64)
    model = from_checkpoint(ckpt).to(device).eval()
    return collect(lambda x: model(normalise(x, ckpt["mean"], ckpt["std"])), loader, device, None)[0].double().numpy()


def member(logits: np.ndarray, ckpt: dict, calibrated: bool) -> tuple[np.ndarray, np.ndarray]:
    """One model's (N, C) probabilities and (C,) multi-label thresholds; with `calibrated`, of its logits
    divided by its temperature, the thresholds moved to the same scale (sigmoid(logit(t) / T)), so that
    the model alone decides exactly as without calibration."""
    limit = predictions.thresholds(ckpt.get("thresholds"), ckpt["classes"])
    if calibrated:
        if "temperature" not in ckpt:
            raise UserError("--calibrated needs checkpoints fine-tuned since the temperature is fitted and saved")
        logits, limit = logits / ckpt["temperature"], expit(logit(limit) / ckpt["temperature"])
    return probabilities(logits, ckpt["multilabel"]), limit


def main(args: argparse.Namespace) -> Path:
    ckpts = load_models(args.ckpt)
    device = rt.pick_device(args.device)
    index = index_images(args.images, args.workers)
    logits = [logits_of(c, lambda size, intensity: ImageDataset(index.root, index.paths, index.targets, size,
                                                                intensity=intensity), device, args.bs, args.workers)
              for c in ckpts]
    classes, multilabel = ckpts[0]["classes"], ckpts[0]["multilabel"]
    # an ensemble averages its members' probabilities and thresholds, and decides on what it writes
    probs, limit = (np.mean(v, axis=0) for v in zip(*(member(z, c, args.calibrated) for z, c in zip(logits, ckpts))))
    decided = indicator(decide(probs, multilabel, limit), len(classes))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "prediction"] + [f"p_{c}" for c in classes])
        for path, p, d in zip(index.paths, probs, decided):
            writer.writerow([path, ";".join(c for c, yes in zip(classes, d) if yes)] + [f"{v:.6f}" for v in p])
        for item in index.skipped:
            writer.writerow([item["path"], f"skipped: {item['reason']}"] + [""] * len(classes))
    print(f"{len(index.paths)} predictions ({len(ckpts)} model(s)), {len(index.skipped)} skipped: {out}")
    return out


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
