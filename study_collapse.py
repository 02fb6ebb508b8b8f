"""Does CASS collapse from random initialisation, and does --anti-collapse help?
A small study on real images: scikit-learn's 1,797 scans of handwritten digits
(10 classes, upscaled to 32 px), timm's tiny test_resnet and test_vit from
random initialisation on the CPU, pretrained for --epochs at batch 16, then
fine-tuned end to end on 10 % and 100 % of the labels over --seeds, against
supervised training from random initialisation and DINO.

    pip install scikit-learn        # ships the digits; not needed by the project itself
    python study_collapse.py --out runs/study   # about an hour on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

import finetune
import flags
import pretrain_cass
import pretrain_dino
from errors import UserError

METHODS = ("supervised", "cass", "cass+variance", "cass+predictor", "dino")
ARMS = {"cnn": "test_resnet", "vit": "test_vit"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = flags.new_parser(__doc__)
    p.add_argument("--out", default="runs/study", help="folder for the data, every run and study.md")
    p.add_argument("--epochs", type=flags.positive_int, default=10, help="pretraining epochs")
    p.add_argument("--seeds", type=flags.non_negative_int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds")
    p.add_argument("--fracs", type=flags.fraction, nargs="+", default=[0.1, 1.0], help="label fractions")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--workers", type=flags.non_negative_int, default=2)
    return p.parse_args(argv)


def digits(folder: Path) -> Path:
    """scikit-learn's digits as 32 px PNGs in class folders (written once)."""
    if (folder / ".complete").exists():
        return folder
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the study's images ship with scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    for i, (image, label) in enumerate(zip(data.images, data.target)):
        path = folder / str(label) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 16).clip(0, 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR).save(path)
    (folder / ".complete").write_text("ok\n")
    return folder


def pretrain(method: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The backbone checkpoint of each arm ({'cnn': ..., 'vit': ...}) and whether the log flagged collapse."""
    common = ["--data", str(data), "--no-pretrained", "--img-size", "32", "--bs", "16", "--epochs", str(args.epochs),
              "--workers", str(args.workers), "--knn-every", str(args.epochs), "--cache-dir", str(out / "cache")]
    if method.startswith("cass"):
        folder = out / method
        if not (folder / "vit.pt").exists():
            mode = method.partition("+")[2] or "none"
            pretrain_cass.main(pretrain_cass.parse_args([*common, "--out", str(folder), "--cnn", ARMS["cnn"],
                                                         "--vit", ARMS["vit"], "--anti-collapse", mode]))
        return {arm: folder / f"{arm}.pt" for arm in ARMS}
    found = {}
    for arm, arch in ARMS.items():
        folder = out / f"dino-{arm}"
        if not (folder / f"{arm}.pt").exists():
            pretrain_dino.main(pretrain_dino.parse_args([*common, "--out", str(folder), "--arch", arch,
                                                         "--out-dim", "4096"]))
        found[arm] = folder / f"{arm}.pt"
    return found


def fine_tune(method: str, arm: str, ckpt: Path | None, data: Path, frac: float, out: Path,
              args: argparse.Namespace) -> list[float]:
    """Test macro F1 of every seed."""
    folder = out / "finetune" / f"{method}-{arm}-frac{frac:g}"
    if not (folder / "results.json").exists():
        source = ["--ckpt", str(ckpt)] if ckpt else ["--arch", ARMS[arm], "--no-pretrained", "--data", str(data),
                                                     "--img-size", "32"]
        finetune.main(finetune.parse_args([*source, "--frac", str(frac), "--seeds", *map(str, args.seeds),
                                           "--workers", str(args.workers), "--out", str(folder),
                                           "--cache-dir", str(out / "cache")]))
    return [run["test"]["macro_f1"] for run in json.loads((folder / "results.json").read_text())["runs"]]


def collapse_flags(ckpt: Path) -> str:
    """The epochs (1-based) whose log line flagged collapse, from the run folder of a checkpoint."""
    log = [json.loads(line) for line in (ckpt.parent / "log.jsonl").read_text().splitlines()]
    flagged = [str(e["epoch"]) for e in log if e.get("collapse")]
    return ", ".join(flagged) or "none"


def main(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    data = digits(out / "digits")
    # supervised runs split the data as the pretraining runs do (seed 0), so every row tests the same images
    rows = []
    for method in args.methods:
        ckpts = pretrain(method, data, out, args) if method != "supervised" else {arm: None for arm in ARMS}
        for arm in ARMS:
            scores = {frac: fine_tune(method, arm, ckpts[arm], data, frac, out, args) for frac in args.fracs}
            rows.append((method, arm, scores, collapse_flags(ckpts[arm]) if ckpts[arm] else "-"))
    lines = ["| pretraining | arm | " + " | ".join(f"{f:.0%} labels" for f in args.fracs) + " | collapse flagged |",
             "|---|---|" + "---|" * len(args.fracs) + "---|"]
    for method, arm, scores, flagged in rows:
        cells = [f"{np.mean(v):.3f} +- {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}" for v in scores.values()]
        lines.append(f"| {method} | {arm} ({ARMS[arm]}) | " + " | ".join(cells) + f" | {flagged} |")
    report = out / "study.md"
    report.write_text("Test macro F1, mean +- std over seeds " + " ".join(map(str, args.seeds)) + ".\n\n"
                      + "\n".join(lines) + "\n")
    print(report.read_text())
    return report


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
