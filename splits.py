"""How the images of a data set are divided: seeded stratified 70/10/20 splits and label fractions
that keep each group (patient, lesion) whole, and, on request, each given set of images (the
duplicates of fingerprints.py) in one split. Copy it with data.py, whose DataIndex it divides.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from data import SPLIT_RATIOS, DataIndex
from errors import UserError


def connect(labels: list, pairs: Iterable[tuple]) -> list:
    """Each label's representative once the two sides of every pair are joined (union-find)."""
    parent = {x: x for x in labels}

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b in pairs:
        parent[root(a)] = root(b)
    return [root(x) for x in labels]


def _strata(index: DataIndex) -> np.ndarray:
    """Stratification key per image: the class, or for multi-label data the
    rarest label it holds (len(classes) when it holds none)."""
    if not index.labelled:
        return np.zeros(len(index.paths), dtype=np.int64)
    if not index.multilabel:
        return index.targets
    counts = index.targets.sum(0)
    rarity = np.where(index.targets > 0, counts[None, :], np.inf)
    return np.where(index.targets.any(1), rarity.argmin(1), len(index.classes))


def _units(index: DataIndex, ids: np.ndarray, join: list[list[int]] = ()) -> tuple[list[list[int]], np.ndarray]:
    """`ids` as units split whole (groups; else each image; the units of each set of positions in `join`
    made one) with their images' most common stratum."""
    names = index.groups or index.paths  # paths: each image alone
    if join:
        names = connect(list(names), [(names[s[0]], names[i]) for s in join for i in s[1:]])
    keys, members = _strata(index), {}
    for i in ids:
        members.setdefault(names[i], []).append(int(i))
    units = list(members.values())
    return units, np.array([np.bincount(keys[u]).argmax() for u in units], dtype=np.int64)


def make_splits(index: DataIndex, seed: int, together: bool = False, *,
                join: Sequence[Sequence[int]] = ()) -> dict:
    """Seeded, stratified 70/10/20 train/val/test as relative paths. A curator's split is kept and
    only its missing parts are carved out of train, per stratum (round(f * n) units each, at least
    one left in train; see `_units`); unlabelled data is all train. Groups add {"groups": {path: group}}.
    `join`: each set of positions (fingerprints.duplicate_sets) becomes one unit with the groups of its
    images. `together=True` is finetune.py's older spelling of join=duplicate_sets(index), kept until
    it passes the sets."""
    if not index.labelled:
        return {"train": index.paths[:], "val": [], "test": []}
    given = index.given_split or {}
    pool = np.array(given.get("train", range(len(index.paths))), dtype=np.int64)
    missing = [name for name in ("val", "test") if name not in given]
    share = SPLIT_RATIOS["train"] + sum(SPLIT_RATIOS[m] for m in missing)
    if together:
        from fingerprints import duplicate_sets
        join = duplicate_sets(index)
    rng, (units, keys) = np.random.default_rng(seed), _units(index, pool, join)
    parts = {"train": [], **{name: idx for name, idx in given.items() if name != "train"}}
    parts.update({m: [] for m in missing})
    for key in np.unique(keys):
        group, start = rng.permutation(np.flatnonzero(keys == key)), 0
        for name in missing:
            n = max(0, min(int(round(SPLIT_RATIOS[name] / share * len(group))), len(group) - start - 1))
            parts[name] += [i for u in group[start:start + n] for i in units[u]]
            start += n
        parts["train"] += [i for u in group[start:] for i in units[u]]
    out = {name: [index.paths[i] for i in sorted(parts[name])] for name in SPLIT_RATIOS}
    return out | ({"groups": dict(zip(index.paths, index.groups))} if index.groups else {})


def select(index: DataIndex, splits: dict, apart: bool = False) -> dict[str, list[int]]:
    """Relative paths of a split back to positions in `index`; with `apart`, a
    group of `index` that has images in test and in train or val is an error."""
    position = {p: i for i, p in enumerate(index.paths)}
    skipped = {s["path"] for s in index.skipped}
    out = {}
    for name in SPLIT_RATIOS:
        unknown = [p for p in splits.get(name, []) if p not in position and p not in skipped]
        if unknown:
            raise UserError(f"the {name} split names {len(unknown)} images that are not in the data "
                            f"({unknown[0]!r}); is --data the data set this run was split on?")
        out[name] = [position[p] for p in splits.get(name, []) if p in position]
    for name in ("train", "val") if apart and index.groups else ():
        if shared := sorted({index.groups[i] for i in out["test"]} & {index.groups[i] for i in out[name]}):
            raise UserError(f"group {shared[0]!r} has images in both the {name} and the test split "
                            f"({len(shared)} such groups); split the data again with its groups")
    return out


def label_fraction(index: DataIndex, train: list[int], frac: float, seed: int) -> list[int]:
    """A seeded stratified subset of about `frac` of `train`'s units (`_units`), at least
    one per class (multi-label: one with a positive for each label present in train)."""
    if frac >= 1.0:
        return sorted(train)
    rng = np.random.default_rng(seed)
    train = np.asarray(train, dtype=np.int64)
    units, keys = _units(index, train)
    chosen = set()
    for key in np.unique(keys):
        group = np.flatnonzero(keys == key)
        chosen.update(i for u in rng.choice(group, max(1, int(round(frac * len(group)))), replace=False)
                      for i in units[u])
    if index.multilabel:
        unit_of = {i: u for u, members in enumerate(units) for i in members}
        for c in range(len(index.classes)):
            positives = train[index.targets[train, c] > 0]
            if len(positives) and not index.targets[sorted(chosen), c].any():
                chosen.update(units[unit_of[int(rng.choice(positives))]])
    return sorted(chosen)


def mark_duplicates(index: DataIndex, splits: dict) -> dict:
    """finetune.py's older name of fingerprints.list_duplicates, kept until it imports that."""
    from fingerprints import list_duplicates
    return list_duplicates(index, splits)
