"""Does CASS help at small scale? The study behind docs/study.md (ours, beyond the paper).

Three real image sets of different kinds (study_sets.py): digits and textures for
tuning, tissue kept back; the transfer regime starts from tiny backbones trained with
labels on a fourth, photos, standing in for the ImageNet weights the paper starts from.

For every set and regime (random initialisation; transfer initialisation) each
pretraining row (none, CASS as published, each --anti-collapse option, two learning
rates of ours, DINO) is fine-tuned end to end per arm (timm's test_resnet / test_vit)
on 10 % of the labels over --seeds, and every pretrained row is compared with the
no-pretraining row on the same test images and seeds: report.py's paired difference of
the mean over matched seeds, its interval over test images and seeds. The CASS setting
with the best worst case on the tuning sets is chosen; at 100 % labels, no
pretraining, CASS as published, the chosen setting and DINO are run. Every run keeps its folder, so a stopped
study resumes.

    python -m study.run --out runs/study    # about 1.5 hours on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from plumbing import checkpoint
from evaluation import figures
import finetune
from plumbing import flags
import pretrain_cass
import pretrain_dino
from evaluation import records, report
from errors import UserError
from evaluation.intervals import SeedInterval, seeds_needed
from evaluation.metrics import over_seeds
from study.sets import SIZE, image_set, transfer_weights

ARMS = {"cnn": "test_resnet", "vit": "test_vit"}
TUNING, KEPT_BACK = ("digits", "textures"), "tissue"
MARGIN = 0.05  # macro F1: a difference this small is taken as none in practice (ours; the paper sets no margin)
INTERVAL = "test images and seeds"  # what summary.json's intervals cover: numbers of another kind are recomputed
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
    "lr": ("cass", ["--lr", "1e-4"]),
    # the official warm-ups are 10 % (lr) and 30 % (teacher temperature) of 100 epochs: the same share of --epochs
    "dino": ("dino", ["--out-dim", "4096"]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = flags.new_parser(__doc__)
    p.add_argument("--out", default="runs/study", help="folder for the data sets, every run, study.md and its figure")
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                   help="pretraining rows ('none', no pretraining, is always run)")
    p.add_argument("--seeds", type=flags.non_negative_int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds")
    p.add_argument("--fracs", type=flags.fraction, nargs="+", default=[0.1, 1.0],
                   help="label fractions: the first for every row, the others for no pretraining, CASS as published, "
                        "the setting chosen at the first and DINO")
    p.add_argument("--epochs", type=flags.positive_int, default=10, help="pretraining epochs (batch 16)")
    p.add_argument("--ft-epochs", type=flags.positive_int, default=50,
                   help="fine-tuning epochs at most, with early stopping (finetune.py's default)")
    p.add_argument("--source-epochs", type=flags.positive_int, default=30,
                   help="epochs of supervised training on photos for the transfer regime")
    p.add_argument("--resamples", type=flags.positive_int, default=500, help="paired bootstrap resamples")
    p.add_argument("--workers", type=flags.non_negative_int, default=0)
    return p.parse_args(argv)


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
        warmups = ["--warmup-epochs", str(max(1, args.epochs // 10)),
                   "--warmup-teacher-temp-epochs", str(max(1, 3 * args.epochs // 10))]
        jobs = {arm: (pretrain_dino, [*common, *warmups, "--arch", ARMS[arm]]
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
    return records.load_results([folder])[0]


def compare(result: dict, baseline: dict, resamples: int) -> dict:
    """Mean and std over seeds of the test headline metric, the seconds the seeds took, and against `baseline`
    (the no-pretraining row, same arm and label fraction) report.py's paired difference over matched seeds with
    its interval over test images and seeds, p-value and standard error, each seed's difference, and the number
    of seeds that scored higher than the baseline's same seed."""
    cell, base = (next(iter(records.collect_cells([r]).values())) for r in (result, baseline))
    numbers = {"scores": cell.scores, **over_seeds(result["runs"])[result["metric"]],
               "seconds": sum(run["seconds"] for run in result["runs"])}
    if result is baseline:
        return numbers
    if why := report.not_comparable(str(result["folder"]), cell, str(baseline["folder"]), base):
        raise UserError(f"cannot pair the study's rows: {why}")
    d = report.paired_difference(cell, base, result["metric"], resamples)
    return numbers | {"diff": d.estimate, "low": d.low, "high": d.high, "p": d.p, "se": d.se,
                      "per_seed": list(d.per_seed), "seeds_better": sum(v > 0 for v in d.per_seed)}


