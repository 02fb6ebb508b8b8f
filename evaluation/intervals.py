"""Intervals around a metric, ours (scikit-learn and SciPy offer none of them): percentile bootstrap
intervals over test images or whole groups (patients, lesions), a metric scored on every resample at once
(`Weighted`), the interval of a mean over seeds that adds the seeds' spread to the test images' luck, alone or
paired seed by seed (`SeedInterval`), the seeds a margin needs, and Holm's adjustment. metrics.py defines the
metrics; imports nothing of this project.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t


@dataclass(frozen=True)
class Interval:
    """A metric on the whole test set and its percentile bootstrap interval over the n_used resamples on
    which it was defined; n_dropped resamples were not (e.g. a class without positives)."""
    estimate: float
    low: float
    high: float
    n_used: int
    n_dropped: int


def resample_indices(n_images: int, groups: np.ndarray | None, n: int, seed: int) -> Iterator[np.ndarray]:
    """n index arrays: N images drawn with replacement, or, with groups (N,), as many groups as there are
    drawn with replacement, all their images kept (images of one patient or lesion are not independent)."""
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


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float, int, int]:
    used = values[~np.isnan(values)]
    if len(used) == 0:
        return np.nan, np.nan, 0, len(values)
    low, high = np.percentile(used, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high), len(used), len(values) - len(used)


class Weighted:
    """A metric that scores every bootstrap resample at once: over(targets, scores, weights) -> (R,), weights
    (R, N) the number of times each of the N images was drawn into each of R resamples (so a resample is a
    matrix product, not a Python call per resample). Called as metric(targets, scores) it scores the whole set."""

    def __init__(self, over: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]):
        self.over = over

    def __call__(self, targets: np.ndarray, scores: np.ndarray) -> float:
        return float(self.over(targets, scores, np.ones((1, len(targets))))[0])


def resample_weights(n_images: int, groups: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """(n, N) how many times each image is drawn into each of the n resamples of `resample_indices`."""
    return np.stack([np.bincount(i, minlength=n_images) for i in resample_indices(n_images, groups, n, seed)]
                    ).astype(float)


def bootstrap_values(metric: Callable[[np.ndarray, np.ndarray], float], targets: np.ndarray, scores: np.ndarray,
                     groups: np.ndarray | None = None, n: int = 1000, seed: int = 0) -> np.ndarray:
    """(n,) metric(targets[i], scores[i]) over n resamples i of the test images (or groups, see
    `resample_indices`), both indexed by image on axis 0; NaN where the metric is undefined. A Weighted metric
    scores them all at once."""
    if isinstance(metric, Weighted):
        return np.asarray(metric.over(targets, scores, resample_weights(len(targets), groups, n, seed)), dtype=float)
    return np.array([metric(targets[i], scores[i]) for i in resample_indices(len(targets), groups, n, seed)],
                    dtype=float)


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], targets: np.ndarray, scores: np.ndarray,
                 groups: np.ndarray | None = None, n: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of metric(targets, scores) over test images (or groups): `bootstrap_values`,
    resamples where the metric is NaN dropped and counted."""
    values = bootstrap_values(metric, targets, scores, groups, n, seed)
    return Interval(float(metric(targets, scores)), *_percentiles(values, level))


@dataclass(frozen=True)
class SeedInterval:
    """A mean over S seeds (of a metric, or of matched seeds' paired differences) and its interval over both
    kinds of luck a reader generalises over: the test images and the training run (a seed's labelled images,
    initialisation, augmentation and order). se = sqrt(v + s2 / S), v the bootstrap variance of the mean over
    test images (or groups), s2 the seeds' sample variance; the interval mean +- t(S - 1) * se and `p` the
    two-sided p-value of a mean of 0 on the same t. With one seed the training run's luck cannot be measured:
    the interval is the percentile bootstrap over test images only and se, p are NaN (`seeds` says which)."""
    estimate: float
    low: float
    high: float
    se: float
    p: float
    seeds: int
    per_seed: tuple[float, ...]


