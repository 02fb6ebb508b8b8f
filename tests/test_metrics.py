import json

import numpy as np
import pytest
from scipy.stats import t as student_t

from evaluation.intervals import (SeedInterval, bootstrap_ci, bootstrap_values, holm, paired_seed_interval,
                                  resample_indices, seeds_needed)
from evaluation.metrics import (average_precision, brier, classification_metrics, ece, evaluate, fit_temperature,
                                headline_metric, headline_score, macro_auroc_of, probabilities, roc_auc,
                                thresholded_metrics)


def test_multiclass_metrics_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 1])
    m = thresholded_metrics(y_true, y_pred, multilabel=False, num_classes=4)
    # class 0: tp 2 fn 1 -> f1 0.8; class 1: tp 2 fp 2 -> f1 2/3; class 2: tp 0 -> 0; class 3 absent everywhere
    assert m["per_class_f1"] == pytest.approx([0.8, 2 / 3, 0.0, 0.0])
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 3)  # over the classes in targets or predictions
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["confusion_matrix"][:2] == [[2, 1, 0, 0], [0, 2, 0, 0]]
    # one vs rest; class 3 absent: 0/0 -> 0 for its rates, 6/6 for its specificity
    assert m["sensitivity"] == pytest.approx([2 / 3, 1, 0, 0]) and m["ppv"] == pytest.approx([1, 0.5, 0, 0])
    assert m["specificity"] == pytest.approx([1, 2 / 4, 1, 1])


def test_a_class_only_predicted_lowers_macro_recall_but_not_balanced_accuracy():
    m = thresholded_metrics(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]), False, 4)
    # recalls: class 0 1/2, class 1 1, class 2 (only predicted) 0; class 3 absent everywhere
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1) / 2)
    assert headline_score("balanced_accuracy", np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]), False) == 0.75


def test_multilabel_metrics_by_hand():
    y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    p = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    m = thresholded_metrics(y, p, multilabel=True, num_classes=3)
    # label 0: f1 1; label 1: f1 1; label 2: tp 0 fp 1 fn 1 -> 0
    assert m["macro_f1"] == pytest.approx(2 / 3) and m["per_class_f1"] == [1.0, 1.0, 0.0]
    # per image: 2*1/(2+1), 2*1/(1+2), empty vs empty = 0
    assert m["samples_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m["exact_match"] == pytest.approx(1 / 3)
    # label 0: recall 1, specificity 1; label 1: 1, 1; label 2: recall 0, specificity 1/2
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.25) / 3)
    assert m["specificity"] == pytest.approx([1, 1, 0.5])


def test_multilabel_macro_averages_count_labels_absent_everywhere_as_zero():
    y = np.array([[1, 0, 0], [0, 1, 0]])
    m = thresholded_metrics(y, y, True, 3)
    assert m["macro_f1"] == pytest.approx(2 / 3) and m["macro_recall"] == pytest.approx(2 / 3)


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
    assert np.isnan(average_precision(np.ones((3, 1)), np.ones((3, 1))).macro)  # no negative: undefined


def test_brier_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    # image 0 (class 0): 0.09 + 0.04 + 0.01; image 1 (class 1): 0.01 + 0.81 + 0.64; Brier's sum over classes
    assert brier(np.array([0, 1]), probs) == pytest.approx((0.14 + 1.46) / 2)
    # multi-label: the mean over labels of each label's binary score
    assert brier(np.array([[1, 0], [0, 0]]), np.array([[0.9, 0.4], [0.2, 0.0]])) == pytest.approx(
        ((0.01 + 0.04) / 2 + (0.16 + 0) / 2) / 2)


def test_ece_by_hand():
    probs = np.array([[0.95, 0.05, 0.0], [0.1, 0.85, 0.05], [0.62, 0.3, 0.08], [0.2, 0.68, 0.12], [0.3, 0.3, 0.4]])
    y = np.array([0, 0, 0, 0, 2])
    # bins of 0.1: (0.9, 1] 0.95 right; (0.8, 0.9] 0.85 wrong; (0.6, 0.7] 0.62 right and 0.68 wrong: accuracy 1/2,
    # confidence 0.65; (0.3, 0.4] 0.4 right
    assert ece(y, probs, bins=10) == pytest.approx((0.05 + 0.85 + 2 * 0.15 + 0.6) / 5)
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
    probs = probabilities(clean, multilabel)
    if multilabel:
        return clean, (rng.random((n, c)) < probs).astype(float)
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
    logits, targets = rng.normal(0, 1, (2000, 3)), rng.integers(0, 3, 2000)
    assert fit_temperature(logits, targets, False) == pytest.approx(20.0, rel=1e-4)


