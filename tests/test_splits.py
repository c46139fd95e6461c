import pytest

from anomdiff.data.splits import category_order, is_validation, nested_subset


def test_category_subsets_are_nested_and_seeded():
    names = [f"c{i:03d}" for i in range(160)]
    ten, forty = set(nested_subset(names, 10, seed=4)), set(nested_subset(names, 40, seed=4))
    assert len(ten) == 10 and ten < forty
    assert category_order(names, 4) == category_order(list(reversed(names)), 4)
    assert set(nested_subset(names, 10, seed=5)) != ten
    with pytest.raises(ValueError, match="asked for 161 categories"):
        nested_subset(names, 161)


def test_validation_hold_out_is_a_stable_seeded_fraction():
    ids = [f"cat/train/{i}" for i in range(5000)]
    held = [i for i in ids if is_validation(i, 0.1, seed=0)]
    assert 400 < len(held) < 600
    assert held == [i for i in ids if is_validation(i, 0.1, seed=0)]
    assert not any(is_validation(i, 0.0) for i in ids)


def test_validation_per_category_keeps_the_same_held_out_ids_and_caps_each_category():
    from anomdiff.data.splits import validation_per_category

    ids = {"a": [f"a/{i}" for i in range(200)], "b": [f"b/{i}" for i in range(30)]}
    chosen = validation_per_category(ids, 0.2, seed=0, per_category=5)
    assert [len(v) for v in chosen.values()] == [5, 5]
    assert all(is_validation(s, 0.2, 0) for v in chosen.values() for s in v)
    shuffled = {c: list(reversed(v)) for c, v in ids.items()}  # another shard order, the same choice
    assert validation_per_category(shuffled, 0.2, seed=0, per_category=5) == chosen
    everything = validation_per_category(ids, 0.2, seed=0, per_category=None)
    assert len(everything["a"]) == sum(is_validation(s, 0.2, 0) for s in ids["a"])
