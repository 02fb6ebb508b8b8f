"""The project's figures, drawn with matplotlib: for report.py, ROC curves,
reliability diagrams and confusion matrices of fine-tuning runs (from their
per-image prediction files) and per-epoch curves of pretraining runs; for
maps.py, heat maps of what a network looks at, over images and side by side,
and grids of feature maps.

Only report.py and maps.py import this module, so the training scripts never
load matplotlib; the "Agg" backend draws without a display (servers, CI).
Every figure is a PNG at 150 dpi, cropped to its contents so no legend or
label is clipped.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sklearn.metrics import confusion_matrix, roc_curve  # noqa: E402

from evaluation.metrics import ECE_BINS, ece, indicator, reliability, roc_auc  # noqa: E402

DPI = 150
# mirrors pretrain_cass.COLLAPSE_RATIO (evaluation never imports a stage script): an arm whose batch std is
# below this fraction of the healthy 1/sqrt(D) is listed in log.jsonl's collapsed_arms
COLLAPSE_RATIO = 0.25
# one (targets, probabilities) pair per seed: (N,) class ids or (N, C) 0/1, and (N, C)
Seeds = list[tuple[np.ndarray, np.ndarray]]


def save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def heading(title: str, what: str) -> str:
    """The experiment, wrapped to the figure's width, over what the figure shows."""
    return textwrap.fill(title, 60) + "\n" + what


def roc_figure(seeds: Seeds, classes: list[str], title: str, path: Path) -> Path:
    """One-vs-rest ROC curve per class, averaged over seeds at fixed false
    positive rates (vertical averaging), the band spanning the seeds' lowest to
    highest curve; the legend gives each class's AUROC and the macro AUROC, means over seeds."""
    grid = np.linspace(0, 1, 1001)  # fine enough that steps stay vertical
    aurocs = [roc_auc(y, p) for y, p in seeds]
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for k, name in enumerate(classes):
        curves = [np.interp(grid, *roc_curve(t[:, k], p[:, k], drop_intermediate=False)[:2])
                  for y, p in seeds if 0 < (t := indicator(y, len(classes)))[:, k].sum() < len(t)]
        if not curves:  # no positives (or no negatives) among the test images: no curve
            continue
        auroc = np.nanmean([a.per_class[k] for a in aurocs])
        ax.plot(grid, np.mean(curves, 0), color=colours(k), lw=1.5, label=f"{name} ({auroc:.3f})")
        if len(curves) > 1:
            ax.fill_between(grid, np.min(curves, 0), np.max(curves, 0), color=colours(k), alpha=0.15, lw=0)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="chance (0.500)")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal", xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)")
    ax.grid(alpha=0.3)
    macro = np.nanmean([a.macro for a in aurocs])
    ax.legend(title=f"class (AUROC), macro AUROC {macro:.3f}", loc="lower right", fontsize="small",
              title_fontsize="small")
    band = f", band: range over {len(seeds)} seeds" if len(seeds) > 1 else ""
    ax.set_title(heading(title, f"ROC curves, one vs rest{band}"), fontsize="medium")
    return save(fig, path)