def accuracy(y: np.ndarray, scores: np.ndarray) -> float:
    return float((y == scores).mean())


def test_bootstrap_interval_contains_the_estimate_and_narrows_as_one_over_root_n():
    rng = np.random.default_rng(9)
    widths = []
    for n_images in (1000, 4000):
        y = np.zeros(n_images, dtype=int)
        right = np.where(rng.random(n_images) < 0.7, 0, 1)
        ci = bootstrap_ci(accuracy, y, right, seed=1)
        assert ci.low < ci.estimate < ci.high and (ci.n_used, ci.n_dropped) == (1000, 0)
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
    for resample in seen[1:]:  # the first call is the whole-set estimate
        names, counts = np.unique(resample, return_counts=True)
        assert all(count % (groups == name).sum() == 0 for name, count in zip(names, counts))


def test_bootstrap_drops_and_counts_resamples_where_the_metric_is_undefined():
    y = np.array([1] + [0] * 9)
    scores = np.linspace(1, 0, 10)[:, None]
    ci = bootstrap_ci(lambda y, s: roc_auc(y[:, None], s).macro, y, scores)
    # a resample misses the one positive with probability 0.9 ** 10 = 0.35
    assert 600 < ci.n_used < 700 and ci.n_used + ci.n_dropped == 1000 and ci.low == ci.high == ci.estimate == 1.0


def rare_class_case() -> tuple[np.ndarray, np.ndarray]:
    """120 images of 3 classes; class 2 has 2 positives, one ranked above and one below most negatives."""
    rng = np.random.default_rng(15)
    y = np.r_[np.zeros(59, int), np.ones(59, int), [2, 2]]
    scores = np.eye(3)[y] * 2.5 + rng.normal(0, 1, (120, 3))
    scores[-2:, 2] = [3.0, -1.0]
    return y, probabilities(scores, multilabel=False)


def test_macro_auroc_interval_keeps_only_resamples_with_every_class():
    y, probs = rare_class_case()
    metric = macro_auroc_of(~np.isnan(roc_auc(y, probs).per_class))
    ci = bootstrap_ci(metric, y, probs, n=500)
    # both positives missed with probability (118/120) ** 120 = 13.3 %: about 67 of 500
    assert 40 < ci.n_dropped < 95 and ci.n_used + ci.n_dropped == 500
    assert ci.estimate == pytest.approx(roc_auc(y, probs).macro)
    # averaging over whichever classes a resample has mixes in two-class means (the easy classes only): higher
    mixed = bootstrap_ci(lambda t, s: roc_auc(t, s).macro, y, probs, n=500)
    assert mixed.n_dropped == 0 and mixed.high > ci.high


def test_a_paired_seed_interval_matches_seeds_and_adds_their_spread():
    rng = np.random.default_rng(12)
    y = np.zeros(500, dtype=int)
    a = np.stack([np.where(rng.random(500) < q, 0, 1) for q in (0.80, 0.85, 0.75)], 1)  # (N, S): 0 is right
    b = np.stack([np.where(rng.random(500) < q, 0, 1) for q in (0.70, 0.72, 0.71)], 1)
    same = paired_seed_interval(accuracy, y, a, a)
    assert (same.estimate, same.low, same.high, same.se, same.p, same.seeds) == (0.0, 0.0, 0.0, 0.0, 1.0, 3)
    found = paired_seed_interval(accuracy, y, a, b, n=300, seed=5)
    per_seed = [accuracy(y, a[:, s]) - accuracy(y, b[:, s]) for s in range(3)]
    assert found.per_seed == pytest.approx(per_seed) and found.estimate == pytest.approx(np.mean(per_seed))
    values = bootstrap_values(lambda t, d: np.mean([accuracy(t, d[:, s, 0]) - accuracy(t, d[:, s, 1])
                                                    for s in range(3)]), y, np.stack([a, b], 2), n=300, seed=5)
    se = np.sqrt(values.var(ddof=1) + np.var(per_seed, ddof=1) / 3)
    assert found.se == pytest.approx(se) and found.high - found.estimate == pytest.approx(4.302653 * se)
    image_only = np.percentile(values, [2.5, 97.5])
    assert found.low < image_only[0] and found.high > image_only[1]  # the seeds widen it
    assert 0 < found.p < 0.05 and paired_seed_interval(accuracy, y, b, a, n=300, seed=5).p == pytest.approx(found.p)
    one = paired_seed_interval(accuracy, y, a[:, :1], b[:, :1], n=300, seed=5)  # one seed: test images only
    assert one.seeds == 1 and np.isnan(one.p) and one.low < one.estimate < one.high


