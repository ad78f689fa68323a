"""The scale benchmark's pure helpers (benchmarks/scale.py): growth exponents, extrapolation, and the synthetic
data's shape on a tiny size. No timing is asserted."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale  # noqa: E402

SHAPE = {"items_per_user": 0.5, "length_values": [5, 6, 9, 40], "length_probs": [0.5, 0.25, 0.2, 0.05],
         "zipf_exponent": 0.76}


def test_growth_exponent():
    assert scale.growth_exponent(10, 2.0, 100, 20.0) == pytest.approx(1.0)
    assert scale.growth_exponent(10, 1.0, 100, 100.0) == pytest.approx(2.0)
    assert scale.growth_exponent(1000, 5.0, 10_000, 5.0) == pytest.approx(0.0)
    assert scale.growth_exponent(10, 0.0, 100, 1.0) is None
    assert scale.growth_exponent(10, None, 100, 1.0) is None


def test_extrapolate_uses_the_two_largest_sizes_and_at_least_linear_growth():
    value, e = scale.extrapolate({10: 1.0, 100: 10.0, 1000: 1000.0}, 10_000)
    assert e == pytest.approx(2.0) and value == pytest.approx(100_000.0)
    value, e = scale.extrapolate({10: 4.0, 100: 8.0}, 1000)  # sub-linear between small sizes: assume linear
    assert e == 1.0 and value == pytest.approx(80.0)
    assert scale.extrapolate({10: 4.0}, 1000) == (None, None)
    assert scale.extrapolate({10: 4.0, 100: None}, 1000) == (None, None)


def test_synthetic_sequences_shape():
    n_items, lengths, items = scale.synthetic_sequences(400, SHAPE, seed=3)
    assert n_items == 200
    assert set(lengths.tolist()) <= {5, 6, 9, 40} and len(lengths) == 400
    assert len(items) == lengths.sum() and items.min() >= 0 and items.max() < n_items
    starts = np.cumsum(lengths) - lengths
    for s, n in zip(starts, lengths):  # distinct items within each user
        assert len(set(items[s:s + n].tolist())) == n
    counts = np.sort(np.bincount(items, minlength=n_items))[::-1]
    assert counts[0] > 4 * np.median(counts)  # a popularity head, as with a Zipf law
    again = scale.synthetic_sequences(400, SHAPE, seed=3)
    assert np.array_equal(again[2], items)  # seeded


def test_synthetic_sequences_caps_lengths_at_a_tiny_catalogue():
    n_items, lengths, items = scale.synthetic_sequences(20, SHAPE, seed=0)
    assert n_items == 10 and lengths.max() <= 10
    starts = np.cumsum(lengths) - lengths
    assert all(len(set(items[s:s + n].tolist())) == n for s, n in zip(starts, lengths))


def test_synthetic_sequences_on_a_fixed_catalogue():
    fixed = {**SHAPE, "fixed_items": 50}
    sizes = [scale.synthetic_sequences(n, fixed, seed=0)[0] for n in (40, 400, 4000)]
    assert sizes == [50, 50, 50]  # --items: the catalogue does not grow with the users


def test_written_dataset_is_atomic_files(tmp_path):
    folder = scale.write_dataset(tmp_path, 300, SHAPE, seed=1)
    name = scale.dataset_name(300)
    inter = (folder / f"{name}.inter").read_text().splitlines()
    item = (folder / f"{name}.item").read_text().splitlines()
    assert inter[0] == "user_id:token\titem_id:token\ttimestamp:float"
    assert item[0] == "item_id:token\ttitle:token_seq"
    assert len(item) == 1 + 150 and all(len(line.split("\t")) == 2 for line in item)
    users = [line.split("\t")[0] for line in inter[1:]]
    assert len(set(users)) == 300
    assert (folder / "shape.json").is_file()
    before = (folder / f"{name}.inter").stat().st_mtime_ns
    scale.write_dataset(tmp_path, 300, SHAPE, seed=1)  # written once: reused
    assert (folder / f"{name}.inter").stat().st_mtime_ns == before


def test_beauty_shape_of_the_bundled_dataset():
    shape = scale.beauty_shape()
    assert shape["users"] == 22363 and shape["items"] == 12101
    assert math.isclose(sum(shape["length_probs"]), 1.0)
    assert min(shape["length_values"]) == 5  # 5-core
    assert 0.5 < shape["zipf_exponent"] < 1.0


def test_labels():
    assert [scale.label(n) for n in (10_000, 100_000, 1_000_000, 1234)] == ["10k", "100k", "1M", "1234"]


def test_estimate_seconds_from_smaller_sizes_only():
    cached = {("ccg_epoch", 10): {"_extra": {"child_wall_s": 2.0}},
              ("ccg_epoch", 100): {"_extra": {"child_wall_s": 40.0}}}
    assert scale.estimate_seconds(cached, "ccg_epoch", 100) is None  # its own size is not a smaller one
    assert scale.estimate_seconds(cached, "ccg_epoch", 100, assume_exponent=2.0) == pytest.approx(200.0)
    assert scale.estimate_seconds(cached, "ccg_epoch", 1000) == pytest.approx(40.0 * 10 ** math.log10(20))
    assert scale.estimate_seconds(cached, "load", 1000, assume_exponent=2.0) is None


@pytest.mark.parametrize("loss", ["CE", "BPR"])
def test_helper_loss_reaches_the_helpers_config(tmp_cwd, loss):
    scale.write_dataset(tmp_cwd / "data", 300, SHAPE, seed=1)
    config = scale._config(300, tmp_cwd, None, loss)
    args = config["ccg_model_args"] or {}
    assert args.get("loss_type") == ("BPR" if loss == "BPR" else None)
    if loss == "BPR":  # one sampled negative per trained position, not a score for every item
        assert args["train_neg_sample_args"] == {"distribution": "uniform", "sample_num": 1}
    assert config["loss_type"] == "CE"  # the trained backbone (DCT) keeps its own loss
