"""Export any model checkpoint of this project (cnn.pt, vit.pt, model_seed<N>.pt)
as timm's Hugging Face folder, config.json + model.safetensors, so that timm
alone loads it, with its architecture, head, image size, normalisation and
class names, no code of this project and no unpickling.

    python export.py --ckpt runs/<run>/finetune-cnn-frac1/model_seed0.pt --out exported/cnn
    python -c "import timm; m = timm.create_model('local-dir:exported/cnn', pretrained=True)"

The folder is written by timm's own save_for_hf, so it is also what
timm.models.push_to_hf_hub uploads (`huggingface-cli upload` works on it as it is).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from timm.models import save_for_hf

import checkpoint
import flags
from errors import UserError
from models import from_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = flags.new_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="a model checkpoint of this project")
    p.add_argument("--out", required=True, help="folder to write config.json and model.safetensors to")
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
    return out


def main(args: argparse.Namespace) -> Path:
    ckpt = checkpoint.load(args.ckpt, kind="model")
    out = export(ckpt, Path(args.out))
    heads = f"{ckpt['num_classes']} outputs" + (f" ({', '.join(ckpt['classes'])})" if ckpt.get("finetuned") else "")
    print(f"{ckpt['arch']} at {ckpt['img_size']} px, {heads}: {out}/config.json + model.safetensors; load with "
          f"timm.create_model('local-dir:{out}', pretrained=True)")
    return out


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
