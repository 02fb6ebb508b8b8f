import numpy as np
import pytest

from metrics import evaluate_predictions, multiclass_metrics, multilabel_metrics


def test_multiclass_metrics_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 1])
    m = multiclass_metrics(y_true, y_pred, 3)
    # class 0: tp 2 fn 1 -> f1 0.8; class 1: tp 2 fp 2 -> f1 2/3; class 2: tp 0 -> 0
    assert m["per_class_f1"] == pytest.approx([0.8, 2 / 3, 0.0])
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["confusion_matrix"][0] == [2, 1, 0]


def test_macro_averages_skip_classes_absent_from_targets_and_predictions():
    m = multiclass_metrics(np.array([0, 1]), np.array([0, 1]), 5)
    assert m["macro_f1"] == 1.0 and m["balanced_accuracy"] == 1.0


def test_multilabel_metrics_by_hand():
    y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    p = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    m = multilabel_metrics(y, p)
    # label 0: f1 1; label 1: f1 1; label 2: tp 0 fp 1 fn 1 -> 0
    assert m["macro_f1"] == pytest.approx(2 / 3)
    # per image: 2*1/(2+1), 2*1/(1+2), empty vs empty = 1
    assert m["samples_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert m["exact_match"] == pytest.approx(1 / 3)


def test_evaluate_predictions_thresholds_logits():
    logits = np.array([[2.0, -1.0], [-0.5, 0.5]])
    assert evaluate_predictions(np.array([0, 1]), logits, multilabel=False)["accuracy"] == 1.0
    ml = evaluate_predictions(np.array([[1, 0], [0, 0]]), logits, multilabel=True)
    assert ml["exact_match"] == 0.5
