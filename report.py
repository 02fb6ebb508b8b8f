"""Turn run folders into the paper's tables and per-epoch plots.

Collects every results.json (fine-tuning) and every pretraining run (args.json
+ log.jsonl) under the given folders and writes report.md: one table per data
set and headline metric, a row per experiment (method, backbone, pretraining
run, fine-tuning settings), a column per label fraction, mean +- std over all
seeds found (Tables 1, 3-5); pretraining time per run (Table 2); and PNG plots
of loss, kNN accuracy and collapse signals per epoch.

    python report.py runs/ --out runs/report
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

import plots
import runtime as rt
from checkpoint import prepare_out_dir
from errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = rt.new_parser(__doc__)
    p.add_argument("runs", nargs="+", help="folders searched (recursively) for run outputs")
    p.add_argument("--out", default="runs/report", help="folder for report.md and the plots")
    return p.parse_args(argv)


def mean_std(values: list[float]) -> str:
    v = np.array(values)
    return f"{v.mean():.4f} +- {v.std(ddof=1) if len(v) > 1 else 0.0:.4f} (n={len(v)})"


# results.json config entries that do not tell experiments apart: the seed list
# (seeds pool into one cell), where and how fast the run went, and flags that
# another part of the key already carries (data set, checkpoint, backbone,
# label fraction, metric). "seed" is a common flag finetune.py does not use.
NOT_SETTINGS = frozenset({"seeds", "seed", "out", "workers", "device", "cache", "cache_dir", "compile",
                          "grad_ckpt", "threads", "data", "ckpt", "arch", "frac", "metric", "linear"})


def data_set(folder: Path, result: dict) -> str:
    """The data set a results.json was measured on: finetune.py writes its resolved
    path into splits.json next to it, while config["data"] is None whenever the
    checkpoint brought the data, so the config is only the fallback."""
    splits = folder / "splits.json"
    if splits.is_file():
        return json.loads(splits.read_text())["data"]
    return result["config"].get("data") or "unknown data set"


def load_results(folders: list[Path]) -> list[dict]:
    """Every results.json under the folders once (folders may nest), with its data set."""
    results = []
    for path in sorted({p.resolve() for f in folders for p in f.rglob("results.json")}):
        r = json.loads(path.read_text())
        results.append({**r, "data_set": data_set(path.parent, r)})
    return results


def pretraining_run(source: str) -> str:
    """The folder of the fine-tuned checkpoint (one pretraining run); "-" for a timm backbone."""
    return str(Path(source).parent) if source.endswith(".pt") else "-"


def experiment(result: dict) -> tuple:
    """What a row stands for: method, backbone, protocol (fine-tuning or linear
    probe), checkpoint, and the remaining settings as sorted (flag, JSON value)
    pairs; seeds of equal experiments pool."""
    settings = tuple(sorted((k, json.dumps(v)) for k, v in result["config"].items() if k not in NOT_SETTINGS))
    return result["method"], result["arch"], result.get("protocol", "finetune"), str(Path(result["source"])), settings


def experiment_table(cells: dict[tuple, list[float]]) -> list[str]:
    """cells: (experiment, label fraction) -> scores. A settings column names the
    flags whose values differ between the rows, so every row says what it is."""
    rows, fracs = sorted({k[0] for k in cells}), sorted({k[1] for k in cells})
    flags = [dict(row[4]) for row in rows]
    varying = sorted(k for k in set().union(*flags) if len({f.get(k) for f in flags}) > 1)
    extra = ["settings"] if varying else []
    lines = ["| " + " | ".join(["method (backbone)", "protocol", "pretraining run", *extra,
                                *(f"{f:.0%} labels" for f in fracs)])
             + " |", "|---|---|---|" + "---|" * (len(extra) + len(fracs))]
    for row, flag in zip(rows, flags):
        method, arch, protocol, source, _ = row
        shown = [", ".join(f"{k}={json.loads(flag[k]) if k in flag else '-'}" for k in varying)] if varying else []
        scores = [mean_std(cells[(row, f)]) if (row, f) in cells else "" for f in fracs]
        lines.append("| " + " | ".join([f"{method} ({arch})", protocol, pretraining_run(source), *shown, *scores])
                     + " |")
    return lines


def finetune_table(results: list[dict]) -> list[str]:
    """One table per data set and headline metric, cells mean +- std over every
    seed of one experiment (also when split over several results.json files).
    Anything else that tells runs apart makes another row or table, never one cell."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        cells[(r["data_set"], r["metric"], experiment(r), r["frac"])] += [run["test"][r["metric"]] for run in r["runs"]]
    lines = []
    for data, metric in sorted({k[:2] for k in cells}):
        table = {k[2:]: v for k, v in cells.items() if k[:2] == (data, metric)}
        lines += [f"### {data}", "", f"Test {metric}, mean +- std over seeds.", "", *experiment_table(table), ""]
    return lines[:-1]


