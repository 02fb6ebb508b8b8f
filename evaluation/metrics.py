"""Evaluation of a classifier's outputs: the paper's metrics (App. D.1: macro F1
for the autoimmune, Dermofit and brain-MRI sets, balanced multi-class accuracy
for ISIC-2019) and, beyond the paper, per-class rates, AUROC, average
precision, calibration, per-label thresholds and bootstrap intervals.

scikit-learn and SciPy compute everything they offer. Ours is only what they
lack: the expected calibration error, the temperature fit's objective, the
F1-maximising multi-label thresholds, and the headline metrics and macro
AUROC scored on every bootstrap resample at once (intervals.Weighted).
`evaluate` is the one step from a fine-tuned model's validation and test
logits to every number fine-tuning records; report.py scores its prediction
files with the same functions. Imports nothing else of this project but
intervals.py (the bootstrap and seed intervals).

Conventions: a ratio 0/0 counts as 0 (zero_division=0). A threshold-free
metric of a class without both positives and negatives is undefined (NaN,
None in JSON) and left out of its macro mean.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Callable, NamedTuple

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, brier_score_loss,
                             confusion_matrix, f1_score, multilabel_confusion_matrix, precision_score, recall_score,
                             roc_auc_score)

from evaluation.intervals import Weighted, bootstrap_ci

# --metric -> headline key. ISIC-2019's "balanced multi-class accuracy" is the mean recall over the classes
# in the targets (balanced_accuracy_score); recall_score(average="macro") differs once a class is predicted
# but absent.
HEADLINES = {"f1": "macro_f1", "recall": "balanced_accuracy"}
ECE_BINS = 15


# ------------------------------------------------------------- outputs -> decisions
def probabilities(logits: np.ndarray, multilabel: bool) -> np.ndarray:
    """(N, C) logits -> probabilities: sigmoid per label, or softmax over classes."""
    return expit(logits) if multilabel else softmax(logits, axis=1)


def decide(probs: np.ndarray, multilabel: bool, thresholds: np.ndarray | None = None) -> np.ndarray:
    """(N,) class ids (argmax), or (N, C) bool: probs > thresholds ((C,); None: 0.5 each)."""
    if not multilabel:
        return probs.argmax(1)
    return probs > (0.5 if thresholds is None else np.asarray(thresholds, dtype=float))


def indicator(y: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C) bool one-vs-rest targets from (N,) class ids or (N, C) 0/1."""
    return np.asarray(y).astype(bool) if np.ndim(y) == 2 else np.eye(num_classes, dtype=bool)[y]


# ------------------------------------------------------------- thresholded metrics
def _multilabel_balanced_accuracy(y: np.ndarray, d: np.ndarray) -> float:
    """--metric recall on multi-label data: balanced_accuracy_score of each label's 0/1 column, mean over labels."""
    return float(np.mean([balanced_accuracy_score(y[:, k], d[:, k]) for k in range(y.shape[1])]))


# headline key -> (multi-class call, multi-label call) of (targets, decisions); the tables, intervals and
# results.json all score a headline through these
_HEADLINE_CALLS = {
    "macro_f1": (lambda y, d: f1_score(y, d, average="macro", zero_division=0),) * 2,
    "balanced_accuracy": (balanced_accuracy_score, _multilabel_balanced_accuracy),
}


def headline_score(headline: str, targets: np.ndarray, decided: np.ndarray, multilabel: bool) -> float:
    """The headline metric (a value of HEADLINES) of decisions (see `decide`)."""
    with warnings.catch_warnings():  # a resample may lack a class: defined by the conventions above
        warnings.simplefilter("ignore")
        return float(_HEADLINE_CALLS[headline][multilabel](targets, decided))


