"""Turn run folders into the paper's tables and figures.

Collects every results.json (fine-tuning, with the predictions_seed<N>.csv
next to it) and every pretraining run (args.json + log.jsonl) under the given
folders and writes report.md: one table per data set and headline metric, a
row per experiment (method, backbone, pretraining run, fine-tuning settings), a
column per label fraction, mean +- std over all seeds found (each seed of an
experiment once: a seed found twice, or a prediction file that is not the one
its results.json recorded, stops the report with one line) and a 95 %
interval over the test images (or their groups: patients, lesions, where the
prediction files name them) and the seeds (Tables 1, 3-5); paired differences
between the rows over matched seeds, resampled alike, with p-values (Holm-
adjusted for the pretrained-against-baseline pairs), naming the settings a
pair's rows differ in; pretraining time per run (Table 2); and PNG figures
(figures.py): ROC curves, reliability diagrams and confusion matrices per
experiment (drawn by one process per CPU core while the tables are computed),
loss, kNN accuracy and collapse signals per pretraining epoch.

    python -m evaluation.report runs/ --out runs/report
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evaluation import figures, predictions
from evaluation.intervals import SeedInterval, holm, paired_seed_interval, seed_mean_interval
from evaluation.metrics import decide, headline_metric
from evaluation.predictions import Predictions
from errors import UserError
from evaluation.records import Cell, collect_cells, common_root, load_results, seed_predictions
from plumbing import flags
from plumbing.checkpoint import prepare_out_dir, read_log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = flags.new_parser(__doc__)
    p.add_argument("runs", nargs="+", help="folders searched (recursively) for run outputs")
    p.add_argument("--out", default="runs/report", help="folder for report.md and the figures")
    p.add_argument("--resamples", type=flags.positive_int, default=1000,
                   help="bootstrap resamples of the test images (or groups), for the intervals and the paired "
                        "differences")
    return p.parse_args(argv)


def mean_std(values: list[float]) -> str:
    v = np.array(values)
    return f"{v.mean():.4f} +- {v.std(ddof=1) if len(v) > 1 else 0.0:.4f} (n={len(v)})"


def shared_groups(preds: list[Predictions]) -> np.ndarray | None:
    """The groups a bootstrap resamples whole: those of the files when every
    file names the same ones, else None (images are resampled)."""
    same = preds[0].groups is not None and all(p.groups == preds[0].groups for p in preds)
    return np.array(preds[0].groups) if same else None


def unshared(cell: Cell) -> str | None:
    """Why the cell's seeds cannot be bootstrapped together, or None when every
    seed has a prediction file and all cover the same test images."""
    if not cell.files or None in cell.files:
        return "has seeds without prediction files"
    preds = seed_predictions(cell)
    return None if all(p.paths == preds[0].paths for p in preds) else "has seeds tested on different images"


def decisions(cell: Cell, order: list[int] | None = None) -> np.ndarray:
    """What the headline metric scores, seeds stacked on axis 1 so a bootstrap
    resample of images (axis 0) applies to every seed at once: (N, S) argmax
    class ids, or (N, S, C) bool at sigmoid > each seed's thresholds, as
    finetune.py; the seeds at positions `order` (default: all, as found). Every
    seed has a prediction file (see unshared)."""
    order = range(len(cell.files)) if order is None else order
    probs = [predictions.read(cell.files[k], cell.classes, cell.multilabel).probs for k in order]
    return np.stack([decide(p, cell.multilabel, cell.thresholds[k]) for p, k in zip(probs, order)], axis=1)


def cell_interval(cell: Cell, metric: str, resamples: int) -> SeedInterval | None:
    """The cell's mean over seeds and its 95 % interval over test images (or their groups) and seeds
    (intervals.seed_mean_interval): each bootstrap resample draws the images once and scores every seed on them,
    and the seeds' spread adds the training run's luck; with one seed, over test images only. Averaging the
    seeds' probabilities first would instead describe an ensemble nobody trained. None unless the seeds share
    test images."""
    if unshared(cell):
        return None
    preds = seed_predictions(cell)
    return seed_mean_interval(headline_metric(metric, cell.multilabel), preds[0].targets, decisions(cell),
                              shared_groups(preds), n=resamples)


def interval_text(cell: Cell, metric: str, resamples: int) -> str:
    """The cell's interval (cell_interval), marked ‡ when it covers the test images only (one seed)."""
    found = cell_interval(cell, metric, resamples)
    return "" if found is None else f" [{found.low:.4f}, {found.high:.4f}]{'‡' if found.seeds == 1 else ''}"


