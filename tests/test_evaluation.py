import math

import numpy as np
import pytest
import torch

from recbole_llmser.evaluation import (
    assign_groups,
    group_ranges,
    grouped_metrics,
    metrics_from_ranks,
    parse_protocol,
    ranks_from_scores,
    sample_negatives,
)


def test_metrics_from_ranks_by_hand():
    m = metrics_from_ranks(np.array([0, 1, 5, 12]), [1, 5, 10])
    assert m["hit@1"] == pytest.approx(1 / 4)
    assert m["hit@5"] == pytest.approx(2 / 4)
    assert m["hit@10"] == pytest.approx(3 / 4)
    assert m["ndcg@1"] == pytest.approx(1 / 4)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(7)) / 4)


def test_ranks_count_ties_against_the_target():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9], [1.0, 1.0, 1.0, 1.0]])
    # target is column 1 in both rows (it ties with itself: n_equal_self=1)
    r = ranks_from_scores(scores, scores[:, 1], n_equal_self=1)
    assert r.tolist() == [2, 3]  # one higher + one equal; three equal others
    negs = torch.tensor([[0.2, 0.3], [0.9, 0.95]])
    assert ranks_from_scores(negs, torch.tensor([0.25, 0.95]), n_equal_self=0).tolist() == [1, 1]


def test_groups_and_ranges():
    assert assign_groups(np.array([0, 1, 2, 3, 4, 9]), [2, 3]).tolist() == [0, 0, 0, 1, 2, 2]
    assert group_ranges([2, 3]) == ["<=2", "3", ">=4"]
    assert group_ranges([3, 6]) == ["<=3", "4-6", ">=7"]