def test_seeds_needed_for_a_margin_from_a_measured_spread():
    per_seed, image_var = (0.1, 0.0, -0.1), 1e-4  # seeds' sample variance 0.01
    found = SeedInterval(0.0, -0.1, 0.1, float(np.sqrt(image_var + 0.01 / 3)), 1.0, 3, per_seed)
    n = seeds_needed(found, 0.05)

    def half_width(seeds: int) -> float:
        return student_t.ppf(0.975, seeds - 1) * np.sqrt(image_var + 0.01 / seeds)
    assert half_width(n) <= 0.05 < half_width(n - 1) and 10 < n < 30
    assert seeds_needed(found, 0.005) is None  # the test images' own luck alone exceeds it
    assert seeds_needed(SeedInterval(0.1, 0.0, 0.2, np.nan, np.nan, 1, (0.1,)), 0.05) is None


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("headline", ["macro_f1", "balanced_accuracy"])
@pytest.mark.parametrize("grouped", [False, True])
def test_every_resample_of_a_headline_at_once_equals_scikit_learn_on_that_resample(multilabel, headline, grouped):
    rng = np.random.default_rng(21)
    if multilabel:  # label 4 never true, label 3 never predicted
        y, d = rng.random((300, 5)) < 0.2, rng.random((300, 5)) < 0.25
        y[:, 4], d[:, 3] = False, False
    else:  # class 5 never true, class 6 only predicted; class 4 rare enough to leave some resamples
        y = np.where(rng.random(300) < 0.02, 4, rng.integers(0, 4, 300))
        d = np.where(rng.random(300) < 0.6, y, rng.integers(0, 7, 300))
    groups = np.repeat(np.arange(60), 5) if grouped else None
    metric = headline_metric(headline, multilabel)
    at_once = bootstrap_values(metric, y, d, groups, n=200, seed=3)
    one_by_one = [headline_score(headline, y[i], d[i], multilabel) for i in resample_indices(300, groups, 200, 3)]
    assert np.allclose(at_once, one_by_one, rtol=0, atol=1e-12) and metric(y, d) == headline_score(headline, y, d,
                                                                                                     multilabel)


@pytest.mark.parametrize("multilabel", [False, True])
def test_every_resample_of_macro_auroc_at_once_equals_scikit_learn_on_that_resample(multilabel):
    rng = np.random.default_rng(22)
    if multilabel:  # rounded scores: many ties
        y = rng.random((300, 4)) < 0.1
        scores = np.round(rng.random((300, 4)) + y * 0.3, 1)
    else:  # class 3 has 3 images: some resamples lose it and are dropped
        y = rng.integers(0, 3, 300)
        y[:3] = 3
        scores = rng.dirichlet(np.ones(4), 300) + np.eye(4)[y] * 0.2
    defined = ~np.isnan(roc_auc(y, scores).per_class)
    for groups in (None, np.repeat(np.arange(60), 5)):
        at_once = bootstrap_values(macro_auroc_of(defined), y, scores, groups, n=100, seed=3)
        one_by_one = []
        for i in resample_indices(300, groups, 100, 3):
            found = roc_auc(y[i], scores[i])
            one_by_one.append(np.nan if np.isnan(found.per_class[defined]).any() else found.macro)
        assert np.allclose(at_once, one_by_one, rtol=0, atol=1e-12, equal_nan=True)
        assert np.isnan(one_by_one).any() != multilabel  # the rare class is lost now and then


def test_holm_adjusts_a_family_step_down_and_leaves_unknown_p_out():
    assert holm([0.01, 0.04, 0.03, np.nan]) == pytest.approx([0.03, 0.06, 0.06, np.nan], nan_ok=True)
    assert holm([0.5, 0.8]) == [1.0, 1.0] and holm([]) == []


