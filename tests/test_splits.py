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
