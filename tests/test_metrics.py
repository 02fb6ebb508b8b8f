import json
import time

import numpy as np
import pytest

from metrics import (HEADLINES, average_precision, bootstrap_ci, brier, ece, evaluate_predictions, fit_temperature,
                     multiclass_metrics, multilabel_metrics, paired_bootstrap, per_class_rates, roc_auc)

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


def random_scores(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    """(n, c) probability rows drawn from a few prototypes, so every column has
    tied scores, and rows still sum to 1 (multi-class scikit-learn checks it)."""
    prototypes = rng.dirichlet(np.ones(c), int(rng.integers(1, 6)))
    return prototypes[rng.integers(0, len(prototypes), n)]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_per_class_rates_match_scikit_learn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    for case in CASES:
        y_true, y_pred, c = random_multiclass(rng) if case % 2 else (*random_multilabel(rng), None)
        labels = range(c or y_true.shape[1])
        rates = per_class_rates(y_true, y_pred, c)
        cm = skm.multilabel_confusion_matrix(y_true, y_pred, labels=labels)
        tn, fp = cm[:, 0, 0], cm[:, 0, 1]
        expected = {
            "sensitivity": skm.recall_score(y_true, y_pred, average=None, labels=labels, zero_division=0),
            "specificity": np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), 0.0),
            "ppv": skm.precision_score(y_true, y_pred, average=None, labels=labels, zero_division=0)}
        for key, value in expected.items():
            assert np.allclose(rates[key], value), (case, key, y_true, y_pred)


def test_per_class_rates_by_hand():
    rates = per_class_rates(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3)
    # class 0: tp 1 fn 1, tn 2; class 1: tp 2 fp 1; class 2 absent everywhere: 0/0 -> 0, specificity 4/4
    assert rates == {"sensitivity": [0.5, 1.0, 0.0], "specificity": [1.0, 0.5, 1.0], "ppv": [1.0, 2 / 3, 0.0]}


def test_roc_auc_counts_a_tie_as_half_and_skips_undefined_classes():
    y = np.array([0, 0, 1, 1])
    scores = np.array([[0.9, 0.1, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.1, 0.9, 0.0]])
    auroc = roc_auc(y, scores)
    # class 1 pairs (positive, negative): 0.5>0.1, 0.9>0.1, 0.5=0.5 (1/2), 0.9>0.5 -> 3.5 / 4; class 2 has no positive
    assert auroc.per_class[:2] == pytest.approx([0.875, 0.875]) and np.isnan(auroc.per_class[2])
    assert auroc.macro == pytest.approx(0.875)
    assert np.isnan(roc_auc(np.zeros(3, dtype=int), scores[:3]).macro)  # a single class: nothing defined


def test_average_precision_by_hand():
    y = np.array([[1], [0], [1], [0]])
    # thresholds 0.9 (1 tp), 0.5 (tied block: +1 tp +1 fp), 0.1: recall steps 1/2, 1/2 at precisions 1, 2/3
    ap = average_precision(y, np.array([[0.9], [0.5], [0.5], [0.1]]))
    assert ap.per_class[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3) and ap.macro == ap.per_class[0]


def check_ranking_metric(skm_call, ours, y_true: np.ndarray, scores: np.ndarray, context) -> None:
    """ours against the binary scikit-learn call per class, NaN where a class lacks positives or negatives."""
    y = np.eye(scores.shape[1], dtype=int)[y_true] if y_true.ndim == 1 else y_true
    defined = [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
    expected = np.full(y.shape[1], np.nan)
    expected[defined] = [skm_call(y[:, k], scores[:, k]) for k in defined]
    assert np.allclose(ours.per_class, expected, equal_nan=True), (context, y_true, scores)
    assert np.isclose(ours.macro, np.mean(expected[defined]) if defined else np.nan, equal_nan=True), context
    if len(defined) > 1 and y_true.ndim == 2:  # scikit-learn's own multi-label call on the defined columns
        assert np.allclose(ours.per_class[defined], skm_call(y[:, defined], scores[:, defined], average=None))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["roc_auc_score", "average_precision_score"])
