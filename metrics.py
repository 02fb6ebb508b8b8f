"""Evaluation metrics of the paper (App. D.1): F1 for the autoimmune, Dermofit
and brain-MRI sets, balanced accuracy (= macro recall) for ISIC-2019.
Averages follow scikit-learn's conventions: macro over the classes present in
the targets or the predictions, 0 where a ratio is undefined."""
from __future__ import annotations

import numpy as np

HEADLINES = {"f1": "macro_f1", "recall": "macro_recall"}


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(len(tp)), where=denom > 0)


def _recall(tp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    return np.divide(tp, tp + fn, out=np.zeros(len(tp)), where=(tp + fn) > 0)


def multiclass_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    """y_true, y_pred: (N,) class ids."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    present = (cm.sum(0) + cm.sum(1)) > 0
    in_true = cm.sum(1) > 0
    f1, recall = _f1(tp, fp, fn), _recall(tp, fn)
    return {"macro_f1": float(f1[present].mean()), "accuracy": float(tp.sum() / max(len(y_true), 1)),
            "balanced_accuracy": float(recall[in_true].mean()), "macro_recall": float(recall[in_true].mean()),
            "per_class_f1": f1.tolist(), "confusion_matrix": cm.tolist()}


def multilabel_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """y_true, y_pred: (N, C) 0/1. samples_f1 counts an image with no true and
    no predicted label as a perfect 1."""
    y_true, y_pred = y_true.astype(bool), y_pred.astype(bool)
    tp = (y_true & y_pred).sum(0).astype(float)
    fp, fn = (~y_true & y_pred).sum(0), (y_true & ~y_pred).sum(0)
    present = (y_true | y_pred).any(0)
    f1 = _f1(tp, fp, fn)
    s_tp = (y_true & y_pred).sum(1)
    s_den = y_true.sum(1) + y_pred.sum(1)
    samples = np.divide(2 * s_tp, s_den, out=np.ones(len(s_den)), where=s_den > 0)
    recall = _recall(tp, fn)
    return {"macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "samples_f1": float(samples.mean()), "macro_recall": float(recall[y_true.any(0)].mean()),
            "exact_match": float((y_true == y_pred).all(1).mean()), "per_class_f1": f1.tolist()}


def evaluate_predictions(targets: np.ndarray, logits: np.ndarray, multilabel: bool) -> dict:
    """Metrics from raw logits: argmax for multi-class, sigmoid > 0.5 for multi-label."""
    if multilabel:
        return multilabel_metrics(targets, logits > 0.0)
    return multiclass_metrics(targets, logits.argmax(1), logits.shape[1])
