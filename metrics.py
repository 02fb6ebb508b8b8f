"""Evaluation metrics of the paper (App. D.1): F1 for the autoimmune, Dermofit
and brain-MRI sets, balanced multi-class accuracy for ISIC-2019.

Every metric is the value of a named scikit-learn call (numpy only here;
tests/test_metrics.py checks each against scikit-learn), so numbers compare
with code that reports those calls. A ratio that is 0/0 counts as 0
(scikit-learn's zero_division=0, which is also what its default call returns).
"""
from __future__ import annotations

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
    tp = (y_true & y_pred).sum(0).astype(float)
    fp, fn = (~y_true & y_pred).sum(0), (y_true & ~y_pred).sum(0)
    tn = (~y_true & ~y_pred).sum(0)
    f1, recall, specificity = _f1(tp, fp, fn), _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    # balanced_accuracy_score averages the recall of the 0/1 values present in the column
    present = np.stack([tp + fn > 0, tn + fp > 0])
    balanced = (np.stack([recall, specificity]) * present).sum(0) / present.sum(0)
    samples = _f1((y_true & y_pred).sum(1), (~y_true & y_pred).sum(1), (y_true & ~y_pred).sum(1))
    return {"macro_f1": float(f1.mean()), "samples_f1": float(samples.mean()), "macro_recall": float(recall.mean()),
            "balanced_accuracy": float(balanced.mean()), "exact_match": float((y_true == y_pred).all(1).mean()),
            "per_class_f1": f1.tolist()}


def evaluate_predictions(targets: np.ndarray, logits: np.ndarray, multilabel: bool) -> dict:
    """Metrics from raw logits: argmax for multi-class, sigmoid > 0.5 for multi-label."""
    if multilabel:
        return multilabel_metrics(targets, logits > 0.0)
    return multiclass_metrics(targets, logits.argmax(1), logits.shape[1])