INTERVAL_NOTE = ("In brackets: 95 % interval of the mean over seeds that covers both kinds of luck a reader "
                 "generalises over, the test images ({n} bootstrap resamples; whole groups, e.g. patients, where "
                 "the prediction files name each image's group) and the training run (the seeds' spread, with t on "
                 "seeds - 1 degrees of freedom: three seeds give wide intervals). ‡ : one seed, so the bracket "
                 "covers test-image luck only. No bracket: the seeds have no prediction files of the same test "
                 "images.")


def row_columns(rows: list[tuple]) -> tuple[list[str], list[list[str]]]:
    """The leading column names and each row's values in them. A settings
    column names the flags whose values differ between the rows, so every row says what it is."""
    flags = [dict(row[4]) for row in rows]
    varying = sorted(k for k in set().union(*flags) if len({f.get(k) for f in flags}) > 1)
    names = ["method (backbone)", "protocol", "pretraining run", *(["settings"] if varying else [])]
    # two sources of one method, backbone and protocol shown alike (e.g. a run folder pretrained again) are told
    # apart by their hash
    alike = {row[:4] for row in rows if len({r[3] for r in rows if r[:3] == row[:3] and r[3].shown == row[3].shown})
             > 1}
    values = [[f"{row[0]} ({row[1]})", row[2], f"{row[3].shown} ({row[3].key[:8]})" if row[:4] in alike
               else row[3].shown,
               *([", ".join(f"{k}={json.loads(f[k]) if k in f else '-'}" for k in varying)] if varying else [])]
              for row, f in zip(rows, flags)]
    return names, values


def experiment_table(cells: dict[tuple, Cell], headline: str, resamples: int) -> list[str]:
    """cells: (experiment, label fraction) -> Cell; a row per experiment, a column per label fraction."""
    rows, fracs = sorted({k[0] for k in cells}), sorted({k[1] for k in cells})
    names, values = row_columns(rows)
    lines = ["| " + " | ".join([*names, *(f"{f:.0%} labels" for f in fracs)]) + " |",
             "|" + "---|" * (len(names) + len(fracs))]
    for row, shown in tqdm(list(zip(rows, values)), desc="table rows", leave=False):
        scores = [mean_std(c.scores) + interval_text(c, headline, resamples) if (c := cells.get((row, f))) else ""
                  for f in fracs]
        lines.append("| " + " | ".join([*shown, *scores]) + " |")
    return lines


def row_names(cells: dict[tuple, Cell]) -> dict[tuple, str]:
    """Each row of a table as one phrase (its leading columns), for pairs and figures."""
    rows = sorted({k[0] for k in cells})
    return dict(zip(rows, (", ".join(v) for v in row_columns(rows)[1])))


BASELINES = ("supervised", "random-init")  # methods without self-supervised pretraining


def pairs(rows: list[tuple]) -> list[tuple[tuple, tuple]]:
    """The rows worth comparing, as (A, B): rows of one backbone and protocol only; for each, first every
    pretrained row against every no-pretraining row (A pretrained, B the baseline), then the other pairs."""
    same = [(a, b) for a, b in itertools.combinations(rows, 2) if a[1:3] == b[1:3]]
    oriented = [(b, a) if a[0] in BASELINES and b[0] not in BASELINES else (a, b) for a, b in same]
    return sorted(oriented, key=lambda pair: (pair[0][1:3], pair[1][0] not in BASELINES or pair[0][0] in BASELINES))