def run_block(name: str, regime: str, root: Path, plan: dict[str, list[str]], args: argparse.Namespace) -> dict:
    """Every run of one set and regime that `plan` ({label fraction: rows, 'none' first}) asks for, and their
    summary (summary.json): per row, its pretraining seconds and flagged collapse epochs, and per arm and label
    fraction `compare`'s numbers. Numbers already in summary.json are kept (the runs under --out never change)
    when computed alike."""
    folder = root / name / regime
    path = folder / "summary.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    alike = (kept.get("resamples"), kept.get("interval")) == (args.resamples, INTERVAL)
    summary = {"set": name, "regime": regime, "resamples": args.resamples, "interval": INTERVAL,
               "rows": kept["rows"] if alike else {}}
    data = image_set(name, root / "data")
    weights = None
    if regime == "transfer":
        photos_dir = image_set("photos", root / "data")
        weights = {arm: transfer_weights(arch, photos_dir, root / "transfer", args.source_epochs)
                   for arm, arch in ARMS.items()}
    baseline = {}
    for row in dict.fromkeys(row for rows in plan.values() for row in rows):
        ckpts = pretrain(row, data, folder, weights, args) if ROWS[row] else None
        if row not in summary["rows"]:
            logs = [checkpoint.read_log(run) for run in dict.fromkeys(p.parent for p in ckpts.values())] \
                if ckpts else []
            cass = ROWS[row] is not None and ROWS[row][0] == "cass"
            summary["rows"][row] = {
                "pretraining_seconds": sum(e["seconds"] for log in logs for e in log),
                "collapse": [e["epoch"] for e in logs[0] if e.get("collapse") is True] if cass else None,
                **{arm: {} for arm in ARMS}}
        entry = summary["rows"][row]
        for arm, arch in ARMS.items():
            start = ["--ckpt", str(ckpts[arm])] if ckpts else \
                ["--arch", arch, "--data", str(data), "--img-size", str(SIZE),
                 *(["--weights", str(weights[arm])] if weights else ["--no-pretrained"])]
            for frac in (frac for frac, rows in plan.items() if row in rows):
                result = fine_tune(start, float(frac), folder / "finetune" / f"{row}-{arm}-{frac}", args)
                baseline.setdefault((arm, frac), result)  # 'none' comes first
                if frac not in entry[arm]:
                    entry[arm][frac] = compare(result, baseline[(arm, frac)], args.resamples)
    checkpoint.write_json(path, summary)
    return summary


# ---- the report

def command(args: argparse.Namespace) -> str:
    """The exact command that reproduces the report."""
    return (f"python -m study.run --out {args.out} --sets {' '.join(args.sets)} --regimes {' '.join(args.regimes)} "
            f"--rows {' '.join(args.rows)} --seeds {' '.join(map(str, args.seeds))} "
            f"--fracs {' '.join(f'{f:g}' for f in args.fracs)} --epochs {args.epochs} --ft-epochs {args.ft_epochs} "
            f"--source-epochs {args.source_epochs} --resamples {args.resamples}")


def compute_minutes(summaries: list[dict]) -> float:
    """The pretraining and fine-tuning time the runs recorded (not counting start-up, scoring and the bootstrap)."""
    return sum(row["pretraining_seconds"] + sum(numbers["seconds"] for arm in ARMS for numbers in row[arm].values())
               for s in summaries for row in s["rows"].values()) / 60


def table_cell(numbers: dict) -> str:
    """Mean ± std over seeds; for a pretrained row also its paired difference and interval."""
    text = f"{numbers['mean']:.3f} ± {numbers['std']:.3f}"
    if "diff" in numbers:
        text += (f"<br>{numbers['diff']:+.3f} [{numbers['low']:+.3f}, {numbers['high']:+.3f}], "
                 f"{numbers['seeds_better']}/{len(numbers['scores'])} seeds above")
    return text