def thresholded_metrics(targets: np.ndarray, decided: np.ndarray, multilabel: bool, num_classes: int) -> dict:
    """Every metric of hard decisions. Multi-class ((N,) ids): macro F1 (over the classes in targets or
    decisions), accuracy, balanced accuracy, macro recall, per-class F1 and the confusion matrix (rows true,
    columns predicted). Multi-label ((N, C) 0/1): macro F1 and recall over all labels, samples F1 (an image
    with no true and no predicted label counts 0), balanced accuracy per label, exact match, per-label F1.
    Per-class one-vs-rest sensitivity, specificity and PPV for both."""
    found = {key: headline_score(key, targets, decided, multilabel) for key in _HEADLINE_CALLS}
    labels = np.arange(num_classes)
    if multilabel:
        found |= {"samples_f1": f1_score(targets, decided, average="samples", zero_division=0),
                  "macro_recall": recall_score(targets, decided, average="macro", zero_division=0),
                  "exact_match": accuracy_score(targets, decided)}
    else:
        found |= {"accuracy": accuracy_score(targets, decided),
                  "macro_recall": recall_score(targets, decided, average="macro", zero_division=0),
                  "confusion_matrix": confusion_matrix(targets, decided, labels=labels).tolist()}
    y, d = indicator(targets, num_classes), indicator(decided, num_classes)
    (tn, fp), _ = multilabel_confusion_matrix(y, d).transpose(1, 2, 0)
    return {**{k: float(v) if np.isscalar(v) else v for k, v in found.items()},
            "per_class_f1": f1_score(y, d, average=None, zero_division=0).tolist(),
            "sensitivity": recall_score(y, d, average=None, zero_division=0).tolist(),
            "specificity": np.divide(tn, tn + fp, out=np.zeros(num_classes), where=tn + fp > 0).tolist(),
            "ppv": precision_score(y, d, average=None, zero_division=0).tolist()}


# ------------------------------------------------------------- threshold-free metrics
class PerClass(NamedTuple):
    """A threshold-free metric: its macro mean over the defined classes and its (C,) values (NaN: undefined)."""
    macro: float
    per_class: np.ndarray


def _one_vs_rest(score: Callable, targets: np.ndarray, scores: np.ndarray) -> PerClass:
    y = indicator(targets, scores.shape[1])
    values = np.array([score(y[:, k], scores[:, k]) if 0 < y[:, k].sum() < len(y) else np.nan
                       for k in range(y.shape[1])])
    defined = ~np.isnan(values)
    return PerClass(float(values[defined].mean()) if defined.any() else np.nan, values)


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> PerClass:
    """One-vs-rest roc_auc_score per class; targets (N,) ids or (N, C) 0/1, scores (N, C)."""
    return _one_vs_rest(roc_auc_score, targets, scores)


def average_precision(targets: np.ndarray, scores: np.ndarray) -> PerClass:
    """One-vs-rest average_precision_score per class (NaN without positives or without negatives)."""
    return _one_vs_rest(average_precision_score, targets, scores)


