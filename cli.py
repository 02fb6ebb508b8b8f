"""Command-line pieces every script shares: the common flags with their
checks, and the entry point that turns a UserError into one line and exit 2."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from cache import DEFAULT_DIR
from data import AUGMENTATIONS
from models import NORMS
from runtime import UserError


def run_cli(main: Callable[[argparse.Namespace], object],
            parse_args: Callable[[list[str] | None], argparse.Namespace]) -> None:
    try:
        main(parse_args(None))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def new_parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_common_args(p: argparse.ArgumentParser, *, epochs: int, bs: int, epochs_source: str,
                    img_size: int | None = 384, img_size_help: str = "square input size (App. C.5.2)") -> None:
    """Flags with the same meaning in pretraining and fine-tuning."""
    p.add_argument("--data", help="class folders, train/val/test folders, or a labels CSV (see README)")
    p.add_argument("--out", help="run folder (default: runs/<name>-<timestamp>)")
    p.add_argument("--epochs", type=positive_int, default=epochs, help=f"epochs ({epochs_source})")
    p.add_argument("--bs", type=positive_int, default=bs, help="batch size (App. C.5.3: 16)")
    p.add_argument("--img-size", type=positive_int, default=img_size, help=img_size_help)
    p.add_argument("--aug", choices=AUGMENTATIONS, default="paper",
                   help="augmentations: App. C.5.2, or with Table 9's extra blur / solarize")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    p.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                   help="data-loading worker processes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision: auto = bf16 (or fp16 + GradScaler) on CUDA, fp32 on CPU")
    p.add_argument("--cache", choices=("on", "off"), default="on",
                   help="decode and resize every image once into a memory-mapped cache (same pixels)")
    p.add_argument("--cache-dir", default=DEFAULT_DIR, help="where image caches live")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (slow start, faster steps)")
    p.add_argument("--grad-ckpt", action="store_true",
                   help="gradient checkpointing (timm): less GPU memory for some extra compute")


def add_norm_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--norm", choices=NORMS, default="model",
                   help="input normalisation: what each model's weights expect, or ImageNet "
                        "statistics for every model as in App. C.5.2")