def not_comparable(name_a: str, a: Cell, name_b: str, b: Cell) -> str | None:
    """Why two cells cannot be paired seed by seed and image by image, or None: each needs prediction files of
    one set of test images, the same for both, and the same seed ids, each of which labelled the same images in
    both (where recorded)."""
    why = next((f"{name} {w}" for name, c in ((name_a, a), (name_b, b)) if (w := unshared(c))), None)
    if why:
        return why
    if seed_predictions(a)[0].paths != seed_predictions(b)[0].paths:
        return "their prediction files cover different test images"
    if None in a.seeds or sorted(a.seeds) != sorted(b.seeds):
        return (f"their seeds differ ({' '.join(map(str, sorted(a.seeds, key=str)))} vs "
                f"{' '.join(map(str, sorted(b.seeds, key=str)))}), so they cannot be matched")
    labelled_b = dict(zip(b.seeds, b.labelled))
    if bad := [s for s, files in zip(a.seeds, a.labelled) if files and labelled_b[s] and files != labelled_b[s]]:
        return f"seed {bad[0]} labelled other images in the two rows"
    return None


def differing(a: tuple, b: tuple) -> str:
    """The fine-tuning settings two rows differ in, as "flag A vs B"; "-" when none."""
    fa, fb = dict(a[4]), dict(b[4])
    shown = {k: [json.loads(f[k]) if k in f else "-" for f in (fa, fb)] for k in sorted(fa.keys() | fb.keys())
             if fa.get(k) != fb.get(k)}
    return ", ".join(f"{k} {va} vs {vb}" for k, (va, vb) in shown.items()) or "-"


def paired_difference(a: Cell, b: Cell, metric: str, resamples: int) -> SeedInterval:
    """The mean over matched seeds (seed s of a against seed s of b) of test `metric`, a minus b, for comparable
    cells, and its interval over the same resampled test images or groups and over the seeds
    (intervals.paired_seed_interval): the shared test set's luck cancels, the seeds' spread of differences counts."""
    order_a = sorted(range(len(a.seeds)), key=a.seeds.__getitem__)
    order_b = sorted(range(len(b.seeds)), key=b.seeds.__getitem__)
    pa, pb = seed_predictions(a), seed_predictions(b)
    return paired_seed_interval(headline_metric(metric, a.multilabel), pa[0].targets, decisions(a, order_a),
                                decisions(b, order_b), shared_groups(pa + pb), n=resamples)


def paired_table(cells: dict[tuple, Cell], metric: str, resamples: int) -> list[str]:
    """The pairs of rows (`pairs`; A the higher mean where neither is a baseline) at each label fraction, and
    their paired_difference. Each pretrained row against a no-pretraining row is a primary comparison: their
    p-values are Holm-adjusted together (one family per table); the other pairs are exploratory. Rows that
    cannot be matched seed by seed and image by image are listed, not compared."""
    name = row_names(cells)
    rows, found, notes = list(name), [], []
    for frac in sorted({k[1] for k in cells}):
        for a, b in tqdm(pairs([r for r in rows if (r, frac) in cells]), desc=f"pairs at {frac:.0%}", leave=False):
            ca, cb = cells[(a, frac)], cells[(b, frac)]
            if why := not_comparable(name[a], ca, name[b], cb):
                notes.append(f"- {frac:.0%} labels, {name[a]} vs {name[b]}: not compared, {why}.")
                continue
            primary, d = a[0] not in BASELINES and b[0] in BASELINES, paired_difference(ca, cb, metric, resamples)
            if not primary and d.estimate < 0:  # B - A: the same interval turned round
                a, b, d = b, a, replace(d, estimate=-d.estimate, low=-d.high, high=-d.low,
                                        per_seed=tuple(-v for v in d.per_seed))
            found.append((frac, a, b, primary, d))
    if not found and not notes:
        return []
    adjusted = iter(holm([d.p for *_, primary, d in found if primary]))
    lines = []
    for frac, a, b, primary, d in found:
        p, holm_p = f"{d.p:.3f}" if d.seeds > 1 else "-", "exploratory"
        if primary:
            q = next(adjusted)  # NaN for a one-seed pair: no p, left out of the family
            holm_p = "-" if np.isnan(q) else f"{q:.3f}"
        seeds = ", ".join(f"{v:+.3f}" for v in d.per_seed)
        lines.append(f"| {frac:.0%} | {name[a]} | {name[b]} | {d.estimate:+.4f} | [{d.low:+.4f}, {d.high:+.4f}]"
                     f"{'‡' if d.seeds == 1 else ''} | {p} | {holm_p} | {seeds} | {differing(a, b)} |")
    head = [f"Paired differences of test {metric}, A - B: the mean over matched seeds (seed s of A against seed s "
            "of B, which labelled the same images) with its 95 % interval over the same test images, or whole "
            f"groups where both rows' prediction files name the same ({resamples} bootstrap resamples), and over "
            "the seeds (t on seeds - 1 degrees of freedom; ‡ : one seed, test images only), the two-sided p-value "
            "of no difference, and each seed's difference. Rows are paired within one backbone and protocol. Each "
            "pretrained row against a no-pretraining row is a primary comparison, its p-value Holm-adjusted over "
            "all of this table's; the other pairs (A the higher) are exploratory. An interval that includes 0 is "
            "no evidence of no difference: a margin needs its own test and enough seeds. Where the rows' "
            "fine-tuning settings differ (last column), the difference measures those settings too, not the "
            "pretraining alone.", ""]
    table = ["| labels | A | B | A - B | 95 % interval | p | Holm p | per seed | settings differ (A vs B) |",
             "|---|---|---|---|---|---|---|---|---|", *lines] if lines else []
    return ["#### Paired differences", "", *head, *table, *([""] if table and notes else []), *notes]