def reliability_figure(seeds: Seeds, multilabel: bool, title: str, path: Path) -> Path:
    """Accuracy against confidence in metrics.ece's equal-width bins, every
    seed's decisions pooled, over the number of decisions per bin; the title
    gives the ECE (mean over seeds)."""
    conf, correct, which = (np.concatenate(v) for v in zip(*(reliability(y, p, ECE_BINS) for y, p in seeds)))
    counts = np.bincount(which, minlength=ECE_BINS)
    filled = counts > 0
    accuracy = np.bincount(which, weights=correct, minlength=ECE_BINS)[filled] / counts[filled]
    mean_conf = np.bincount(which, weights=conf, minlength=ECE_BINS)[filled] / counts[filled]
    left = np.arange(ECE_BINS)[filled] / ECE_BINS
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(5.2, 6), gridspec_kw={"height_ratios": [3, 1]})
    top.bar(left, accuracy, width=1 / ECE_BINS, align="edge", color="tab:blue", alpha=0.75, edgecolor="black", lw=0.5,
            label="accuracy in the bin")
    top.plot(mean_conf, mean_conf, "o", color="tab:red", ms=4, zorder=3, label="mean confidence in the bin")
    top.plot([0, 1], [0, 1], ls="--", lw=0.8, color="black", zorder=3, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy")
    top.grid(alpha=0.3)
    # under the figure: tall bars can fill any corner of the axes
    fig.legend(*top.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.04), ncol=2,
               fontsize="small", frameon=False)
    bottom.bar(left, counts[filled], width=1 / ECE_BINS, align="edge", color="grey", edgecolor="black", lw=0.5)
    bottom.set_yscale("log")
    bottom.set_ylim(0.5, counts.max() * 4)  # room above the tallest bar for its count
    for x, n in zip(left, counts[filled]):
        bottom.text(x + 0.5 / ECE_BINS, n * 1.2, str(n), ha="center", va="bottom", fontsize=6)
    bottom.set(ylabel="decisions\n(log scale)" if multilabel else "images\n(log scale)",
               xlabel="confidence: max(p, 1 - p) per image and label" if multilabel else
               "confidence: probability of the predicted class")
    score = np.mean([ece(y, p, ECE_BINS) for y, p in seeds])
    mean = f", mean over {len(seeds)} seeds; bars pool the seeds" if len(seeds) > 1 else ""
    top.set_title(heading(title, f"reliability, ECE {score:.3f} ({ECE_BINS} bins{mean})"), fontsize="medium")
    return save(fig, path)


def confusion_figure(seeds: Seeds, classes: list[str], title: str, path: Path) -> Path:
    """Counts of (true, predicted) class over the test images, summed over
    seeds; colour is the fraction of the true class (recall on the diagonal),
    so rare classes read as clearly as common ones."""
    cm = sum(confusion_matrix(y, p.argmax(1), labels=range(len(classes))) for y, p in seeds)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = max(4.5, 0.6 * len(classes) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(cm):
        ax.text(j, i, str(n), ha="center", va="center", fontsize="small",
                color="white" if share[i, j] > 0.6 else "black")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted class", ylabel="true class")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    summed = f", summed over {len(seeds)} seeds" if len(seeds) > 1 else ""
    ax.set_title(heading(title, f"confusion matrix (image counts{summed})"), fontsize="medium")
    return save(fig, path)


def experiment_figures(seeds: Seeds, classes: list[str], multilabel: bool, title: str, stem: Path) -> list[Path]:
    """ROC curves, reliability diagram and, for multi-class data, the confusion
    matrix of one experiment, as <stem>_roc.png, _reliability.png, _confusion.png."""
    return [roc_figure(seeds, classes, title, stem.with_name(stem.name + "_roc.png")),
            reliability_figure(seeds, multilabel, title, stem.with_name(stem.name + "_reliability.png")),
            *([] if multilabel else [confusion_figure(seeds, classes, title,
                                                       stem.with_name(stem.name + "_confusion.png"))])]


def series(log: list[dict], key: str, scale: str | None = None) -> tuple[list[int], list[float]] | None:
    """(epochs, values) of a logged key, divided by the entry `scale`; epochs
    without the value (e.g. kNN accuracy every few epochs) are left out."""
    points = [(e["epoch"], e[key] / e[scale] if scale else e[key]) for e in log if e.get(key) is not None]
    return tuple(map(list, zip(*points))) if points else None


def pretraining_figure(log: list[dict], method: str, title: str, path: Path) -> Path | None:
    """Loss, kNN accuracy and collapse signals per epoch, side by side. The
    signals are ratios on one axis with a line at 1: CASS's per-dimension batch
    std of each network's normalised embeddings over the healthy 1/sqrt(D)
    (near 0: every image maps to one point; a second line at COLLAPSE_RATIO, below
    which an arm is flagged as collapsed) and the cosine between the two
    networks' embeddings (1: identical, which with a small std means collapse);
    DINO's teacher entropy over ln K (1: a uniform teacher, 0: one dimension
    wins) and its loss over ln K (the entropy plus the KL: the two lines meeting
    at either extreme is collapse, as pretrain_dino.collapse_kind decides).
    None without logged epochs."""
    cass = method == "CASS"
    collapse = {"CNN batch std / healthy std": ("cnn_std", "healthy_std"), "ViT batch std / healthy std":
                ("vit_std", "healthy_std"), "cos(CNN, ViT embeddings), 1: identical": ("cos", None)} if cass \
        else {"teacher entropy / ln K": ("teacher_entropy", "ln_k"), "loss / ln K": ("loss", "ln_k")}
    panels = {"training loss (mean per image)": {"loss": ("loss", None)},
              "kNN top-1 accuracy (val)": {"CNN": ("knn_cnn", None), "ViT": ("knn_vit", None),
                                           "teacher": ("knn_teacher", None)},
              "collapse signal (ratio)": collapse}
    drawn = {ylabel: found for ylabel, lines in panels.items()
             if (found := {name: s for name, keys in lines.items() if (s := series(log, *keys))})}
    if not drawn:
        return None
    fig, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn), 3.6), squeeze=False, sharex=True)
    for ax, (ylabel, lines) in zip(axes[0], drawn.items()):
        for name, (epochs, values) in lines.items():
            ax.plot(epochs, values, marker="o", ms=3, lw=1.5, label=name)
        if ylabel.startswith("collapse"):
            ax.axhline(1, ls="--", lw=0.8, color="grey",
                       label="1: healthy std" if cass else "1: ln K (uniform teacher)")
            if cass:
                ax.axhline(COLLAPSE_RATIO, ls="--", lw=1, color="tab:red",
                           label=f"below {COLLAPSE_RATIO:g}: arm flagged as collapsed")
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(lines) > 1 or ylabel.startswith("kNN"):  # under the panel, never over a line
            # a fixed 4.5 font sizes below the axes, clear of the x label however short tight_layout makes the panel
            ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, 0), borderaxespad=4.5, frameon=False)
    fig.suptitle(f"{title}: {method} pretraining per epoch", fontsize="medium")
    fig.tight_layout()
    return save(fig, path)