def over_seeds_and_images(per_seed: np.ndarray, image_values: np.ndarray, level: float = 0.95) -> SeedInterval:
    """SeedInterval of the S values `per_seed` given `image_values`, the bootstrap values of their mean over test
    images (`bootstrap_values`, NaN for undefined resamples, dropped). A simulation in tests/test_metrics.py
    checks the coverage: equal methods, seeds spread 0.05, the paired interval covers 0 in >= 90 % of studies."""
    per_seed = np.asarray(per_seed, dtype=float)
    mean, used = float(per_seed.mean()), image_values[~np.isnan(image_values)]
    if len(per_seed) == 1:
        low, high = _percentiles(image_values, level)[:2]
        return SeedInterval(mean, low, high, np.nan, np.nan, 1, tuple(per_seed.tolist()))
    se = float(np.sqrt((used.var(ddof=1) if len(used) > 1 else 0.0) + per_seed.var(ddof=1) / len(per_seed)))
    q = float(student_t.ppf(0.5 + level / 2, len(per_seed) - 1))
    p = float(2 * student_t.sf(abs(mean) / se, len(per_seed) - 1)) if se > 0 else float(mean == 0)
    return SeedInterval(mean, mean - q * se, mean + q * se, se, p, len(per_seed), tuple(per_seed.tolist()))


def seed_mean_interval(metric: Callable[[np.ndarray, np.ndarray], float], targets: np.ndarray,
                       decisions: np.ndarray, groups: np.ndarray | None = None, n: int = 1000, seed: int = 0,
                       level: float = 0.95) -> SeedInterval:
    """The mean over seeds of metric(targets, decisions[:, s]) ((N, S, ...) decisions, one column per seed, all
    on the same test images) and its SeedInterval: each bootstrap resample scores every seed on the same images."""
    seeds = range(decisions.shape[1])
    per_seed = np.array([metric(targets, decisions[:, s]) for s in seeds])
    mean = Weighted(lambda y, d, w: np.mean([metric.over(y, d[:, s], w) for s in seeds], axis=0)) \
        if isinstance(metric, Weighted) else lambda y, d: np.mean([metric(y, d[:, s]) for s in seeds])
    return over_seeds_and_images(per_seed, bootstrap_values(mean, targets, decisions, groups, n, seed), level)


def paired_seed_interval(metric: Callable[[np.ndarray, np.ndarray], float], targets: np.ndarray,
                         a: np.ndarray, b: np.ndarray, groups: np.ndarray | None = None, n: int = 1000,
                         seed: int = 0, level: float = 0.95) -> SeedInterval:
    """The mean over matched seeds of metric(a's seed s) - metric(b's seed s) ((N, S, ...) decisions of the
    same S seeds, in the same order, on the same test images) and its SeedInterval: each resample scores both
    on the same images, so the shared test set's luck cancels, and the seeds' spread of differences counts."""
    difference = Weighted(lambda y, d, w: metric.over(y, d[:, 0], w) - metric.over(y, d[:, 1], w)) \
        if isinstance(metric, Weighted) else lambda y, d: metric(y, d[:, 0]) - metric(y, d[:, 1])
    return seed_mean_interval(difference, targets, np.stack([a, b], 2), groups, n, seed, level)


def seeds_needed(found: SeedInterval, margin: float, level: float = 0.95) -> int | None:
    """The fewest seeds whose SeedInterval would reach no further than `margin` from its mean, were the test
    images' variance and the seeds' spread those `found` measured; None when no number would (the test images'
    luck alone is wider: more test images are needed) or `found` has one seed (no spread known)."""
    if found.seeds < 2:
        return None
    seed_var = float(np.var(found.per_seed, ddof=1))
    image_var = max(found.se ** 2 - seed_var / found.seeds, 0.0)
    if norm.ppf(0.5 + level / 2) * np.sqrt(image_var) >= margin:  # the limit of many seeds
        return None
    n = 2
    while student_t.ppf(0.5 + level / 2, n - 1) * np.sqrt(image_var + seed_var / n) > margin:
        n += 1
    return n


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN kept, left out of the family): the k-th smallest
    of m times (m - k + 1), never below the one before, capped at 1."""
    p = np.asarray(p, dtype=float)
    known = np.flatnonzero(~np.isnan(p))
    order = known[np.argsort(p[known], kind="stable")]
    adjusted, running = p.copy(), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()