def test_grouped_metrics_hand_computed():
    ranks = np.array([0, 3, 20, 1, 0])
    lengths = np.array([1, 2, 3, 4, 7])  # groups: <=2 -> rows 0,1; 3 -> row 2; >=4 -> rows 3,4
    res = grouped_metrics(ranks, lengths, [2, 3], ["tail", "medium", "head"], [1, 5])
    assert res["overall"]["n"] == 5
    assert res["overall"]["hit@5"] == pytest.approx(4 / 5)
    tail, medium, head = res["groups"]
    assert (tail["n"], medium["n"], head["n"]) == (2, 1, 2)
    assert tail["range"] == "<=2" and head["range"] == ">=4"
    assert tail["hit@1"] == pytest.approx(0.5)
    assert tail["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 2)
    assert medium["hit@5"] == 0.0 and medium["ndcg@5"] == 0.0
    assert head["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1) / 2)


def test_sample_negatives_excludes_seen_and_is_seeded():
    seen = [np.array([1, 2, 3]), np.array([4, 5])]
    a = sample_negatives([0, 1, 0], seen, n_items=12, n_neg=6, rng=np.random.default_rng(7))
    b = sample_negatives([0, 1, 0], seen, n_items=12, n_neg=6, rng=np.random.default_rng(7))
    assert (a == b).all()
    for row, u in zip(a, [0, 1, 0]):
        assert len(set(row.tolist())) == 6
        assert not set(row.tolist()) & set(seen[u].tolist())
        assert row.min() >= 1 and row.max() <= 11
    with pytest.raises(ValueError):
        sample_negatives([0], seen, n_items=8, n_neg=6, rng=np.random.default_rng(0))


def test_parse_protocol():
    assert parse_protocol("full") is None
    assert parse_protocol("uni100") == 100
    with pytest.raises(ValueError):
        parse_protocol("pop100")


def test_groups_whose_users_share_one_target_are_flagged():
    from recbole_llmser.evaluation import format_results, shared_targets

    targets = [7] * 12 + list(range(100, 168))  # 12 of the 20 head users share item 7 (12 of 80 overall)
    groups = [2] * 20 + [0] * 60
    found = shared_targets(targets, groups, ["tail", "medium", "head"], [2, 3])
    assert found == [{"group": "head", "item": 7, "share": 0.6}]
    assert shared_targets(list(range(80)), groups, ["tail", "medium", "head"], [2, 3]) == []
    res = {"full": {"overall": {"n": 80, "hit@10": 0.5}, "groups": [], "shared_targets": found}}
    assert "note: 60% of the head users share one valid target (item 7)" in format_results(res, "valid")


def test_rows_repeating_one_history_and_target_are_found():
    from recbole_llmser.evaluation import row_keys, shared_rows, shared_rows_line

    # 6 rows "3 4 -> 3" (padding past the length differs: ignored), 2 rows "3 4 -> 5" (other target), 2 rows
    # "4 3 -> 3" (other order), 10 distinct rows
    hist = [[3, 4, 0]] * 4 + [[3, 4, 9]] * 2 + [[3, 4, 0]] * 2 + [[4, 3, 0]] * 2
    hist += [[i, i + 1, i + 2] for i in range(10)]
    lengths = [2] * 10 + [3] * 10
    targets = [3] * 6 + [5] * 2 + [3] * 2 + list(range(10))
    keys = row_keys(np.array(hist), np.array(lengths), np.array(targets))
    assert len(set(keys[:6].tolist())) == 1 and len(set(keys.tolist())) == 13
    found = shared_rows(np.array(hist), lengths, targets, threshold=0.1)
    assert found == [{"rows": 6, "share": 0.3, "history": [3, 4], "target": 3},
                     {"rows": 2, "share": 0.1, "history": [3, 4], "target": 5},
                     {"rows": 2, "share": 0.1, "history": [4, 3], "target": 3}]
    assert shared_rows(np.array(hist), lengths, targets, threshold=0.2) == found[:1]
    assert shared_rows(np.array(hist)[10:], lengths[10:], targets[10:], threshold=0.0) == []  # no pair repeats
    assert shared_rows(np.zeros((0, 3), np.int64), [], []) == []
    # the keys do not depend on how the rows are chunked
    assert (row_keys(np.array(hist), np.array(lengths), np.array(targets), chunk=3) == keys).all()
    line = shared_rows_line("validation", [{**found[0], "history": ["c", "d"], "target": "c"}], 20)
    assert line.startswith("validation: 6 of 20 rows (30%) repeat 1 (history, target) pair(s) exactly")
    assert "(c d -> c: 6 rows)" in line and "a model chosen on it" in line
    assert "chosen" not in shared_rows_line("test", found[:1], 20) and shared_rows_line("test", [], 20) == ""


def test_a_dataset_of_duplicated_users_warns_and_the_run_records_it(tmp_path, tmp_cwd, caplog):
    """Users with the same sequence (bots, duplicated exports) make an evaluation split a few ranking decisions:
    the split is flagged in the log and in results.json, which a report then shows."""
    from recbole_llmser.quick_start import run
    from tests.conftest import tiny_config_dict, write_tiny_dataset

    data = tmp_path / "data"
    write_tiny_dataset(data, n_users=30)
    inter = data / "tiny" / "tiny.inter"
    dup = [f"bot{u}\ti{i}\t{t}" for u in range(10) for t, i in enumerate((1, 2, 3, 1, 4))]  # 10 identical users
    inter.write_text(inter.read_text() + "\n".join(dup) + "\n")
    with caplog.at_level("WARNING"):
        result = run("SASRec", "tiny", config_dict=tiny_config_dict(data, epochs=1), cmd_args=[])
    valid = result["shared_rows"]["valid"]
    assert valid["n_rows"] == 40 and valid["pairs"] == [
        {"rows": 10, "share": 0.25, "history": ["i1", "i2", "i3"], "target": "i1"}]
    assert result["shared_rows"]["test"]["pairs"][0]["history"] == ["i1", "i2", "i3", "i1"]
    assert "dataset 'tiny' validation: 10 of 40 rows (25%) repeat 1 (history, target) pair(s) exactly" in caplog.text


def test_a_run_keeps_per_user_ranks_that_give_its_metrics_exactly(tiny_data, tmp_cwd):
    """A tiny training run writes per_user.npz beside results.json (which names it); the metrics recomputed from
    its ranks equal results.json's, exactly, overall and per group, for each protocol and split."""
    import json
    from pathlib import Path

    from recbole_llmser.evaluation import PER_USER, read_per_user, row_metrics
    from recbole_llmser.quick_start import run
    from tests.conftest import tiny_config_dict

    data, sequences = tiny_data
    result = run("SASRec", "tiny", config_dict=tiny_config_dict(data), cmd_args=[])
    run_dir = Path(result["run_dir"])
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["per_user"] == result["per_user"] == PER_USER == "per_user.npz"
    assert {"model", "dataset", "method", "seed", "best_valid_score", "valid", "test", "run_dir", "checkpoint",
            "aug_file", "tsl_embedding_file", "valid_curve", "best_epoch"} < set(saved)  # the keys it had
    per_user = read_per_user(run_dir / PER_USER)
    assert per_user["group_names"] == ["tail", "medium", "head"] and per_user["group_bounds"] == [4, 7]
    assert set(per_user["splits"]) == {"valid", "test"}
    for split in ("valid", "test"):
        rows = per_user["splits"][split]
        assert sorted(rows["user"].tolist()) == sorted(sequences)  # every user once, by its token
        lengths = {u: len(s) - 2 for u, s in sequences.items()}
        assert rows["train_len"].tolist() == [lengths[u] for u in rows["user"]]
        assert rows["group"].tolist() == assign_groups(rows["train_len"], [4, 7]).tolist()
        assert set(rows["ranks"]) == {"uni20", "full"} == set(saved[split])
        for protocol, res in saved[split].items():
            ranks = rows["ranks"][protocol]
            assert ranks.dtype == np.int32 and len(ranks) == res["overall"]["n"]
            hit, ndcg = row_metrics(ranks, 10)
            assert (float(hit.mean()), float(ndcg.mean())) == (res["overall"]["hit@10"], res["overall"]["ndcg@10"])
            for g, group in enumerate(res["groups"]):
                mask = rows["group"] == g
                assert int(mask.sum()) == group["n"] and group["name"] == per_user["group_names"][g]
                assert (float(hit[mask].mean()), float(ndcg[mask].mean())) == (group["hit@10"], group["ndcg@10"])
    assert not list(run_dir.glob(".*.tmp"))
