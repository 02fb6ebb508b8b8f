"""How the images of a data set are divided: seeded stratified 70/10/20 splits and label fractions,
counted in images, that keep each group (patient, lesion) whole, and, on request, each given set of
images (the duplicates of fingerprints.py) in one split. Copy it with data.py, whose DataIndex it divides.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from data import SPLIT_RATIOS, DataIndex
from errors import UserError

# A split or label fraction whose images are further than this share of its aim from it is noted: whole
# groups miss by a few images as a rule, and by this much the 70/10/20 (or --frac) no longer describes it.
OFF = 0.25


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


def count(index: DataIndex, ids: Sequence[int]) -> dict[str, int]:
    """{"images": n, "groups": g} of the images at positions `ids` (no groups: each image is one)."""
    names = index.groups or index.paths
    return {"images": len(ids), "groups": len({names[i] for i in ids})}


def _take(order: Sequence[int], sizes: np.ndarray, target: int, spare: int = 0) -> list[int]:
    """The units of `order` (positions in `sizes`, their image counts) whose images come nearest
    `target`, at least `spare` of them left: in order, each that fits in what is still missing; then,
    if that falls short, the smallest unit left when it overshoots by less than the shortfall. With
    one image per unit: the first min(target, len(order) - spare), as a count of units takes."""
    taken, need = [], target
    for u in order:
        if sizes[u] <= need and len(order) - len(taken) > spare:
            taken.append(u)
            need -= int(sizes[u])
    chosen = set(taken)
    rest = [u for u in order if u not in chosen] if need > 0 else []
    if len(rest) > spare and sizes[nearest := min(rest, key=sizes.__getitem__)] < 2 * need:
        taken.append(nearest)
    return taken


def _share(got: int, aim: int, total: int) -> str:
    return f"{got} of {total} images ({got / total:.0%}, aimed at {aim / total:.0%})"


def make_splits(index: DataIndex, seed: int, *, join: Sequence[Sequence[int]] = ()) -> dict:
    """Seeded, stratified 70/10/20 train/val/test as relative paths. A curator's split is kept and
    only its missing parts are carved out of train, per stratum: units (see `_units`) in a seeded
    order, as near round(f * images) images each as whole units allow (`_take`), at least one unit
    left in train; unlabelled data is all train. Groups add {"groups": {path: group}}. Where a unit
    holds several images, {"sizes": {split: count(...)}} records what each split got, and a split far
    from its ratio is noted in one line. `join`: each set of positions (fingerprints.duplicate_sets)
    becomes one unit with the groups of its images."""
    if not index.labelled:
        return {"train": index.paths[:], "val": [], "test": []}
    given = index.given_split or {}
    pool = np.array(given.get("train", range(len(index.paths))), dtype=np.int64)
    missing = [name for name in ("val", "test") if name not in given]
    share = SPLIT_RATIOS["train"] + sum(SPLIT_RATIOS[m] for m in missing)
    rng, (units, keys) = np.random.default_rng(seed), _units(index, pool, join)
    sizes = np.array([len(u) for u in units])
    parts = {"train": [], **{name: idx for name, idx in given.items() if name != "train"}}
    parts.update({m: [] for m in missing})
    aim = dict.fromkeys(missing, 0)
    for key in np.unique(keys):
        left = rng.permutation(np.flatnonzero(keys == key)).tolist()
        here = sizes[left]
        targets = {name: int(round(SPLIT_RATIOS[name] / share * here.sum())) for name in missing}
        aim = {name: aim[name] + targets[name] for name in missing}
        # units too large to bring any carved split nearer its target stay in train; when the others
        # hold less than the carved splits ask, each gets the same share of its target
        smaller = int(here[here < 2 * max(targets.values(), default=0)].sum())
        if smaller < sum(targets.values()):
            targets = {name: int(round(n * smaller / sum(targets.values()))) for name, n in targets.items()}
        for name in missing:
            taken = set(_take(left, sizes, targets[name], spare=1))
            parts[name] += [i for u in left if u in taken for i in units[u]]
            left = [u for u in left if u not in taken]
        parts["train"] += [i for u in left for i in units[u]]
    out = {name: [index.paths[i] for i in sorted(parts[name])] for name in SPLIT_RATIOS}
    if index.groups:
        out["groups"] = dict(zip(index.paths, index.groups))
    if sizes.max(initial=1) > 1:
        off = [f"{name} {_share(len(parts[name]), aim[name], len(pool))}" for name in missing
               if abs(len(parts[name]) - aim[name]) > OFF * aim[name]]
        if off:
            print(f"note: whole groups keep the split off its ratios in images: {'; '.join(off)}", flush=True)
        out["sizes"] = {name: count(index, parts[name]) for name in SPLIT_RATIOS}
    return out


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


def _holds(index: DataIndex, ids: np.ndarray, c: int) -> np.ndarray:
    """Whether each image at positions `ids` is of class `c` (multi-label: has a positive for it)."""
    return index.targets[ids, c] > 0 if index.multilabel else index.targets[ids] == c


def label_fraction(index: DataIndex, train: list[int], frac: float, seed: int) -> list[int]:
    """A seeded stratified subset of `train` holding about `frac` of its images in whole units
    (`_units`): per stratum, the units a seeded draw of round(frac * units) picks, followed when they
    miss by the others in a seeded order, as near round(frac * images) as they allow (`_take`); then,
    for each class present in train that no chosen image holds, a seeded unit holding one of its
    images (multi-label: one with a positive for it), so that every class is labelled. Where
    a unit holds several images, a fraction far from `frac` is noted in one line."""
    if frac >= 1.0:
        return sorted(train)
    rng = np.random.default_rng(seed)
    train = np.asarray(train, dtype=np.int64)
    units, keys = _units(index, train)
    sizes = np.array([len(u) for u in units])
    chosen, aim = set(), 0
    for key in np.unique(keys):
        group = np.flatnonzero(keys == key)
        target = max(1, int(round(frac * sizes[group].sum())))
        # the draw of a count of units comes first: with one image per unit it is all that is taken,
        # so such data gets the fraction it always got
        first = rng.choice(group, max(1, int(round(frac * len(group)))), replace=False)
        taken = _take(first, sizes, target)
        if int(sizes[taken].sum()) != target and len(first) < len(group):
            taken = _take([*first, *rng.permutation(np.setdiff1d(group, first))], sizes, target)
        aim += target
        chosen.update(i for u in taken or [min(group, key=sizes.__getitem__)] for i in units[u])
    # strata follow each unit's majority (multi-label: its rarest label): a class that is no group's
    # majority can be missed by every stratum
    unit_of = {i: u for u, members in enumerate(units) for i in members}
    for c in range(len(index.classes)):
        positives = train[_holds(index, train, c)]
        if len(positives) and not _holds(index, np.array(sorted(chosen)), c).any():
            chosen.update(units[unit_of[int(rng.choice(positives))]])
    if sizes.max(initial=1) > 1 and abs(len(chosen) - aim) > OFF * aim:
        print(f"note: whole groups keep the label fraction off its ratio: {_share(len(chosen), aim, len(train))}",
              flush=True)
    return sorted(chosen)

