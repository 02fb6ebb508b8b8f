import numpy as np
import pytest

from metrics import HEADLINES, evaluate_predictions, multiclass_metrics, multilabel_metrics

CASES = range(50)


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
    assert m["macro_f1"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["macro_recall"] == 1.0


def test_a_class_only_predicted_lowers_macro_recall_but_not_balanced_accuracy():
    m = multiclass_metrics(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]), 4)
    # recalls: class 0 1/2, class 1 1, class 2 (only predicted) 0; class 3 absent everywhere
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1) / 2)


def test_recall_headline_is_balanced_accuracy():
    """ISIC-2019's balanced multi-class accuracy, not recall_score's macro average."""
    assert HEADLINES == {"f1": "macro_f1", "recall": "balanced_accuracy"}


def test_multilabel_metrics_by_hand():
    y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    p = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    m = multilabel_metrics(y, p)
    # label 0: f1 1; label 1: f1 1; label 2: tp 0 fp 1 fn 1 -> 0
    assert m["macro_f1"] == pytest.approx(2 / 3)
    # per image: 2*1/(2+1), 2*1/(1+2), empty vs empty = 0 (scikit-learn's default)
    assert m["samples_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m["exact_match"] == pytest.approx(1 / 3)
    # label 0: recall 1, specificity 1; label 1: 1, 1; label 2: recall 0, specificity 1/2
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.25) / 3)


def test_multilabel_macro_averages_count_labels_absent_everywhere_as_zero():
    y = np.array([[1, 0, 0], [0, 1, 0]])
    m = multilabel_metrics(y, y)
    assert m["macro_f1"] == pytest.approx(2 / 3) and m["macro_recall"] == pytest.approx(2 / 3)
    assert m["per_class_f1"] == [1.0, 1.0, 0.0]


def test_evaluate_predictions_thresholds_logits():
    logits = np.array([[2.0, -1.0], [-0.5, 0.5]])
    assert evaluate_predictions(np.array([0, 1]), logits, multilabel=False)["accuracy"] == 1.0
    ml = evaluate_predictions(np.array([[1, 0], [0, 0]]), logits, multilabel=True)
    assert ml["exact_match"] == 0.5


def random_multiclass(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """Targets and predictions drawn from two random subsets of the classes, so
    some classes are only true, some only predicted and some absent everywhere."""
    c = int(rng.integers(2, 9))
    n = int(rng.integers(1, 40))
    true_classes = rng.choice(c, int(rng.integers(1, c + 1)), replace=False)
    pred_classes = rng.choice(c, int(rng.integers(1, c + 1)), replace=False)
    y_true, y_pred = rng.choice(true_classes, n), rng.choice(pred_classes, n)
    agree = rng.random(n) < 0.4  # enough hits that F1 and recall are not all 0
    y_pred[agree] = y_true[agree]
    return y_true, y_pred, c


def random_multilabel(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-label densities from 0 to 1: empty and full labels and empty images occur."""
    c, n = int(rng.integers(2, 7)), int(rng.integers(1, 30))  # one column is binary, not multi-label, to sklearn
    y_true = rng.random((n, c)) < rng.choice([0.0, 0.2, 0.5, 0.8, 1.0], c)
    flip = rng.random((n, c)) < rng.choice([0.0, 0.2, 0.5], c)
    y_pred = (y_true ^ flip) & (rng.random((n, c)) < rng.choice([0.0, 1.0, 1.0], c))
    return y_true.astype(int), y_pred.astype(int)


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn's notes on undefined ratios
def test_multiclass_metrics_match_scikit_learn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for case in CASES:
        y_true, y_pred, c = random_multiclass(rng)
        m = multiclass_metrics(y_true, y_pred, c)
        expected = {
            "macro_f1": skm.f1_score(y_true, y_pred, average="macro", zero_division=0),
            "macro_recall": skm.recall_score(y_true, y_pred, average="macro", zero_division=0),
            "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
            "accuracy": skm.accuracy_score(y_true, y_pred),
            "per_class_f1": skm.f1_score(y_true, y_pred, average=None, labels=range(c), zero_division=0),
            "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=range(c))}
        for key, value in expected.items():
            assert np.allclose(m[key], value), (case, key, y_true, y_pred)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_multilabel_metrics_match_scikit_learn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for case in CASES:
        y_true, y_pred = random_multilabel(rng)
        m = multilabel_metrics(y_true, y_pred)
        expected = {
            "macro_f1": skm.f1_score(y_true, y_pred, average="macro", zero_division=0),
            "macro_recall": skm.recall_score(y_true, y_pred, average="macro", zero_division=0),
            "samples_f1": skm.f1_score(y_true, y_pred, average="samples"),  # the default call
            "exact_match": skm.accuracy_score(y_true, y_pred),
            "per_class_f1": skm.f1_score(y_true, y_pred, average=None, zero_division=0),
            "balanced_accuracy": np.mean([skm.balanced_accuracy_score(y_true[:, j], y_pred[:, j])
                                          for j in range(y_true.shape[1])])}
        for key, value in expected.items():
            assert np.allclose(m[key], value), (case, key, y_true, y_pred)