def pretraining_runs(folders: list[Path]) -> list[dict]:
    """Every folder holding args.json and log.jsonl of a CASS or DINO pretraining."""
    found = []
    for folder in folders:
        for args_file in sorted(folder.rglob("args.json")):
            log_file = args_file.parent / "log.jsonl"
            if not log_file.is_file():
                continue
            args = json.loads(args_file.read_text())
            method = "CASS" if "vit" in args and "cnn" in args else "DINO" if "out_dim" in args else None
            if method:
                log = [json.loads(line) for line in log_file.read_text().splitlines()]
                models = f"{args['cnn']} + {args['vit']}" if method == "CASS" else args["arch"]
                found.append({"folder": args_file.parent, "method": method, "models": models, "log": log})
    return found


def last_knn(log: list[dict]) -> str:
    """The last logged kNN accuracy of each network of a run (the frozen-feature
    column next to fine-tuning and linear probes)."""
    found = {k: e[k] for e in log for k in e if k.startswith("knn_") and e[k] is not None}
    return ", ".join(f"{k[4:]} {v:.3f}" for k, v in sorted(found.items())) or "-"


def time_table(runs: list[dict]) -> list[str]:
    lines = ["| run | method | models | epochs | time | images/s | last kNN accuracy (val) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        seconds = sum(e["seconds"] for e in r["log"])
        ips = np.mean([e["images_per_s"] for e in r["log"]]) if r["log"] else 0.0
        lines.append(f"| {r['folder'].name} | {r['method']} | {r['models']} | {len(r['log'])} | "
                     f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{seconds % 60:04.1f}s | {ips:.1f} | "
                     f"{last_knn(r['log'])} |")
    return lines


def epoch_plots(run: dict, out: Path) -> list[Path]:
    """Loss, kNN accuracy and collapse signals per epoch of one pretraining run."""
    epochs = [e["epoch"] for e in run["log"]]

    def series(*keys: str, scale: str | None = None) -> dict:
        """Logged values per epoch, divided by the entry `scale` (so signals share one axis)."""
        return {k + (f" / {scale}" if scale else ""):
                (epochs, [(e[k] / e[scale] if scale else e[k]) if e.get(k) is not None else None for e in run["log"]])
                for k in keys if any(k in e for e in run["log"])}

    # collapse signals on a common 0..1 scale: batch std relative to the healthy 1/sqrt(D), entropy to ln K
    collapse = {**series("cnn_std", "vit_std", scale="healthy_std"), **series("cos")} if run["method"] == "CASS" \
        else {**series("teacher_entropy", "loss", scale="ln_k")}
    charts = {"loss": series("loss"), "knn": series("knn_cnn", "knn_vit", "knn_teacher"), "collapse": collapse}
    name = run["folder"].name
    return [plots.save(plots.line_chart(s, f"{name}: {kind}", "epoch"), out / f"{name}_{kind}.png")
            for kind, s in charts.items() if s]


def main(args: argparse.Namespace) -> Path:
    folders = [Path(r) for r in args.runs]
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise UserError(f"{missing[0]} is not a folder")
    out = prepare_out_dir(Path(args.out))
    results = load_results(folders)
    runs = pretraining_runs(folders)
    lines = ["# Report", "", "## Fine-tuning (Tables 1, 3-5)", ""]
    lines += finetune_table(results) if results else ["No results.json found."]
    lines += ["", "## Pretraining time (Table 2)", ""] + (time_table(runs) if runs else ["No pretraining runs found."])
    figures = [p for r in runs for p in epoch_plots(r, out)]
    lines += ["", "## Per-epoch plots", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:-len(figures) or None]))
    print(f"written to {report}")
    return report


if __name__ == "__main__":
    rt.run_cli(main, parse_args)
