"""Export any model checkpoint of this project (cnn.pt, vit.pt, model_seed<N>.pt)
as timm's Hugging Face folder, config.json + model.safetensors, so that timm
alone loads it, with its architecture, head, image size, normalisation and
class names, no code of this project and no unpickling.

    python -m tools.export --ckpt runs/<run>/finetune-cnn-frac1/model_seed0.pt --out exported/cnn
    python -c "import timm; m = timm.create_model('local-dir:exported/cnn', pretrained=True)"

The folder is written by timm's own save_for_hf, so it is also what
timm.models.push_to_hf_hub uploads (`huggingface-cli upload` works on it as it is).

With --onnx, --out is one ONNX file instead: the network with its input
normalisation, taking (B, 3, S, S) float32 RGB in 0..1 at the checkpoint's size S
and giving logits (a fine-tuned model) or pre-logit features (a backbone), with
what predict.py needs in its metadata. Needs onnx and onnxscript (torch's
exporter); predict.py runs the file with onnxruntime.

    python -m tools.export --onnx --ckpt runs/<run>/finetune-cnn-frac1/model_seed0.pt --out exported/cnn.onnx
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from timm.models import save_for_hf
from torch import nn

from plumbing import checkpoint
from plumbing import flags
from errors import UserError
from plumbing.models import from_checkpoint, pre_logits

# checkpoint fields an ONNX file carries in its metadata (those the checkpoint has), each as JSON:
# what a caller needs to feed it (img_size, intensity), read its outputs (classes, multilabel) and
# decide as predict.py does (thresholds, temperature)
ONNX_FIELDS = ("arch", "method", "role", "finetuned", "classes", "multilabel", "thresholds", "temperature",
               "img_size", "intensity", "mean", "std", "epoch")
NO_EXPORTER = "--onnx needs onnx and onnxscript (torch's ONNX exporter): pip install 'onnx>=1.17' 'onnxscript>=0.6'"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = flags.new_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="a model checkpoint of this project")
    p.add_argument("--out", required=True,
                   help="folder to write config.json and model.safetensors to; with --onnx, the .onnx file")
    p.add_argument("--onnx", action="store_true",
                   help="write one ONNX file (normalisation inside, raw 0..1 RGB in, logits or features out)")
    return p.parse_args(argv)


def data_config(ckpt: dict) -> dict:
    """The preprocessing the weights expect, in timm's terms: the whole image
    resized (aspect ratio not kept) to img_size x img_size, bilinear, as
    pixels.load_resized does (crop_pct 1 + 'squash': no crop), then the
    checkpoint's mean/std."""
    return {"img_size": ckpt["img_size"], "mean": tuple(ckpt["mean"]), "std": tuple(ckpt["std"]),
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}


def model_config(ckpt: dict) -> dict:
    """What config.json says beyond the model's build arguments: class names for
    fine-tuned heads (a pretrained backbone's 1000 or 0 outputs name no class),
    and a `cass` record of where the weights come from. timm's tag and licence
    describe its ImageNet weights, not these, so they are replaced."""
    config = {"pretrained_cfg": {"tag": ckpt["method"], "license": None},
              "cass": {key: ckpt.get(key) for key in ("method", "role", "finetuned", "multilabel", "epoch")}}
    if ckpt.get("finetuned"):
        config["label_names"] = list(ckpt["classes"])
    return config


def export(ckpt: dict, out: Path) -> Path:
    """Write `ckpt`'s network to `out`. timm records the build arguments the
    factory saw (num_classes, and img_size for Transformers, whose position
    embeddings depend on it) as config.json's model_args."""
    model = from_checkpoint(ckpt).eval()
    checkpoint.prepare_out_dir(out)
    try:
        save_for_hf(model, str(out), model_config=model_config(ckpt), data_config=data_config(ckpt),
                    safe_serialization=True)
    except OSError as err:
        raise UserError(f"could not write {out} ({err.strerror or err})") from None
    # safetensors writes through a temporary file of mode 0600: the weights would be the one file of a folder
    # made to share that others cannot read
    shutil.copymode(out / "config.json", out / "model.safetensors")
    return out


class RawImageModel(nn.Module):
    """(B, 3, S, S) float RGB in 0..1 (uint8 / 255) -> (B, C) logits, or (B, D) pre-logit features for a
    backbone (its 1000 or 0 outputs are no classes). The normalisation is in the graph, so that a caller
    needs only the pixels."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], features: bool):
        super().__init__()
        self.model, self.features = model, features
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return pre_logits(self.model)(x) if self.features else self.model(x)


def export_onnx(ckpt: dict, out: Path) -> Path:
    """Write `ckpt`'s network as one ONNX file (opset of torch's dynamo exporter, the batch axis
    dynamic), its ONNX_FIELDS as metadata_props with JSON values and `output` naming what it returns."""
    try:
        import onnx
        import onnxscript  # noqa: F401  torch.onnx.export imports it lazily, deep in a traceback
    except ImportError:
        raise UserError(NO_EXPORTER) from None
    finetuned = bool(ckpt.get("finetuned"))
    size = ckpt["img_size"]
    model = RawImageModel(from_checkpoint(ckpt), ckpt["mean"], ckpt["std"], features=not finetuned).eval()
    output = "logits" if finetuned else "features"
    with tempfile.TemporaryDirectory() as tmp:
        # batch 2 as the example: the exporter specialises a dimension of size 1
        torch.onnx.export(model, (torch.rand(2, 3, size, size),), Path(tmp) / "model.onnx", input_names=["image"],
                          output_names=[output], dynamic_shapes=({0: torch.export.Dim("batch")},),
                          external_data=False, verbose=False)
        graph = onnx.load(Path(tmp) / "model.onnx")
    meta = {key: ckpt[key] for key in ONNX_FIELDS if key in ckpt} | {"output": output}
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=json.dumps(value))
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(out, lambda f: f.write(graph.SerializeToString()))
    return out


def main(args: argparse.Namespace) -> Path:
    ckpt = checkpoint.load(args.ckpt, kind="model")
    if args.onnx:
        out = export_onnx(ckpt, Path(args.out))
        what = f"logits of {', '.join(ckpt['classes'])}" if ckpt.get("finetuned") else "pre-logit features"
        print(f"{ckpt['arch']}: {out}, (B, 3, {ckpt['img_size']}, {ckpt['img_size']}) RGB in 0..1 -> {what}")
        return out
    out = export(ckpt, Path(args.out))
    heads = f"{ckpt['num_classes']} outputs" + (f" ({', '.join(ckpt['classes'])})" if ckpt.get("finetuned") else "")
    print(f"{ckpt['arch']} at {ckpt['img_size']} px, {heads}: {out}/config.json + model.safetensors; load with "
          f"timm.create_model('local-dir:{out}', pretrained=True)")
    return out


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