# ====== study.py ======
def study_figure(summaries: list[dict], labels: list[str], rows: list[str], arms: list[str], frac: str,
                 path: Path) -> Path:
    """One panel per data set and regime: each pretrained row's (named by `labels`) paired difference in test
    macro F1 from the no-pretraining row (mean over seeds), one marker per arm, with its 95 % interval over test
    images and seeds."""
    sets = list(dict.fromkeys(s["set"] for s in summaries))
    regimes = list(dict.fromkeys(s["regime"] for s in summaries))
    fig, axes = plt.subplots(len(regimes), len(sets), figsize=(3.4 * len(sets), 0.45 * len(rows) * len(regimes) + 1.4),
                             squeeze=False, sharey=True, sharex=True)
    y, step = np.arange(len(rows)), 0.6 / len(arms)
    for s in summaries:
        ax = axes[regimes.index(s["regime"])][sets.index(s["set"])]
        for k, arm in enumerate(arms):
            found = [s["rows"][row][arm][frac] for row in rows]
            diff = np.array([f["diff"] for f in found])
            err = np.array([[d - f["low"], f["high"] - d] for d, f in zip(diff, found)]).T
            ax.errorbar(diff, y + (k - (len(arms) - 1) / 2) * step, xerr=err, fmt="osD^v"[k % 5], ms=4, capsize=2,
                        lw=1, color=f"C{k}", label={"cnn": "CNN", "vit": "ViT"}.get(arm, arm))
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{s['set']}, {s['regime']} init", fontsize="medium")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(y, labels)  # the panels share both axes
    axes[0][0].invert_yaxis()
    fig.supxlabel("macro F1 difference from no pretraining", fontsize="medium")
    fig.suptitle(f"Pretraining minus no pretraining at {float(frac):.0%} labels "
                 "(95 % intervals over test images and seeds)", fontsize="medium")
    fig.tight_layout()
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0), ncol=len(arms),
               frameon=False)
    return save(fig, path)


