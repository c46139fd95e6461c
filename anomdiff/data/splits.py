"""Seeded, order-independent choices over a dataset: nested category subsets and the validation hold-out.

Both are pure functions of names and a seed, so every Ray worker (and every rerun) makes the same
choice without coordination.
"""

from __future__ import annotations

import hashlib


def _unit_hash(text: str, seed: int) -> float:
    """A uniform number in [0, 1) determined by ``text`` and ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def category_order(categories: list[str], seed: int = 0) -> list[str]:
    """A seeded order of the categories; its prefixes are the nested subsets used for scaling runs."""
    return sorted(categories, key=lambda name: (_unit_hash(name, seed), name))


def nested_subset(categories: list[str], k: int | None, seed: int = 0) -> list[str]:
    """The first ``k`` categories of :func:`category_order`: subset(10) is inside subset(20)."""
    if k is None:
        return sorted(categories)
    if not 1 <= k <= len(categories):
        raise ValueError(f"asked for {k} categories, the dataset has {len(categories)}")
    return sorted(category_order(categories, seed)[:k])


def is_validation(sample_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a training normal is held out for validation (model selection and threshold choice)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    return _unit_hash(sample_id, seed + 1) < fraction


def validation_per_category(ids_by_category: dict[str, list[str]], fraction: float, seed: int,
                            per_category: int | None) -> dict[str, list[str]]:
    """The validation normals of each category: its held-out ids (:func:`is_validation`), at most
    ``per_category`` of them (``None``: all), always the same ones for a seed (those with the smallest
    hold-out hash), so every category is represented and every checkpoint sees the same images."""
    chosen = {}
    for category, ids in sorted(ids_by_category.items()):
        held = sorted((_unit_hash(s, seed + 1), s) for s in ids if is_validation(s, fraction, seed))
        chosen[category] = [s for _, s in held[:per_category]]
    return chosen