def tables(results: list[dict]) -> list[tuple[str, str, dict[tuple, Cell]]]:
    """(data set, headline metric, {(experiment, label fraction): Cell}) of each table, in report order."""
    cells = collect_cells(results)
    return [(data, metric, {k[2:]: v for k, v in cells.items() if k[:2] == (data, metric)})
            for data, metric in sorted({k[:2] for k in cells})]


def finetune_table(found: list[tuple[str, str, dict[tuple, Cell]]], resamples: int = 1000) -> list[str]:
    """One table per data set and headline metric (`found`: tables(results)), cells mean +- std over every
    seed of one experiment and an interval over test images and seeds, then the
    paired differences between its rows. Anything else that tells runs apart
    makes another row or table, never one cell."""
    lines = []
    for data, metric, table in found:
        lines += [f"### {data}", "", f"Test {metric}, mean +- std over seeds (n = seeds).",
                  INTERVAL_NOTE.format(n=resamples), "", *experiment_table(table, metric, resamples), ""]
        paired = paired_table(table, metric, resamples)
        lines += [*paired, ""] if paired else []
    return lines[:-1]


def file_name(text: str) -> str:
    """`text` with every run of characters other than letters, digits, '.', '_' and '-' as one '-'."""
    return re.sub(r"[^\w.-]+", "-", text)


def figure_stem(cell: Cell, taken: set[str]) -> str:
    """A file name for the cell's figures from its first run folder (e.g.
    cass_finetune-cnn-frac0.1), numbered when another cell already took it."""
    folder = next(f for f in cell.files if f).parent
    stem = file_name(f"{folder.parent.name}_{folder.name}")
    unique = next(s for i in itertools.count() if (s := stem + (f"-{i}" if i else "")) not in taken)
    taken.add(unique)
    return unique


def figure_cells(found: list[tuple[str, str, dict[tuple, Cell]]]) -> list[tuple[str, str, Cell]]:
    """(data set, title, cell) of each cell of `found` (tables(results)) with prediction files, in report order."""
    cells = []
    for data, _, table in found:
        name = row_names(table)  # as in the table, also where only some rows have files
        cells += [(data, f"{name[row]}, {frac:.0%} labels", cell)
                  for (row, frac), cell in sorted((k, c) for k, c in table.items() if any(c.files))]
    return cells


def start_figures(cells: list[tuple[str, str, Cell]], out: Path, pool: Executor) -> list[tuple[str, Future]]:
    """Hand each of `figure_cells` to `pool` to draw its ROC curves, reliability diagram and (multi-class)
    confusion matrix as soon as its files are read; (its caption, the future of its figures' paths) in order."""
    started, taken = [], set()
    for data, title, cell in tqdm(cells, desc="prediction files", leave=False):
        seeds = [(p.targets, p.probs) for p in seed_predictions(cell)]
        started.append((f"**{data}: {title}** ({len(seeds)} seed(s) with prediction files)",
                        pool.submit(figures.experiment_figures, seeds, list(cell.classes), cell.multilabel, title,
                                    out / figure_stem(cell, taken))))
    return started