def brier(targets: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class ((N,) ids): Brier's original score, the squared error against the one-hot target summed
    over classes, mean over images (range [0, 2]); multi-label ((N, C) 0/1): the mean over labels of the
    binary score. Both from brier_score_loss per class."""
    y = indicator(targets, probs.shape[1])
    per_class = [brier_score_loss(y[:, k], probs[:, k], pos_label=True) for k in range(y.shape[1])]
    return float(np.mean(per_class) if np.ndim(targets) == 2 else np.sum(per_class))


# ------------------------------------------------------------- calibration (ours)
def reliability(targets: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, ...]:
    """(confidence, correct, bin) of every decision, bins equal-width on (lo, hi]. Multi-class: the top
    probability, right when the argmax is the target. Multi-label: every (image, label) at 0.5, confidence
    max(p, 1 - p), so one label reads as a two-class problem."""
    if np.ndim(targets) == 2:
        conf = np.maximum(probs, 1 - probs).ravel()
        correct = ((probs > 0.5) == np.asarray(targets).astype(bool)).ravel()
    else:
        conf, correct = probs.max(1), probs.argmax(1) == targets
    return conf, correct, np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)


def ece(targets: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error (Guo et al. 2017): sum over bins of |bin| / N * |accuracy - confidence|."""
    conf, correct, which = reliability(targets, probs, bins)
    # |bin| * |accuracy - confidence| is |sum over the bin of (correct - confidence)|
    return float(np.abs(np.bincount(which, weights=correct - conf, minlength=bins)).sum() / len(conf))


def nll(logits: np.ndarray, targets: np.ndarray, multilabel: bool) -> float:
    """Mean cross-entropy of softmax(logits) per image, or binary cross-entropy of sigmoid(logits) per
    (image, label), without overflow."""
    if multilabel:
        return float((np.logaddexp(0, logits) - targets * logits).mean())
    return float(-log_softmax(logits, axis=1)[np.arange(len(targets)), targets].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray, multilabel: bool,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature scaling (Guo et al. 2017): the T in bounds minimising the validation NLL of logits / T.
    The NLL is convex in 1/T, so unimodal in log T: a bounded scalar search on log T finds it (a bound when
    the optimum lies beyond, e.g. T -> inf for logits unrelated to the labels)."""
    found = minimize_scalar(lambda log_t: nll(logits / np.exp(log_t), targets, multilabel), bounds=np.log(bounds),
                            method="bounded", options={"xatol": 1e-7})
    return float(np.exp(found.x))


# ------------------------------------------------------------- multi-label thresholds (ours)
def best_thresholds(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(C,): per label, the t maximising the F1 of probs > t against targets (both (N, C); the val split).
    Each cut between two adjacent distinct probabilities sits at their midpoint (below the lowest: half of it);
    of equal F1 the t nearest 0.5 wins (the higher if equally near), so the default moves no further than the
    data asks. A label without a positive keeps 0.5 (its F1 is 0 at every threshold)."""
    y, found = np.asarray(targets).astype(bool), np.full(probs.shape[1], 0.5)
    for k in np.flatnonzero(y.any(0)):
        order = np.argsort(-probs[:, k], kind="stable")
        s = probs[order, k].astype(float)
        last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # tied probabilities enter together
        high, tps = s[last], np.cumsum(y[order, k])[last]
        low = np.r_[high[1:], 0.0]
        cut = np.where((high + low) / 2 < high, (high + low) / 2, low)  # adjacent floats: the midpoint may round up
        f1 = 2 * tps / (last + 1 + tps[-1])  # 2 tp / (2 tp + fp + fn); last + 1 called positive, tps[-1] = all
        f1[cut >= high] = -1  # a probability of exactly 0 exceeds no threshold
        best = np.flatnonzero(f1 == f1.max())
        found[k] = cut[best[np.argmin(np.abs(cut[best] - 0.5))]]
    return found


# ------------------------------------------------------------- every bootstrap resample at once (ours)
def _weighted_headline(headline: str, multilabel: bool) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """headline_score of decisions on every resample of `weights` at once, from the resamples' weighted
    confusion counts, as scikit-learn defines it: multi-class macro F1 over the classes in the truth or the
    decisions, balanced accuracy the mean recall over the classes in the truth; multi-label macro F1 over every
    label (0/0 as 0), balanced accuracy the mean over labels of the mean recall over the values (0, 1) each
    label's truth holds. tests/test_metrics.py checks each resample against headline_score."""
    def over(y: np.ndarray, d: np.ndarray, w: np.ndarray) -> np.ndarray:
        if multilabel:
            truth, said = np.asarray(y, dtype=float), np.asarray(d, dtype=float)
        else:
            classes = int(max(y.max(), d.max())) + 1
            truth, said = np.eye(classes)[y], np.eye(classes)[d]
        tp, true, pred = w @ (truth * said), w @ truth, w @ said  # (R, C) each
        if headline == "macro_f1":
            f1 = np.divide(2 * tp, true + pred, out=np.zeros_like(tp), where=true + pred > 0)
            if multilabel:
                return f1.mean(1)
            present = true + pred > 0
            return (f1 * present).sum(1) / present.sum(1)
        recall = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
        if not multilabel:
            return (recall * (true > 0)).sum(1) / (true > 0).sum(1)
        negatives = w.sum(1, keepdims=True) - true
        specificity = np.divide(negatives - pred + tp, negatives, out=np.zeros_like(tp), where=negatives > 0)
        return ((recall * (true > 0) + specificity * (negatives > 0)) / ((true > 0) * 1.0 + (negatives > 0))).mean(1)
    return over


def headline_metric(headline: str, multilabel: bool) -> Weighted:
    """metric(targets, decisions): headline_score, computed for every bootstrap resample at once (Weighted)."""
    return Weighted(_weighted_headline(headline, multilabel))


def _weighted_auroc(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(R,) one class's AUROC on every resample of `w` (R, N): the weighted share of (positive, negative) pairs
    the scores order right, ties counting one half (roc_auc_score's value, as the Mann-Whitney statistic); NaN
    in a resample without positives or without negatives."""
    order = np.argsort(score, kind="stable")
    ordered = w[:, order]
    neg = ordered * ~positive[order]
    pos = ordered - neg
    starts = np.flatnonzero(np.r_[True, np.diff(score[order]) != 0])  # groups of tied scores
    if len(starts) < len(score):
        pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)  # (R, groups)
    # each group's positives above the negatives up to and including it, less half of those tied with it
    right = np.einsum("rg,rg->r", pos, np.cumsum(neg, axis=1)) - 0.5 * np.einsum("rg,rg->r", pos, neg)
    pairs = pos.sum(1) * neg.sum(1)
    return np.divide(right, pairs, out=np.full(len(w), np.nan), where=pairs > 0)


def macro_auroc_of(defined: np.ndarray) -> Weighted:
    """metric(targets, scores): macro AUROC over the classes in `defined` ((C,) bool, those defined on the whole
    test set), NaN unless every one of them keeps positives and negatives, so that every used resample averages
    the same classes (a resample missing a rare class would otherwise average an easier set of classes).
    Weighted: every resample at once; tests/test_metrics.py checks it against roc_auc."""
    def over(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
        truth = indicator(y, s.shape[1])
        per_class = [_weighted_auroc(truth[:, k], s[:, k], w) for k in np.flatnonzero(defined)]
        return np.mean(per_class, axis=0) if per_class else np.full(len(w), np.nan)
    return Weighted(over)


# ------------------------------------------------------------- the evaluation step
def over_seeds(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and std (ddof 1; 0 for one seed) over seeds of every scalar test metric defined in every run."""
    keys = [k for k, v in runs[0]["test"].items() if isinstance(v, float)
            and all(isinstance(r["test"][k], float) for r in runs)]
    values = {k: np.array([r["test"][k] for r in runs]) for k in keys}
    return {k: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
            for k, v in values.items()}


def _json(values: float | np.ndarray) -> float | list | None:
    """NaN (undefined) as None, so the results are valid JSON."""
    if np.ndim(values):
        return [_json(v) for v in values]
    return None if np.isnan(values) else float(values)


def classification_metrics(targets: np.ndarray, probs: np.ndarray, multilabel: bool,
                           thresholds: np.ndarray | None = None) -> dict:
    """Every metric of one set of (N, C) probabilities: thresholded ones on `decide`, AUROC and average
    precision ranking the probabilities, Brier and ECE. Undefined values are None."""
    auroc, ap = roc_auc(targets, probs), average_precision(targets, probs)
    return {**thresholded_metrics(targets, decide(probs, multilabel, thresholds), multilabel, probs.shape[1]),
            "auroc_macro": _json(auroc.macro), "auroc_per_class": _json(auroc.per_class),
            "ap_macro": _json(ap.macro), "ap_per_class": _json(ap.per_class),
            "brier": brier(targets, probs), "ece": ece(targets, probs)}


def evaluate(val_logits: np.ndarray, val_targets: np.ndarray, test_logits: np.ndarray, test_targets: np.ndarray,
             multilabel: bool, headline: str, *, val_thresholds: bool = False, groups: np.ndarray | None = None,
             resamples: int = 1000, seed: int = 0) -> dict:
    """Every number fine-tuning records, from the best epoch's logits (N, C) and targets ((N,) ids or (N, C)
    0/1) of the val and test splits.

    test: classification_metrics of the test probabilities, multi-label decisions at 0.5 or, with
    `val_thresholds`, at best_thresholds on the val split; test_ci95: bootstrap intervals of the headline
    and macro AUROC over test images, or whole `groups` (patients, lesions); thresholds: (C,) those used;
    calibration: the temperature fitted on val and the test Brier and ECE after dividing by it."""
    # float64: float32 probabilities saturate (sigmoid at logits above ~17) and would tie confident images
    val_logits, test_logits = np.asarray(val_logits, dtype=np.float64), np.asarray(test_logits, dtype=np.float64)
    num_classes = test_logits.shape[1]
    thresholds = best_thresholds(val_targets, probabilities(val_logits, True)) if val_thresholds \
        else np.full(num_classes, 0.5)
    probs = probabilities(test_logits, multilabel)
    test = classification_metrics(test_targets, probs, multilabel, thresholds)
    temperature = fit_temperature(val_logits, val_targets, multilabel)
    calibrated = probabilities(test_logits / temperature, multilabel)
    intervals = {
        headline: bootstrap_ci(headline_metric(headline, multilabel), test_targets,
                               decide(probs, multilabel, thresholds), groups, resamples, seed),
        "auroc_macro": bootstrap_ci(macro_auroc_of(~np.isnan(roc_auc(test_targets, probs).per_class)),
                                    test_targets, probs, groups, resamples, seed)}
    return {"test": test, "thresholds": thresholds,
            "test_ci95": {key: {k: _json(v) if isinstance(v, float) else v for k, v in asdict(i).items()}
                          for key, i in intervals.items()},
            "calibration": {"temperature": temperature, "brier": brier(test_targets, calibrated),
                            "ece": ece(test_targets, calibrated)}}