def test_ranking_metrics_match_scikit_learn(name):
    skm = pytest.importorskip("sklearn.metrics")
    ours = {"roc_auc_score": roc_auc, "average_precision_score": average_precision}[name]
    rng = np.random.default_rng(3)
    for case in CASES:
        if case % 2:  # class ids from a random subset: absent classes and single-class targets occur
            y_true, _, c = random_multiclass(rng)
            scores = random_scores(rng, len(y_true), c)
        else:
            y_true = random_multilabel(rng)[0]
            scores = np.round(rng.random(y_true.shape), int(rng.integers(1, 3)))  # ties
        check_ranking_metric(getattr(skm, name), ours(y_true, scores), y_true, scores, case)


def test_multiclass_macro_auroc_is_scikit_learns_one_vs_rest_macro():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(4)
    for case in range(30):
        c = int(rng.integers(3, 7))
        y_true = np.r_[np.arange(c), rng.integers(0, c, int(rng.integers(0, 40)))]  # every class present
        scores = random_scores(rng, len(y_true), c)
        expected = skm.roc_auc_score(y_true, scores, multi_class="ovr", labels=range(c))
        assert roc_auc(y_true, scores).macro == pytest.approx(expected), case


def test_brier_matches_scikit_learn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(5)
    for case in CASES:
        if case % 2:
            y_true, _, c = random_multiclass(rng)
            probs = rng.dirichlet(np.ones(c), len(y_true))
            expected = skm.brier_score_loss(y_true, probs, labels=range(c), scale_by_half=False)
        else:
            y_true = random_multilabel(rng)[0]
            probs = rng.random(y_true.shape)
            expected = np.mean([skm.brier_score_loss(y_true[:, k], probs[:, k], labels=[0, 1])
                                for k in range(y_true.shape[1])])
        assert brier(y_true, probs) == pytest.approx(expected), case


def test_ece_by_hand():
    probs = np.array([[0.95, 0.05, 0.0], [0.1, 0.85, 0.05], [0.62, 0.3, 0.08], [0.2, 0.68, 0.12], [0.3, 0.3, 0.4]])
    y = np.array([0, 0, 0, 0, 2])
    # bins of 0.1: (0.9, 1] 0.95 right; (0.8, 0.9] 0.85 wrong; (0.6, 0.7] 0.62 right and 0.68 wrong: accuracy 1/2,
    # confidence 0.65; (0.3, 0.4] 0.4 right
    expected = (0.05 + 0.85 + 2 * 0.15 + 0.6) / 5
    assert ece(y, probs, bins=10) == pytest.approx(expected)
    # multi-label: decisions at 0.5, confidence max(p, 1 - p): 0.9 right; 0.75 (p 0.25) wrong and 0.7 right share
    # (0.6, 0.8]: |1 - 1.45| over the bin; 0.55 wrong
    ml = ece(np.array([[1, 1], [1, 0]]), np.array([[0.9, 0.25], [0.7, 0.55]]), bins=5)
    assert ml == pytest.approx((0.1 + 0.45 + 0.55) / 4)
    # bins are (lo, hi], as in Guo et al.'s code: 0.75 (wrong) falls in (0.5, 0.75], apart from 0.875 (right)
    assert ece(np.array([1, 1]), np.array([[0.75, 0.25], [0.125, 0.875]]), bins=4) == pytest.approx((0.75 + 0.125) / 2)


def test_ece_is_small_for_calibrated_probabilities():
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.ones(4) * 0.5, 20000)
    y = (rng.random((20000, 1)) > probs.cumsum(1)).sum(1)  # labels drawn from the probabilities
    assert ece(y, probs) < 0.02
    assert ece(y, np.eye(4)[(y + 1) % 4]) == pytest.approx(1.0)  # confidently wrong everywhere