def figure_lines(started: list[tuple[str, Future]]) -> list[str]:
    """The report's lines of the figures `start_figures` started, once drawn."""
    lines = []
    for caption, drawn in tqdm(started, desc="figures", leave=False):
        lines += [caption, "", " ".join(f"![{p.stem}]({p.name})" for p in drawn.result()), ""]
    return lines[:-1]


def pretraining_runs(folders: list[Path]) -> list[dict]:
    """Every folder holding args.json and log.jsonl of a CASS or DINO pretraining, once, named by its
    path below the folders' common root (several runs may share a folder name)."""
    found, root = [], common_root(folders)
    for args_file in sorted({p.resolve() for folder in folders for p in folder.rglob("args.json")}):
        log_file = args_file.parent / "log.jsonl"
        if not log_file.is_file():
            continue
        args = json.loads(args_file.read_text())
        method = "CASS" if "vit" in args and "cnn" in args else "DINO" if "out_dim" in args else None
        if method:
            log = read_log(args_file.parent)
            models = f"{args['cnn']} + {args['vit']}" if method == "CASS" else args["arch"]
            name = args_file.parent.relative_to(root).as_posix() if args_file.parent != root else root.name
            found.append({"name": name, "method": method, "models": models, "log": log})
    return found


def last_knn(log: list[dict]) -> str:
    """The last logged kNN accuracy of each network of a run (the frozen-feature column)."""
    found = {k: e[k] for e in log for k in e if k.startswith("knn_") and e[k] is not None}
    return ", ".join(f"{k[4:]} {v:.3f}" for k, v in sorted(found.items())) or "-"


def time_table(runs: list[dict]) -> list[str]:
    lines = ["| run | method | models | epochs | time | images/s | last kNN accuracy (val) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        seconds = sum(e["seconds"] for e in r["log"])
        ips = np.mean([e["images_per_s"] for e in r["log"]]) if r["log"] else 0.0
        lines.append(f"| {r['name']} | {r['method']} | {r['models']} | {len(r['log'])} | "
                     f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{seconds % 60:04.1f}s | {ips:.1f} | "
                     f"{last_knn(r['log'])} |")
    return lines


def main(args: argparse.Namespace) -> Path:
    folders = [Path(r) for r in args.runs]
    if missing := [f for f in folders if not f.is_dir()]:
        raise UserError(f"{missing[0]} is not a folder")
    out = prepare_out_dir(Path(args.out))
    predictions.read.cache_clear()  # files may have changed since an earlier call in this process
    results, runs = load_results(folders), pretraining_runs(folders)
    found = tables(results)  # every prediction file read and checked against its hash once
    cells = figure_cells(found)
    # other processes (one per core, at most one per cell) draw the figures while this one computes the intervals:
    # matplotlib took two thirds of a paper-size report's time in one process (docs/speed.md)
    with ProcessPoolExecutor(max(1, min(len(cells), os.cpu_count() or 1))) as pool:
        started = start_figures(cells, out, pool)
        lines = ["# Report", "", "## Fine-tuning (Tables 1, 3-5)", ""]
        lines += finetune_table(found, args.resamples) if results else ["No results.json found."]
        lines += ["", "## Pretraining time (Table 2)", ""] + (time_table(runs) if runs else
                                                             ["No pretraining runs found."])
        lines += ["", "## Fine-tuning figures", ""] + (figure_lines(started) or ["No prediction files found."])
    drawn = [p for r in runs if (p := figures.pretraining_figure(r["log"], r["method"], r["name"],
                                                                 out / f"{file_name(r['name'])}_epochs.png"))]
    lines += ["", "## Per-epoch plots", ""] + [f"![{p.stem}]({p.name})" for p in drawn]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(line for line in lines if not line.startswith("![")))
    print(f"written to {report}")
    return report


if __name__ == "__main__":
    flags.run_cli(main, parse_args)
