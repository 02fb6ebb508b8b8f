"""Evaluation metrics of the paper (App. D.1): F1 for the autoimmune, Dermofit
and brain-MRI sets, balanced multi-class accuracy for ISIC-2019; beyond the
paper, per-class rates, AUROC, average precision, calibration (Brier, ECE,
temperature scaling), per-label thresholds maximising F1 and bootstrap
confidence intervals over test images.

Every metric is the value of a named scikit-learn call (numpy only here;
tests/test_metrics.py checks each against scikit-learn), so numbers compare
with code that reports those calls. A ratio that is 0/0 counts as 0
(scikit-learn's zero_division=0, which is also what its default call returns).
Threshold-free metrics of a class without both positives and negatives in the
targets are NaN (scikit-learn raises or warns there) and left out of macro means.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np

# --metric -> headline key. ISIC-2019's "balanced multi-class accuracy" is the
# mean recall over the classes in the targets, i.e. balanced_accuracy_score;
# recall_score(average="macro") differs once a class is predicted but absent.
HEADLINES = {"f1": "macro_f1", "recall": "balanced_accuracy"}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (zero_division=0)."""
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    return _ratio(2 * tp, 2 * tp + fp + fn)


def _counts(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-column tp, fp, fn, tn (floats, (C,)) of (N, C) bool targets and predictions."""
    return tuple((a & b).sum(0).astype(float) for a, b in
                 ((y_true, y_pred), (~y_true, y_pred), (y_true, ~y_pred), (~y_true, ~y_pred)))


def _indicator(y: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C) bool from (N,) class ids (one-hot, one-vs-rest) or from (N, C) 0/1."""
    return np.asarray(y).astype(bool) if np.ndim(y) == 2 else np.eye(num_classes, dtype=bool)[y]


def multiclass_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    """y_true, y_pred: (N,) class ids in range(num_classes).

    macro_f1 / macro_recall: f1_score / recall_score(y_true, y_pred,
    average="macro", zero_division=0), i.e. over the classes in y_true or y_pred
    (a class only predicted counts with recall 0). balanced_accuracy:
    balanced_accuracy_score (mean recall over the classes in y_true).
    accuracy: accuracy_score. per_class_f1: f1_score(average=None,
    labels=range(num_classes), zero_division=0). confusion_matrix:
    confusion_matrix(labels=range(num_classes)), rows true, columns predicted.
    """
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    seen, in_true = (cm.sum(0) + cm.sum(1)) > 0, cm.sum(1) > 0
    f1, recall = _f1(tp, fp, fn), _ratio(tp, tp + fn)
    return {"macro_f1": float(f1[seen].mean()), "accuracy": float(tp.sum() / max(len(y_true), 1)),
            "balanced_accuracy": float(recall[in_true].mean()), "macro_recall": float(recall[seen].mean()),
            "per_class_f1": f1.tolist(), "confusion_matrix": cm.tolist()}


def multilabel_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """y_true, y_pred: (N, C) 0/1.

    macro_f1 / macro_recall: f1_score / recall_score(average="macro",
    zero_division=0) over all C labels, so a label absent from targets and
    predictions counts 0. samples_f1: f1_score(average="samples",
    zero_division=0): an image with no true and no predicted label counts 0, as
    in scikit-learn's default call. exact_match: accuracy_score (subset
    accuracy). per_class_f1: f1_score(average=None, zero_division=0).
    balanced_accuracy (--metric recall on multi-label data): the mean over labels
    of balanced_accuracy_score on that label's 0/1 column.
    """
    y_true, y_pred = y_true.astype(bool), y_pred.astype(bool)
    tp, fp, fn, tn = _counts(y_true, y_pred)
    f1, recall, specificity = _f1(tp, fp, fn), _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    # balanced_accuracy_score averages the recall of the 0/1 values present in the column
    present = np.stack([tp + fn > 0, tn + fp > 0])
    balanced = (np.stack([recall, specificity]) * present).sum(0) / present.sum(0)
    samples = _f1((y_true & y_pred).sum(1), (~y_true & y_pred).sum(1), (y_true & ~y_pred).sum(1))
    return {"macro_f1": float(f1.mean()), "samples_f1": float(samples.mean()), "macro_recall": float(recall.mean()),
            "balanced_accuracy": float(balanced.mean()), "exact_match": float((y_true == y_pred).all(1).mean()),
            "per_class_f1": f1.tolist()}


def per_class_rates(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None = None) -> dict:
    """Per-class one-vs-rest rates, lists of C floats, 0/0 counted as 0.

    y_true, y_pred: (N,) class ids in range(num_classes) (multi-class) or (N, C)
    0/1 (multi-label; num_classes is then read from the shape).
    sensitivity: recall_score(average=None, labels=range(C), zero_division=0).
    specificity: tn / (tn + fp) of multilabel_confusion_matrix(labels=range(C)),
    i.e. the recall of "not class k". ppv: precision_score(average=None,
    labels=range(C), zero_division=0).
    """
    c = num_classes or np.shape(y_pred)[1]
    tp, fp, fn, tn = _counts(_indicator(y_true, c), _indicator(y_pred, c))
    return {"sensitivity": _ratio(tp, tp + fn).tolist(), "specificity": _ratio(tn, tn + fp).tolist(),
            "ppv": _ratio(tp, tp + fp).tolist()}


class PerClass(NamedTuple):
    """A threshold-free metric: its macro mean and its (C,) per-class values (NaN where undefined)."""
    macro: float
    per_class: np.ndarray


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of (N,) x, tied values sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def _binary_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney U / (pos * neg): the chance a positive outscores a negative,
    a tie counting 1/2, which is the area under the tie-aware ROC curve."""
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return np.nan
    return float((_average_ranks(s)[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _descending(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cuts of (N,) scores s, highest first, ties entering together: each tied block's score, the
    position of its last image in descending order (images called positive - 1), the positives of y up to it."""
    order = np.argsort(-s, kind="stable")
    ss = s[order]
    last = np.flatnonzero(np.r_[ss[1:] != ss[:-1], True])
    return ss[last], last, np.cumsum(y[order])[last]


def _binary_ap(y: np.ndarray, s: np.ndarray) -> float:
    """Sum over distinct thresholds, highest first, of (recall gain) * precision;
    tied scores enter together, as in precision_recall_curve."""
    pos = int(y.sum())
    if pos == 0 or pos == len(y):
        return np.nan
    _, last, tps = _descending(y, s)
    return float(np.sum(np.diff(tps, prepend=0) / pos * tps / (last + 1)))


def _per_class(binary: Callable, y_true: np.ndarray, scores: np.ndarray) -> PerClass:
    y, s = _indicator(y_true, scores.shape[1]), np.asarray(scores, dtype=float)
    values = np.array([binary(y[:, k], s[:, k]) for k in range(s.shape[1])])
    defined = ~np.isnan(values)
    return PerClass(float(values[defined].mean()) if defined.any() else np.nan, values)


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> PerClass:
    """One-vs-rest AUROC. y_true: (N,) class ids or (N, C) 0/1; scores: (N, C)
    (probabilities, or anything ordered like them: logits for multi-label).

    per_class[k]: roc_auc_score(y_true == k, scores[:, k]) (or y_true[:, k]);
    NaN when class k lacks positives or negatives in y_true (scikit-learn
    raises). macro: mean over the defined classes; with every class defined it
    is roc_auc_score(average="macro") (multi_class="ovr" for class ids).
    """
    return _per_class(_binary_auroc, y_true, scores)


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> PerClass:
    """One-vs-rest average precision, shapes and NaN convention as roc_auc.

    per_class[k]: average_precision_score(y_true == k, scores[:, k]) (the
    step-wise sum, no interpolation); NaN without positives or without
    negatives (scikit-learn gives 0 and 1 there, which would move the mean).
    """
    return _per_class(_binary_ap, y_true, scores)


def brier(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Brier score. Multi-class, y_true (N,) ids, probs (N, C) rows summing to 1:
    squared error against the one-hot target summed over classes, mean over
    images (Brier's original, range [0, 2]) = brier_score_loss(y_true, probs,
    labels=range(C), scale_by_half=False). Multi-label, y_true (N, C) 0/1: the
    mean over labels of the binary brier_score_loss(y_true[:, k], probs[:, k]).
    """
    sq = (probs - _indicator(y_true, probs.shape[1])) ** 2
    return float(sq.mean() if np.ndim(y_true) == 2 else sq.sum(1).mean())


def ece(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017), no scikit-learn equivalent:
    sum over equal-width confidence bins (lo, hi] of |bin| / N * |accuracy -
    mean confidence|. Multi-class (y_true (N,) ids): confidence is the top
    probability, correct when the argmax is the target. Multi-label (y_true
    (N, C) 0/1): every (image, label) is one binary decision at 0.5, confidence
    max(p, 1 - p), so one label reads as a two-class problem.
    """
    if np.ndim(y_true) == 2:
        conf = np.maximum(probs, 1 - probs).ravel()
        correct = ((probs > 0.5) == np.asarray(y_true).astype(bool)).ravel()
    else:
        conf, correct = probs.max(1), probs.argmax(1) == y_true
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    # |bin| * |accuracy - confidence| is |sum over the bin of (correct - confidence)|
    return float(np.abs(np.bincount(which, weights=correct - conf, minlength=bins)).sum() / len(conf))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _nll(logits: np.ndarray, y_true: np.ndarray, multilabel: bool) -> float:
    """Mean cross-entropy of softmax(logits) per image, or binary cross-entropy
    of sigmoid(logits) per (image, label), computed without overflow."""
    if multilabel:
        return float((np.logaddexp(0, logits) - y_true * logits).mean())
    return float(-_log_softmax(logits)[np.arange(len(y_true)), y_true].mean())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, multilabel: bool,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature scaling (Guo et al. 2017): the T in bounds minimising the
    validation NLL of softmax(logits / T) or sigmoid(logits / T).

    logits: (N, C); y_true: (N,) ids or (N, C) 0/1. The NLL is convex in 1/T
    (cross-entropy of a linear function), hence unimodal in log T, so a
    golden-section search on log T finds it; a bound is returned when the
    optimum lies beyond it (e.g. T -> inf for logits unrelated to the labels).
    """
    lo, hi = np.log(bounds)
    g = (np.sqrt(5) - 1) / 2

    def nll(log_t: float) -> float:
        return _nll(logits / np.exp(log_t), y_true, multilabel)

    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > 1e-7:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2))


@dataclass(frozen=True)
class Interval:
    """A metric on the whole test set and its percentile bootstrap interval over
    the n_used resamples on which the metric was defined (not NaN)."""
    estimate: float
    low: float
    high: float
    n_used: int


@dataclass(frozen=True)
class PairedInterval(Interval):
    """Interval of metric(a) - metric(b); frac_le_zero: the fraction of used
    resamples with a difference <= 0, a one-sided p-like number for "a > b"."""
    frac_le_zero: float


def _resamples(n_images: int, groups: np.ndarray | None, n: int, seed: int) -> Iterator[np.ndarray]:
    """n index arrays: N images drawn with replacement, or, with groups (N,),
    as many groups as there are drawn with replacement, all their images kept
    (images of one patient or one lesion are not independent)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n):
            yield rng.integers(0, n_images, n_images)
        return
    order = np.argsort(groups, kind="stable")
    sizes = np.unique(np.asarray(groups)[order], return_counts=True)[1]
    starts = np.cumsum(sizes) - sizes
    for _ in range(n):
        pick = rng.integers(0, len(sizes), len(sizes))
        lens = sizes[pick]
        ends = np.cumsum(lens)
        # positions start..start+len-1 of each picked group, laid end to end
        yield order[np.arange(ends[-1]) + np.repeat(starts[pick] - ends + lens, lens)]


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float, int]:
    used = values[~np.isnan(values)]
    if len(used) == 0:
        return np.nan, np.nan, 0
    low, high = np.percentile(used, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high), len(used)


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], y_true: np.ndarray, scores: np.ndarray,
                 groups: np.ndarray | None = None, n: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of metric(y_true, scores) over test images
    (or over groups, see _resamples). y_true, scores: arrays indexed by image
    on their first axis. Resamples where the metric is NaN are dropped."""
    values = np.array([metric(y_true[i], scores[i]) for i in _resamples(len(y_true), groups, n, seed)], dtype=float)
    return Interval(float(metric(y_true, scores)), *_percentiles(values, level))


def paired_bootstrap(metric: Callable[[np.ndarray, np.ndarray], float], y_true: np.ndarray,
                     scores_a: np.ndarray, scores_b: np.ndarray, groups: np.ndarray | None = None,
                     n: int = 1000, seed: int = 0, level: float = 0.95) -> PairedInterval:
    """Bootstrap of metric(a) - metric(b) with both models scored on the same
    resampled images each time, so the shared test-set luck cancels."""
    diffs = np.array([metric(y_true[i], scores_a[i]) - metric(y_true[i], scores_b[i])
                      for i in _resamples(len(y_true), groups, n, seed)], dtype=float)
    used = diffs[~np.isnan(diffs)]
    return PairedInterval(float(metric(y_true, scores_a) - metric(y_true, scores_b)), *_percentiles(diffs, level),
                          frac_le_zero=float((used <= 0).mean()) if len(used) else np.nan)


def _json(values: float | np.ndarray) -> float | list | None:
    """NaN (undefined) as None, so the results are valid JSON."""
    if np.ndim(values):
        return [_json(v) for v in values]
    return None if np.isnan(values) else float(values)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -logits))  # without exp's overflow for large negative logits


def multilabel_decisions(logits: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
    """(N, C) bool: sigmoid(logits) > thresholds ((C,); None: 0.5 each), compared as logits > log(t / (1 - t)),
    so that 0.5 is exactly logits > 0 (fine-tuning's decision before thresholds could be chosen)."""
    t = np.full(logits.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, dtype=float)
    with np.errstate(divide="ignore"):  # t = 0 or 1: every or no image
        return logits > np.log(t / (1 - t))


def best_thresholds(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(C,): per label, the t maximising the F1 of probs > t against y_true (both (N, C); e.g. the val split).
    Each cut between two adjacent distinct probabilities sits at their midpoint (below the lowest: half of it);
    of equal F1 the t nearest 0.5 wins (the higher if equally near), so the default moves no further than the
    data asks. A label without a positive keeps 0.5 (its F1 is 0 at every threshold)."""
    y_true, found = np.asarray(y_true).astype(bool), np.full(probs.shape[1], 0.5)
    for k in np.flatnonzero(y_true.any(0)):
        high, last, tps = _descending(y_true[:, k], np.asarray(probs[:, k], dtype=float))
        low = np.r_[high[1:], 0.0]
        mid = (high + low) / 2
        cut = np.where(mid < high, mid, low)  # adjacent floats: the midpoint may round up onto `high`
        f1 = 2 * tps / (last + 1 + tps[-1])  # 2 tp / (2 tp + fp + fn); last + 1 called positive, tps[-1] = all
        f1[cut >= high] = -1  # a probability of exactly 0 exceeds no threshold
        best = np.flatnonzero(f1 == f1.max())
        found[k] = cut[best[np.argmin(np.abs(cut[best] - 0.5))]]
    return found


def evaluate_predictions(targets: np.ndarray, logits: np.ndarray, multilabel: bool,
                         thresholds: np.ndarray | None = None) -> dict:
    """Metrics from raw logits (N, C) and targets ((N,) ids or (N, C) 0/1): thresholded ones on the argmax
    (multi-class) or at sigmoid > thresholds (multi-label, multilabel_decisions); auroc_* and ap_* rank
    log-softmax (ordered as softmax, without its underflow ties) or logits (ordered as sigmoid); brier and
    ece on the softmax or sigmoid probabilities. Undefined values are None."""
    if multilabel:
        preds, ranked = multilabel_decisions(logits, thresholds), logits
        probs = sigmoid(logits)
        results = multilabel_metrics(targets, preds)
    else:
        preds, ranked = logits.argmax(1), _log_softmax(logits)
        probs = np.exp(ranked)
        results = multiclass_metrics(targets, preds, logits.shape[1])
    auroc, ap = roc_auc(targets, ranked), average_precision(targets, ranked)
    return {**results, **per_class_rates(targets, preds, logits.shape[1]),
            "auroc_macro": _json(auroc.macro), "auroc_per_class": _json(auroc.per_class),
            "ap_macro": _json(ap.macro), "ap_per_class": _json(ap.per_class),
            "brier": brier(targets, probs), "ece": ece(targets, probs)}


def headline_intervals(targets: np.ndarray, logits: np.ndarray, multilabel: bool, headline: str,
                       groups: np.ndarray | None = None, n: int = 1000, seed: int = 0,
                       thresholds: np.ndarray | None = None) -> dict[str, dict]:
    """95 % percentile bootstrap intervals over the test images (or their
    groups) of the headline metric (multi-label: at `thresholds`) and of macro
    AUROC, as plain dicts (estimate, low, high, n_used; undefined bounds None):
    the uncertainty on this test set, which the spread over seeds does not measure."""
    num_classes = logits.shape[1]

    def thresholded(y: np.ndarray, s: np.ndarray) -> float:
        found = multilabel_metrics(y, multilabel_decisions(s, thresholds)) if multilabel \
            else multiclass_metrics(y, s.argmax(1), num_classes)
        return found[headline]

    ranked = logits if multilabel else _log_softmax(logits)
    found = {headline: bootstrap_ci(thresholded, targets, logits, groups, n, seed),
             "auroc_macro": bootstrap_ci(lambda y, s: roc_auc(y, s).macro, targets, ranked, groups, n, seed)}
    return {key: {k: _json(v) if isinstance(v, float) else v for k, v in vars(i).items()} for key, i in found.items()}