def synthetic_logits(rng: np.random.Generator, multilabel: bool, n: int = 20000, c: int = 5):
    """Clean logits and labels drawn from their softmax (or sigmoid): calibrated at T = 1."""
    clean = rng.normal(0, 2, (n, c))
    if multilabel:
        return clean, (rng.random((n, c)) < 1 / (1 + np.exp(-clean))).astype(float)
    probs = np.exp(clean - clean.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return clean, (rng.random((n, 1)) > probs.cumsum(1)).sum(1)


@pytest.mark.parametrize("multilabel", [False, True])
def test_fit_temperature_recovers_a_known_temperature(multilabel):
    rng = np.random.default_rng(7)
    clean, y = synthetic_logits(rng, multilabel)
    assert fit_temperature(clean, y, multilabel) == pytest.approx(1.0, abs=0.04)
    for t0 in (0.3, 2.5, 8.0):  # over-confident logits (t0 > 1) are cooled by T = t0
        assert fit_temperature(t0 * clean, y, multilabel) == pytest.approx(t0, rel=0.04), t0


def test_fit_temperature_stops_at_its_bound_for_uninformative_logits():
    rng = np.random.default_rng(8)
    assert fit_temperature(rng.normal(0, 1, (2000, 3)), rng.integers(0, 3, 2000), False) == pytest.approx(20.0)


def accuracy(y: np.ndarray, scores: np.ndarray) -> float:
    return float((y == scores).mean())


def test_bootstrap_interval_contains_the_estimate_and_narrows_as_one_over_root_n():
    rng = np.random.default_rng(9)
    widths = []
    for n_images in (1000, 4000):
        y = np.zeros(n_images, dtype=int)
        right = np.where(rng.random(n_images) < 0.7, 0, 1)
        ci = bootstrap_ci(accuracy, y, right, seed=1)
        assert ci.low < ci.estimate < ci.high and ci.n_used == 1000
        assert ci.estimate == accuracy(y, right)
        widths.append(ci.high - ci.low)
    assert widths[0] / widths[1] == pytest.approx(2.0, rel=0.2)


def test_bootstrap_is_reproducible_and_seeded():
    rng = np.random.default_rng(10)
    y, right = np.zeros(300, dtype=int), rng.integers(0, 2, 300)
    groups = rng.integers(0, 40, 300)
    assert bootstrap_ci(accuracy, y, right, seed=3) == bootstrap_ci(accuracy, y, right, seed=3)
    assert bootstrap_ci(accuracy, y, right, seed=3) != bootstrap_ci(accuracy, y, right, seed=4)
    assert bootstrap_ci(accuracy, y, right, groups, seed=3) == bootstrap_ci(accuracy, y, right, groups, seed=3)


def test_group_bootstrap_is_wider_when_images_of_a_group_are_copies():
    rng = np.random.default_rng(11)
    y = np.zeros(2000, dtype=int)
    right = np.repeat(rng.integers(0, 2, 200), 10)  # 200 patients, 10 identical images each
    groups = np.repeat(rng.permutation(200), 10)
    by_image, by_group = bootstrap_ci(accuracy, y, right), bootstrap_ci(accuracy, y, right, groups)
    assert by_group.estimate == by_image.estimate
    # 200 independent draws, not 2000: about sqrt(10) wider
    assert (by_group.high - by_group.low) / (by_image.high - by_image.low) == pytest.approx(np.sqrt(10), rel=0.25)


def test_group_resamples_keep_whole_groups():
    groups = np.array(["b", "a", "b", "c", "a", "b"])
    seen = []
    bootstrap_ci(lambda y, s: seen.append(y.copy()) or 0.0, groups, groups, groups, n=20)
    for resample in seen[:-1]:  # the last call is the whole-set estimate
        names, counts = np.unique(resample, return_counts=True)
        assert all(count % (groups == name).sum() == 0 for name, count in zip(names, counts))


def test_bootstrap_drops_resamples_where_the_metric_is_undefined():
    y = np.array([1] + [0] * 9)
    scores = np.linspace(1, 0, 10)[:, None]
    ci = bootstrap_ci(lambda y, s: roc_auc(y[:, None], s).macro, y, scores)
    # a resample misses the one positive with probability 0.9 ** 10 = 0.35
    assert 600 < ci.n_used < 700 and ci.low == ci.high == ci.estimate == 1.0


def test_paired_bootstrap():
    rng = np.random.default_rng(12)
    y = np.zeros(500, dtype=int)
    a, b = np.where(rng.random(500) < 0.8, 0, 1), np.where(rng.random(500) < 0.7, 0, 1)
    same = paired_bootstrap(accuracy, y, a, a)
    assert (same.estimate, same.low, same.high, same.frac_le_zero, same.n_used) == (0.0, 0.0, 0.0, 1.0, 1000)
    better = paired_bootstrap(accuracy, y, a, b, seed=5)
    assert better.estimate == pytest.approx(accuracy(y, a) - accuracy(y, b))
    assert 0 < better.low < better.estimate < better.high and better.frac_le_zero < 0.01
    assert paired_bootstrap(accuracy, y, b, a, seed=5).frac_le_zero > 0.99
    assert paired_bootstrap(accuracy, y, a, b, seed=5) == better


def test_bootstrap_of_5000_images_is_fast():
    rng = np.random.default_rng(13)
    y, right = np.zeros(5000, dtype=int), rng.integers(0, 2, 5000)
    for groups in (None, rng.integers(0, 1000, 5000)):
        start = time.perf_counter()
        bootstrap_ci(accuracy, y, right, groups)
        assert time.perf_counter() - start < 2.0  # about 0.1 s; a loop over images would take tens of seconds


@pytest.mark.parametrize("multilabel", [False, True])
def test_evaluate_predictions_adds_threshold_free_and_calibration_metrics(multilabel):
    rng = np.random.default_rng(14)
    logits = rng.normal(0, 3, (60, 4))
    targets = (rng.random((60, 4)) < 0.4).astype(int) if multilabel else rng.integers(0, 3, 60)  # class 3 absent
    if multilabel:
        targets[:, 3] = 1  # a label present everywhere: no AUROC
    m = evaluate_predictions(targets, logits, multilabel)
    thresholded = multilabel_metrics(targets, logits > 0) if multilabel else multiclass_metrics(
        targets, logits.argmax(1), 4)
    assert {k: m[k] for k in thresholded} == thresholded  # every earlier key and value unchanged
    probs = 1 / (1 + np.exp(-logits)) if multilabel else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    auroc, ap = roc_auc(targets, probs), average_precision(targets, probs)
    assert m["auroc_per_class"][3] is None and m["ap_per_class"][3] is None
    assert np.allclose(m["auroc_per_class"][:3], auroc.per_class[:3]) and m["auroc_macro"] == pytest.approx(auroc.macro)
    assert np.allclose(m["ap_per_class"][:3], ap.per_class[:3]) and m["ap_macro"] == pytest.approx(ap.macro)
    assert m["brier"] == pytest.approx(brier(targets, probs)) and m["ece"] == pytest.approx(ece(targets, probs))
    preds = logits > 0 if multilabel else logits.argmax(1)
    assert {k: m[k] for k in ("sensitivity", "specificity", "ppv")} == per_class_rates(targets, preds, 4)
    json.dumps(m, allow_nan=False)  # undefined values are None, not NaN


def test_evaluate_predictions_on_a_single_class_reports_none():
    m = evaluate_predictions(np.zeros(5, dtype=int), np.random.default_rng(0).normal(size=(5, 3)), False)
    assert m["auroc_macro"] is None and m["ap_macro"] is None and m["auroc_per_class"] == [None] * 3