def epochs_text(epochs: list[int]) -> str:
    """1-based epochs as runs: [2, 3, 4, 7] -> '2-4, 7'; none -> 'none'."""
    runs: list[list[int]] = []
    for e in epochs:
        if runs and e == runs[-1][-1] + 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"


def needed(numbers: dict) -> int | None:
    """intervals.seeds_needed for a half-width of MARGIN, from a pair's recorded interval."""
    found = SeedInterval(numbers["diff"], numbers["low"], numbers["high"], numbers["se"], numbers["p"],
                         len(numbers["per_seed"]), tuple(numbers["per_seed"]))
    return seeds_needed(found, MARGIN)


def verdicts(summaries: list[dict], rows: list[str], frac: str) -> list[str]:
    """Per pretrained row at `frac`, over every set, regime and arm: how many paired intervals lie above 0,
    include 0 or lie below 0, the worst difference, the study's two verdicts: it helps (every interval above 0)
    and it is non-inferior (every interval above -MARGIN; an interval that merely includes 0 shows no absence
    of harm), and the median number of seeds an interval of half-width MARGIN would need (none where the test
    images' luck alone is wider than that: more seeds cannot help, more test images would)."""
    lines = ["| pretraining | intervals above 0 | include 0 | below 0 | worst difference (set, regime, arm) "
             f"| helps everywhere | non-inferior everywhere (margin {MARGIN}) | seeds for ± {MARGIN} (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        pairs = [(s["rows"][row][arm][frac], f"{s['set']}, {s['regime']}, {arm}") for s in summaries for arm in ARMS]
        above = sum(numbers["low"] > 0 for numbers, _ in pairs)
        below = sum(numbers["high"] < 0 for numbers, _ in pairs)
        worst = min(pairs, key=lambda pair: pair[0]["diff"])
        seeds = sorted(needed(numbers) or np.inf for numbers, _ in pairs)[len(pairs) // 2]
        lines.append(f"| {label(row)} | {above} | {len(pairs) - above - below} | {below} | {worst[0]['diff']:+.3f} "
                     f"({worst[1]}) | {'yes' if above == len(pairs) else 'no'} | "
                     f"{'yes' if all(n['low'] > -MARGIN for n, _ in pairs) else 'no'} | "
                     f"{seeds if seeds < np.inf else 'none: the test images alone vary more'} |")
    return lines


def chosen_row(summaries: list[dict], rows: list[str], frac: str) -> str | None:
    """The CASS setting chosen on the tuning sets alone: the highest worst-case difference over their regimes and
    arms at `frac`; None without tuning sets or CASS rows."""
    tuning = [s for s in summaries if s["set"] in TUNING]
    candidates = [r for r in rows if ROWS[r] and ROWS[r][0] == "cass"]
    if not tuning or not candidates:
        return None
    return max(candidates, key=lambda r: min(s["rows"][r][arm][frac]["diff"] for s in tuning for arm in ARMS))


def choice(summaries: list[dict], best: str, frac: str) -> list[str]:
    """The chosen setting and how it fares on the kept-back set."""
    tuning = ", ".join(dict.fromkeys(s["set"] for s in summaries if s["set"] in TUNING))
    lines = [f"Chosen on the tuning sets alone ({tuning}) among the CASS settings, by the highest worst-case "
             f"difference: **{label(best)}**."]
    for s in (s for s in summaries if s["set"] == KEPT_BACK):
        lines.append(f"On the kept-back set, {s['regime']} init: " + "; ".join(
            f"{arm} {(n := s['rows'][best][arm][frac])['diff']:+.3f} [{n['low']:+.3f}, {n['high']:+.3f}]"
            for arm in ARMS) + ".")
    return [" ".join(lines), ""]


def label(row: str) -> str:
    """The row's name in the report: the baseline, the paper's, or a setting of ours with its flags."""
    named = {"none": "none (no pretraining)", "cass": "CASS as published", "dino": "DINO"}
    return named.get(row) or f"CASS {' '.join(ROWS[row][1])} (ours)"


def write_report(summaries: list[dict], plan: dict[str, list[str]], args: argparse.Namespace) -> Path:
    """study.md, and study-<percent>.png per label fraction, in --out."""
    out, first = Path(args.out), next(iter(plan))
    lines = ["# Does CASS help? The study's results", "", f"`{command(args)}`", "",
             f"Test macro F1, mean ± std over seeds {' '.join(map(str, args.seeds))}. Under each pretrained row: its "
             "difference from the no-pretraining row of the same arm, set and regime (the mean over matched seeds), "
             "its 95 % interval over both the test images (paired bootstrap, "
             f"{args.resamples} resamples) and the seeds (t on {len(args.seeds) - 1} degrees of freedom: few seeds "
             "make it wide), and how many seeds beat the no-pretraining row's same seed. Pretraining and "
             "fine-tuning took "
             f"{compute_minutes(summaries):.0f} min.", ""]
    for frac, rows in plan.items():
        lines += [f"## {float(frac):.0%} labels", ""]
        for name in SETS:
            blocks = [s for s in summaries if s["set"] == name]
            if blocks:
                heads = [f"{s['regime']} init, {arm}" for s in blocks for arm in ARMS]
                lines += [f"**{name}**{' (kept back)' if name == KEPT_BACK else ''}", "",
                          "| pretraining | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
                lines += [f"| {label(row)} | " + " | ".join(table_cell(s["rows"][row][arm][frac])
                                                            for s in blocks for arm in ARMS) + " |" for row in rows]
                lines.append("")
        if pretrained := rows[1:]:
            lines += [*verdicts(summaries, pretrained, frac), ""]
            if frac == first and (best := chosen_row(summaries, pretrained, frac)):
                lines += choice(summaries, best, frac)
            figures.study_figure(summaries, [label(r) for r in pretrained], pretrained, list(ARMS), frac,
                                 out / f"study-{float(frac):.0%}.png".replace("%", ""))
    cass_rows = [r for r in plan[first] if ROWS[r] and ROWS[r][0] == "cass"]
    if cass_rows:
        lines += ["## Epochs whose pretraining log flagged collapse", "",
                  "| set | regime | " + " | ".join(map(label, cass_rows)) + " |", "|---|---|" + "---|" * len(cass_rows)]
        lines += [f"| {s['set']} | {s['regime']} | " + " | ".join(epochs_text(s["rows"][r]["collapse"])
                                                                   for r in cass_rows) + " |" for s in summaries]
    path = out / "study.md"
    path.write_text("\n".join(lines) + "\n")
    return path


RUN_SETTINGS = ("epochs", "ft_epochs", "source_epochs", "seeds")  # what the runs under --out were made with


def check_settings(out: Path, args: argparse.Namespace) -> None:
    """Runs found under --out are reused, so they must have been made with the same settings."""
    path, asked = out / "settings.json", {key: getattr(args, key) for key in RUN_SETTINGS}
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(path, asked)
    elif (made := json.loads(path.read_text())) != asked:
        raise UserError(f"{out} holds runs made with {made}, not {asked}: pick another --out")


def main(args: argparse.Namespace) -> Path:
    """Every row at the first label fraction; at the others (100 % labels by default) no pretraining, CASS as
    published, the setting chosen on the tuning sets at the first, and DINO."""
    check_settings(Path(args.out), args)
    rows = ["none", *(r for r in args.rows if r != "none")]  # every row is compared with no pretraining
    fracs = [f"{f:g}" for f in args.fracs]
    plan = {fracs[0]: rows}
    blocks = [(name, regime) for name in args.sets for regime in args.regimes]
    summaries = [run_block(name, regime, Path(args.out), plan, args) for name, regime in blocks]
    if fracs[1:]:
        best = chosen_row(summaries, rows[1:], fracs[0])
        few = [r for r in dict.fromkeys(["none", "cass", best, "dino"]) if r in rows]
        plan |= {frac: few for frac in fracs[1:]}
        summaries = [run_block(name, regime, Path(args.out), plan, args) for name, regime in blocks]
    path = write_report(summaries, plan, args)
    print(path.read_text())
    return path


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