def simulated_study(rng: np.random.Generator, images: int, seeds: int, spread: float) -> tuple[np.ndarray, ...]:
    """Two methods of equal expected accuracy (0.8) on a fresh test set: each seed's accuracy drawn with std
    `spread` (the training run's luck), each image's difficulty shared by every model (the test set's)."""
    difficulty = rng.random(images)

    def method() -> np.ndarray:
        accuracy = 0.8 + rng.normal(0, spread, seeds)
        right = 0.5 * difficulty[:, None] + 0.5 * rng.random((images, seeds)) < 0.5 * accuracy[None, :] + 0.25
        return np.where(right, 0, 1)
    return np.zeros(images, dtype=int), method(), method()


@pytest.mark.parametrize("images, seeds", [(120, 3), (200, 5)])
def test_the_paired_interval_covers_no_difference_between_equal_methods(images, seeds):
    # 200 simulated studies: the interval over images and seeds covers the true difference, 0, in >= 90 % of
    # them; the old interval over test images alone (their percentiles) covered it far less often
    rng, covered, images_only = np.random.default_rng(0), 0, 0
    for study in range(200):
        y, a, b = simulated_study(rng, images, seeds, spread=0.05)
        found = paired_seed_interval(accuracy, y, a, b, n=100, seed=study)
        covered += found.low <= 0 <= found.high
        values = bootstrap_values(lambda t, d: np.mean([accuracy(t, d[:, s, 0]) - accuracy(t, d[:, s, 1])
                                                        for s in range(seeds)]), y, np.stack([a, b], 2), n=100,
                                  seed=study)
        low, high = np.percentile(values, [2.5, 97.5])
        images_only += low <= 0 <= high
    assert covered / 200 >= 0.90 and images_only / 200 < 0.8


@pytest.mark.parametrize("multilabel", [False, True])
def test_classification_metrics_are_json_with_undefined_values_as_none(multilabel):
    rng = np.random.default_rng(14)
    logits = rng.normal(0, 3, (60, 4))
    targets = (rng.random((60, 4)) < 0.4).astype(int) if multilabel else rng.integers(0, 3, 60)  # class 3 absent
    if multilabel:
        targets[:, 3] = 1  # a label present everywhere: no AUROC
    probs = probabilities(logits, multilabel)
    m = classification_metrics(targets, probs, multilabel)
    assert m["auroc_per_class"][3] is None and m["ap_per_class"][3] is None
    assert m["auroc_macro"] == pytest.approx(np.mean(m["auroc_per_class"][:3]))
    decided = logits > 0 if multilabel else logits.argmax(1)
    assert m["macro_f1"] == headline_score("macro_f1", targets, decided, multilabel)
    json.dumps(m, allow_nan=False)


def test_evaluate_is_every_number_of_a_seed():
    rng = np.random.default_rng(16)
    y = (rng.random((200, 3)) < 0.3).astype(float)
    logits = 4 * (y - 0.5) + rng.normal(0, 2, (200, 3)) + 1.5  # biased up: thresholds above 0.5 pay
    val, test = slice(0, 100), slice(100, 200)
    found = evaluate(logits[val], y[val], logits[test], y[test], True, "macro_f1", val_thresholds=True,
                     resamples=200, groups=np.arange(100) // 4)
    assert (found["thresholds"] > 0.5).all()
    probs = probabilities(logits[test], True)
    assert found["test"] == classification_metrics(y[test], probs, True, found["thresholds"])
    ci = found["test_ci95"]["macro_f1"]
    assert ci["estimate"] == found["test"]["macro_f1"] and ci["n_used"] + ci["n_dropped"] == 200
    assert ci["low"] < ci["estimate"] < ci["high"]
    t = found["calibration"]["temperature"]
    assert t == fit_temperature(logits[val], y[val], True)
    assert found["calibration"]["brier"] == pytest.approx(brier(y[test], probabilities(logits[test] / t, True)))
    fixed = evaluate(logits[val], y[val], logits[test], y[test], True, "macro_f1", resamples=10)
    assert (fixed["thresholds"] == 0.5).all() and fixed["test"]["macro_f1"] != found["test"]["macro_f1"]
