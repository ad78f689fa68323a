import pytest

from recbole_llmser.augment.arv import decayed_weight, fill_unverifiable, reliability
from recbole_llmser.augment.snf import keep_pseudo_items, select_users


def test_reliability_exact_and_clipped():
    assert reliability(5, 5, 0.2) == 1.0
    assert reliability(4, 5, 0.37) == pytest.approx(0.37)
    assert reliability(4, 5, -0.2) == 0.0
    assert reliability(4, 5, 1.3) == 1.0


def test_decay_only_for_long_users():
    # T = 4, M = 12: decay when 12 + n_train > 16, i.e. n_train > 4
    assert decayed_weight(0.8, 12, 4, 4, 12, 0.5) == pytest.approx(0.8)
    assert decayed_weight(0.8, 12, 5, 4, 12, 0.5) == pytest.approx(0.4)
    # fewer pseudo items than M (fallbacks): the actual count is what is compared
    assert decayed_weight(0.8, 10, 6, 4, 12, 0.5) == pytest.approx(0.8)
    assert decayed_weight(0.8, 12, 9, 4, 12, 1.0) == pytest.approx(0.8)


def test_unverifiable_users_get_the_mean():
    w, fill = fill_unverifiable({"a": 0.2, "b": 0.6, "c": 0.0}, {"a", "b"})
    assert fill == pytest.approx(0.4) and w["c"] == pytest.approx(0.4) and w["a"] == 0.2
    w, fill = fill_unverifiable({"c": 0.0}, set())
    assert fill == 1.0 and w == {"c": 1.0}


def test_select_users_and_prepend_order():
    assert select_users({"a": 0, "b": 1, "c": 5, "d": 9}) == ["b", "c", "d"]
    assert select_users({"a": 0, "b": 1, "c": 5, "d": 9}, max_len=5) == ["b", "c"]
    assert keep_pseudo_items([2, 0, 3, 1], ["x", "y", "z", "w"], 3) == ["w", "x", "z"]