# ====== maps.py: attention, Grad-CAM and feature maps ======
HEAT = "viridis"  # perceptually ordered, so brighter always reads as more, in grey print too
UNIT = {"vmin": 0, "vmax": 1, "cmap": HEAT}  # every map comes min-max scaled into [0, 1]


def unit_bar(fig: plt.Figure, shown, axes, label: str) -> None:
    """One colour bar, 0 to 1, beside `axes` (an axes or a list of them)."""
    fig.colorbar(shown, ax=axes, ticks=[0, 0.5, 1], label=label, fraction=0.046, pad=0.04)


def overlay_figure(image: np.ndarray, values: np.ndarray, what: str, title: str, path: Path) -> Path:
    """An image (H, W, 3) uint8 beside itself under a map (h, w) in [0, 1],
    stretched over the whole image (bilinear) and half transparent."""
    fig, (plain, under) = plt.subplots(1, 2, figsize=(6.6, 3.6), layout="constrained")
    for ax, name in ((plain, "image"), (under, "overlay")):
        ax.imshow(image)
        ax.set_title(name, fontsize="small")
        ax.set_axis_off()
    h, w = image.shape[:2]
    shown = under.imshow(values, alpha=0.5, interpolation="bilinear", extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                         **UNIT)
    unit_bar(fig, shown, under, f"{what} (min-max scaled)")
    fig.suptitle(heading(title, f"{what} over the image"), fontsize="medium")
    return save(fig, path)


def heatmap_figure(heat: dict[str, tuple[str, np.ndarray]], title: str, path: Path) -> Path:
    """Maps (h, w) in [0, 1] side by side on one colour scale, each under its
    name, what it shows and its grid; heat: name -> (what, map)."""
    fig, axes = plt.subplots(1, len(heat), figsize=(3.4 * len(heat) + 0.9, 4), squeeze=False, layout="constrained")
    for ax, (name, (what, values)) in zip(axes[0], heat.items()):
        # one square a cell (a ViT patch, a CNN feature-map position): the map's own resolution
        shown = ax.imshow(values, interpolation="nearest", **UNIT)
        flat = ", flat: no contrast" if np.ptp(values) == 0 else ""  # scaled to all 0, it would read "looks nowhere"
        ax.set_title(textwrap.fill(name, 32) + f"\n{what}, {values.shape[0]} x {values.shape[1]} cells{flat}",
                     fontsize="small")
        ax.set_axis_off()
    unit_bar(fig, shown, axes[0].tolist(), "min-max scaled (0: least, 1: most)")
    fig.suptitle(title, fontsize="medium")
    return save(fig, path)


def channel_figure(image: np.ndarray, maps: np.ndarray, title: str, path: Path, columns: int = 4) -> Path:
    """An image (H, W, 3) uint8 and its channel maps (C, h, w), each in [0, 1],
    as a grid of `columns` tiles a row, on one colour scale."""
    rows = -(-len(maps) // columns)
    fig = plt.figure(figsize=(1.6 * (columns + rows) + 1, 1.6 * rows + 0.9), layout="constrained")
    grid = fig.add_gridspec(rows, rows + columns)  # the image, left, as tall as the grid
    picture = fig.add_subplot(grid[:, :rows])
    picture.imshow(image)
    picture.set_title("image", fontsize="small")
    picture.set_axis_off()
    tiles = [fig.add_subplot(grid[r, rows + c]) for r in range(rows) for c in range(columns)]
    for c, ax in enumerate(tiles):
        ax.set_axis_off()
        if c < len(maps):
            shown = ax.imshow(maps[c], interpolation="nearest", **UNIT)
            ax.set_title(f"channel {c}", fontsize="x-small")
    unit_bar(fig, shown, tiles, "activation (min-max scaled per channel)")
    fig.suptitle(title, fontsize="medium")
    return save(fig, path)
