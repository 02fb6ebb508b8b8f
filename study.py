"""Does CASS help at small scale? The study behind docs/study.md (ours, beyond the paper).

Three real image sets of different kinds, cut from the scans and photographs that
scikit-learn and scikit-image ship (nothing downloaded, nothing generated), 600
images each at 32 px:
  digits    scikit-learn's scans of handwritten digits, 10 classes        (tuning)
  textures  tiles of scikit-image's grey-scale photographs, 6 classes      (tuning)
  tissue    grey tiles of its histology, fundus and cell-microscopy images, 3 classes   (kept back)
and a fourth, photos (tiles of its colour photographs, 5 classes), on which the
tiny backbones are first trained with labels for the transfer regime, standing in
for the ImageNet weights the paper starts from.

For every set and regime (random initialisation; transfer initialisation) each
pretraining row (none, CASS as published, each --anti-collapse option, --vit-lr,
DINO) is fine-tuned end to end per arm (timm's test_resnet / test_vit) on 10 % and
100 % of the labels over --seeds, and every pretrained row is compared with the
no-pretraining row on the same test images: report.py's paired bootstrap of the
mean over seeds. Every run keeps its folder, so a stopped study resumes.

    python study.py --out runs/study    # about two hours on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import figures
import finetune
import flags
import pretrain_cass
import pretrain_dino
import report
from errors import UserError
from metrics import paired_bootstrap
from models import create_model, model_norm, normalise

ARMS = {"cnn": "test_resnet", "vit": "test_vit"}
TUNING, KEPT_BACK = ("digits", "textures"), "tissue"
SETS = (*TUNING, KEPT_BACK)
REGIMES = ("random", "transfer")
# pretraining rows: (script, its flags); "none" fine-tunes the starting network itself
ROWS: dict[str, tuple[str, list[str]] | None] = {
    "none": None,
    "cass": ("cass", []),
    "variance": ("cass", ["--anti-collapse", "variance"]),
    "predictor": ("cass", ["--anti-collapse", "predictor"]),
    "predictor+variance": ("cass", ["--anti-collapse", "predictor+variance"]),
    "vit-lr": ("cass", ["--vit-lr", "1e-4"]),
    "dino": ("dino", ["--out-dim", "4096"]),
}
SIZE = 32  # image and tile size
PER_SET = 600  # images per set


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = flags.new_parser(__doc__)
    p.add_argument("--out", default="runs/study", help="folder for the data sets, every run, study.md and its figure")
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="pretraining rows ('none' is always run)")
    p.add_argument("--seeds", type=flags.non_negative_int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds")
    p.add_argument("--fracs", type=flags.fraction, nargs="+", default=[0.1, 1.0], help="label fractions")
    p.add_argument("--epochs", type=flags.positive_int, default=10, help="pretraining epochs (batch 16)")
    p.add_argument("--ft-epochs", type=flags.positive_int, default=50,
                   help="fine-tuning epochs at most, with early stopping (finetune.py's default)")
    p.add_argument("--source-epochs", type=flags.positive_int, default=30,
                   help="epochs of supervised training on photos for the transfer regime")
    p.add_argument("--resamples", type=flags.positive_int, default=500, help="paired bootstrap resamples")
    p.add_argument("--workers", type=flags.non_negative_int, default=0)
    args = p.parse_args(argv)
    args.rows = ["none", *[r for r in args.rows if r != "none"]]
    return args


# ---- the data sets: real scans and photographs shipped by scikit-learn and scikit-image

def tiles(image: np.ndarray, count: int, rng: np.random.Generator,
          keep: Callable[[np.ndarray], bool] = lambda tile: True) -> list[np.ndarray]:
    """`count` non-overlapping SIZE-px tiles of one image, drawn at random from its grid among those `keep` accepts."""
    h, w = image.shape[:2]
    found = [tile for y in range(0, h - SIZE + 1, SIZE) for x in range(0, w - SIZE + 1, SIZE)
             if keep(tile := image[y:y + SIZE, x:x + SIZE])]
    if len(found) < count:
        raise UserError(f"an image of {h}x{w} px has {len(found)} usable tiles, fewer than {count}")
    return [found[i] for i in sorted(rng.choice(len(found), count, replace=False))]


def skimage_images(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        from skimage import data
    except ImportError:
        raise UserError("the study's photographs ship with scikit-image: pip install scikit-image") from None
    return {name: getattr(data, name)() for name in names}


def digits(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """scikit-learn's 8x8 scans of handwritten digits (0..16 ink), 60 a class drawn at random, upscaled."""
    from sklearn.datasets import load_digits
    found = load_digits()
    images = (found.images * 16).clip(0, 255).astype(np.uint8)
    return {str(c): [np.asarray(Image.fromarray(images[i]).resize((SIZE, SIZE), Image.BILINEAR))
                     for i in sorted(rng.choice(np.flatnonzero(found.target == c), PER_SET // 10, replace=False))]
            for c in range(10)}


def textures(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Tiles of six grey-scale photographs: three textures (brick, grass, gravel), the moon, a man with a camera, coins."""
    images = skimage_images(("brick", "grass", "gravel", "moon", "camera", "coins"))
    return {name: tiles(image, PER_SET // 6, rng) for name, image in images.items()}


def tissue(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Tiles of an immunohistochemistry-stained tissue section, a fundus photograph (inside its disc) and a
    light-microscopy image of a cell, in grey-scale (as most medical images are) so that colour alone does not
    name the class."""
    images = skimage_images(("immunohistochemistry", "retina", "cell"))
    grey = {name: np.asarray(Image.fromarray(image).convert("L")) for name, image in images.items()}
    return {name: tiles(image, PER_SET // 3, rng, keep=lambda t: name != "retina" or t.mean() > 40)
            for name, image in grey.items()}


def photos(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Tiles of five colour photographs: an astronaut, a cat, a cup of coffee, a rocket, the Hubble deep field."""
    images = skimage_images(("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"))
    return {name: tiles(image, PER_SET // 5, rng) for name, image in images.items()}


BUILDERS = {"digits": digits, "textures": textures, "tissue": tissue, "photos": photos}


def image_set(name: str, root: Path) -> Path:
    """The set as PNG files in class folders under root/name, written once (seeded)."""
    folder = root / name
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for label, images in BUILDERS[name](np.random.default_rng(0)).items():
        (folder / label).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / label / f"{i:03d}.png")
    (folder / ".complete").write_text("ok\n")
    return folder


# ---- the transfer regime's starting point

def transfer_weights(arch: str, photos_dir: Path, out: Path, epochs: int) -> Path:
    """`arch` trained with every label of the photos set (cross-entropy, Adam 1e-3, batch 32, random flips and
    4-px shifts) with a 1000-way head, as ImageNet weights come with one; saved as a timm weights file."""
    path = out / f"{arch}.pth"
    if path.exists():
        return path
    classes = sorted(p.name for p in photos_dir.iterdir() if p.is_dir())
    files = [(f, y) for y, c in enumerate(classes) for f in sorted((photos_dir / c).glob("*.png"))]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f, _ in files])
    y = torch.tensor([label for _, label in files])
    torch.manual_seed(0)
    model = create_model(arch, img_size=SIZE, num_classes=1000)
    mean, std = model_norm(model, "model")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for epoch in range(epochs):
        for batch in torch.randperm(len(x)).split(32):
            images = F.pad(x[batch], (4, 4, 4, 4), mode="replicate")
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            images = images[:, :, dy:dy + SIZE, dx:dx + SIZE]
            images = torch.where(torch.rand(len(batch), 1, 1, 1) < 0.5, images.flip(3), images)
            loss = F.cross_entropy(model(normalise(images, mean, std)), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{arch} on photos, epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(path, lambda f: torch.save(model.state_dict(), f))
    return path


# ---- the runs

def pretrain(row: str, data: Path, folder: Path, weights: dict[str, Path] | None,
             args: argparse.Namespace) -> dict[str, Path]:
    """Each arm's backbone checkpoint after the row's pretraining (resumed when a run was stopped)."""
    script, extra = ROWS[row]
    common = ["--data", str(data), "--img-size", str(SIZE), "--bs", "16", "--epochs", str(args.epochs),
              "--workers", str(args.workers), "--knn-every", str(args.epochs), "--cache-dir", str(folder / "cache"),
              *extra]
    if script == "cass":
        jobs = {"both": (pretrain_cass, [*common, "--cnn", ARMS["cnn"], "--vit", ARMS["vit"]]
                         + (["--cnn-weights", str(weights["cnn"]), "--vit-weights", str(weights["vit"])] if weights
                            else ["--no-pretrained"]))}
    else:
        jobs = {arm: (pretrain_dino, [*common, "--arch", ARMS[arm]]
                      + (["--weights", str(weights[arm])] if weights else ["--no-pretrained"])) for arm in ARMS}
    found = {}
    for job, (module, argv) in jobs.items():
        run = folder / row if job == "both" else folder / f"{row}-{job}"
        arms = list(ARMS) if job == "both" else [job]
        if not all((run / f"{arm}.pt").exists() for arm in arms):
            resume = (run / "last.pt").exists()
            module.main(module.parse_args(["--resume", str(run)] if resume else [*argv, "--out", str(run)]))
        found |= {arm: run / f"{arm}.pt" for arm in arms}
    return found


def fine_tune(source: list[str], frac: float, folder: Path, args: argparse.Namespace) -> dict:
    """results.json of one row, arm and label fraction over the seeds (run once; a stopped run starts over)."""
    if not (folder / "results.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        finetune.main(finetune.parse_args([*source, "--frac", str(frac), "--seeds", *map(str, args.seeds),
                                           "--epochs", str(args.ft_epochs), "--workers", str(args.workers),
                                           "--resamples", "100", "--out", str(folder),
                                           "--cache-dir", str(folder.parent / "cache")]))
    result = report.load_results([folder])[0]
    if [run["seed"] for run in result["runs"]] != args.seeds:
        raise UserError(f"{folder} holds seeds {result['config']['seeds']}, not {args.seeds}: pick another --out")
    return result


def collapse_epochs(ckpt: Path) -> list[int]:
    """The epochs (1-based) whose pretraining log line flagged collapse."""
    log = [json.loads(line) for line in (ckpt.parent / "log.jsonl").read_text().splitlines()]
    return [e["epoch"] for e in log if e.get("collapse")]


def compare(result: dict, baseline: dict, resamples: int) -> dict:
    """Mean and std over seeds of the test headline metric, and (against `baseline`, the no-pretraining row on
    the same test images) report.py's paired bootstrap of the difference of the means over seeds."""
    scores = [run["test"][result["metric"]] for run in result["runs"]]
    found = {"scores": scores, "mean": float(np.mean(scores)), "std": float(np.std(scores, ddof=1))}
    if result is baseline:
        return found
    a, b = (next(iter(report.collect_cells([r]).values())) for r in (result, baseline))
    pa, pb = report.seed_predictions(a), report.seed_predictions(b)
    if pa[0].paths != pb[0].paths:
        raise UserError(f"{result['folder']} and {baseline['folder']} were tested on different images")
    d = paired_bootstrap(report.seed_mean(result["metric"], False), pa[0].targets, report.decisions(a),
                         report.decisions(b), n=resamples)
    return found | {"diff": d.estimate, "low": d.low, "high": d.high}


def block(name: str, regime: str, root: Path, args: argparse.Namespace) -> dict:
    """Every run of one set and regime, and its summary (summary.json, kept for the same rows, fractions and
    seeds): per row, the collapse epochs of a CASS run and per arm and label fraction `compare`'s numbers."""
    folder = root / name / regime
    asked = {"rows": args.rows, "fracs": [f"{f:g}" for f in args.fracs], "seeds": args.seeds}
    done = folder / "summary.json"
    if done.exists() and (summary := json.loads(done.read_text()))["asked"] == asked:
        return summary
    started = time.time()
    data = image_set(name, root / "data")
    weights = None
    if regime == "transfer":
        photos_dir = image_set("photos", root / "data")
        weights = {arm: transfer_weights(arch, photos_dir, root / "transfer", args.source_epochs)
                   for arm, arch in ARMS.items()}
    results: dict[str, dict] = {}
    for row in args.rows:
        ckpts = pretrain(row, data, folder, weights, args) if ROWS[row] else None
        results[row] = {arm: {f"{frac:g}": fine_tune(
            ["--ckpt", str(ckpts[arm])] if ckpts else
            ["--arch", arch, "--data", str(data), "--img-size", str(SIZE),
             *(["--weights", str(weights[arm])] if weights else ["--no-pretrained"])],
            frac, folder / "finetune" / f"{row}-{arm}-{frac:g}", args) for frac in args.fracs}
            for arm, arch in ARMS.items()}
        results[row]["collapse"] = collapse_epochs(ckpts["cnn"]) if ckpts and ROWS[row][0] == "cass" else None
    rows = {row: {"collapse": found["collapse"],
                  **{arm: {frac: compare(result, results["none"][arm][frac], args.resamples)
                           for frac, result in found[arm].items()} for arm in ARMS}} for row, found in results.items()}
    summary = {"set": name, "regime": regime, "asked": asked, "seconds": round(time.time() - started), "rows": rows}
    checkpoint.write_json(done, summary)
    return summary


# ---- the report

def command(args: argparse.Namespace) -> str:
    """The exact command that reproduces the report."""
    return (f"python study.py --out {args.out} --sets {' '.join(args.sets)} --regimes {' '.join(args.regimes)} "
            f"--rows {' '.join(args.rows)} --seeds {' '.join(map(str, args.seeds))} "
            f"--fracs {' '.join(f'{f:g}' for f in args.fracs)} --epochs {args.epochs} --ft-epochs {args.ft_epochs} "
            f"--source-epochs {args.source_epochs} --resamples {args.resamples}")


def cell(found: dict) -> str:
    """A table cell: mean ± std over seeds, and for a pretrained row its paired difference and interval."""
    text = f"{found['mean']:.3f} ± {found['std']:.3f}"
    return text + (f"<br>{found['diff']:+.3f} [{found['low']:+.3f}, {found['high']:+.3f}]" if "diff" in found else "")


def verdicts(summaries: list[dict], rows: list[str], frac: str) -> list[str]:
    """Per pretrained row, over every set, regime and arm at `frac`: how many paired intervals lie above 0,
    include 0 or lie below 0, and the worst difference; then the row chosen on the tuning sets alone."""
    lines = ["| pretraining | interval above 0 | includes 0 | below 0 | worst difference (set, regime, arm) |",
             "|---|---|---|---|---|"]
    for row in rows:
        found = [(s["rows"][row][arm][frac], s["set"], s["regime"], arm) for s in summaries for arm in ARMS]
        above, below = sum(f["low"] > 0 for f, *_ in found), sum(f["high"] < 0 for f, *_ in found)
        worst = min(found, key=lambda f: f[0]["diff"])
        lines.append(f"| {row} | {above} | {len(found) - above - below} | {below} | "
                     f"{worst[0]['diff']:+.3f} ({', '.join(worst[1:])}) |")
    tuning = [s for s in summaries if s["set"] in TUNING]
    if tuning:
        best = max(rows, key=lambda r: min(s["rows"][r][arm][frac]["diff"] for s in tuning for arm in ARMS))
        lines += ["", f"Chosen on the tuning sets alone ({', '.join(sorted({s['set'] for s in tuning}))}), by the "
                      f"highest worst-case difference over their regimes and arms: **{best}**."]
    return lines


def write_report(summaries: list[dict], args: argparse.Namespace) -> Path:
    """study.md and study.png in --out."""
    out, fracs = Path(args.out), [f"{f:g}" for f in args.fracs]
    pretrained = args.rows[1:]
    lines = ["# Does CASS help? The study's results", "",
             f"`{command(args)}`", "",
             f"Test macro F1, mean ± std over seeds {' '.join(map(str, args.seeds))}. Under each pretrained row: its "
             "difference from the no-pretraining row of the same arm, set and regime, and the 95 % paired bootstrap "
             f"interval of that difference over the same test images ({args.resamples} resamples). Compute: "
             f"{sum(s['seconds'] for s in summaries) / 60:.0f} min on this machine for the blocks below.", ""]
    for frac in fracs:
        lines += [f"## {float(frac):.0%} labels", ""]
        for name in SETS:
            blocks = [s for s in summaries if s["set"] == name]
            if blocks:
                heads = [f"{s['regime']} init, {arm}" for s in blocks for arm in ARMS]
                lines += [f"**{name}**{' (kept back)' if name == KEPT_BACK else ''}", "",
                          "| pretraining | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads),
                          *(f"| {row} | " + " | ".join(cell(s["rows"][row][arm][frac]) for s in blocks for arm in ARMS)
                            + " |" for row in args.rows), ""]
        if pretrained:
            lines += [*verdicts(summaries, pretrained, frac), ""]
    cass_rows = [r for r in pretrained if ROWS[r][0] == "cass"]
    if cass_rows:
        lines += ["## Epochs the CASS runs flagged as collapsed", "", "| set | regime | " + " | ".join(cass_rows) + " |",
                  "|---|---|" + "---|" * len(cass_rows),
                  *(f"| {s['set']} | {s['regime']} | " + " | ".join(
                      f"{e[0]}-{e[-1]}" if (e := s["rows"][r]["collapse"]) else "none" for r in cass_rows) + " |"
                    for s in summaries), ""]
    path = out / "study.md"
    path.write_text("\n".join(lines))
    if pretrained:
        figures.study_figure(summaries, pretrained, list(ARMS), fracs[0], out / "study.png")
    return path


def main(args: argparse.Namespace) -> Path:
    summaries = [block(name, regime, Path(args.out), args) for name in args.sets for regime in args.regimes]
    path = write_report(summaries, args)
    print(path.read_text())
    return path


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
