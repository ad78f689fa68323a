"""The paper's baselines as ``snf_mode`` switches (``augment/baselines.py``): the maths, leakage, and one tiny
training run per switch."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from recbole_llmser.augment import baselines as bl
from recbole_llmser.augment import ccg, snf
from recbole_llmser.augment.offline_ranker import OfflineRanker
from recbole_llmser.augment.pipeline import artifact_settings, augmentation_dir
from recbole_llmser.augment.presentation import LLM_AUG_KEYS
from recbole_llmser.quick_start import run
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.schema import AUG_KEYS, PROPS, validate
from tests.conftest import tiny_config_dict
from tests.llm_server import FakeLLMServer

SMALL = dict(method="llmser", stage="augment", ccg_epochs=1, semantic_backend="tfidf", ccg_num_candidates=8,
             snf_num_picks=6, aug_num_pseudo=4, arv_num_candidates=5, llm_max_retries=1, llm_timeout=5)
NO_TEXT = dict(item_text_field=None, load_col={"inter": ["user_id", "item_id", "timestamp"]})


# ----- the maths ----------------------------------------------------------------------------------------------
def test_predecessor_counts_count_every_adjacent_pair_occurrence():
    counts = bl.predecessor_counts([[1, 2, 3], [4, 2, 3], [1, 2], [2, 1, 2]])
    assert counts == {2: {1: 3, 4: 1}, 3: {2: 2}, 1: {2: 1}}
    assert bl.predecessor_counts([[7], []]) == {}


def test_tiebreak_keys_are_a_seeded_permutation():
    keys = bl.tiebreak_keys(10, 42)
    assert sorted(keys.tolist()) == list(range(10))
    assert (keys == bl.tiebreak_keys(10, 42)).all()
    assert any((bl.tiebreak_keys(10, seed) != keys).any() for seed in (43, 44))


def test_ranked_by_count_then_by_the_seeded_key():
    keys = np.array([0, 0, 0, 0, 0, 9, 3, 1])  # item 7 wins ties over 6, 6 over 5
    counts = {5: 1, 6: 1, 7: 1, 4: 2}
    assert bl.ranked(counts, set(), keys) == [4, 7, 6, 5]
    assert bl.ranked(counts, {7}, keys, limit=2) == [4, 6]
    swapped = keys.copy()
    swapped[[5, 7]] = swapped[[7, 5]]
    assert bl.ranked(counts, set(), swapped) == [4, 5, 6, 7]


def test_popular_outside_skips_the_prefix_items_and_stops_at_k():
    popular = [5, 3, 9, 1, 7]
    got = bl.popular_outside([[3, 5], [], [5, 3, 9, 1, 7], [1]], popular, 3)
    assert [g.tolist() for g in got] == [[9, 1, 7], [5, 3, 9], [], [5, 3, 9]]
    assert all(g.dtype == np.int64 for g in got)


def test_cooccurrence_ranks_predecessors_of_the_first_item_then_falls_back_to_popularity():
    # user u = [1, 9]; other users' prefixes put 2 before 1 twice, 3 before 1 once, 9 (u's own item) before 1 once
    others = [[2, 1], [2, 1, 5], [3, 1], [9, 1], [5, 6, 5, 6]]
    prefixes = others + [[1, 9]]
    keys = np.arange(10)
    predecessors = bl.predecessor_counts(prefixes)
    popular = bl.popularity_order(prefixes, keys)
    assert popular == [1, 5, 2, 6, 9, 3]  # 1: 5 times, 5: 3, then 2, 6, 9 twice each (ties by key), 3 once
    items, filled = bl.cooccurrence_items([1, 9], predecessors, popular, keys, 2)
    assert (items, filled) == ([2, 3], 0)  # 9 is u's own item: never chosen, whatever its count
    items, filled = bl.cooccurrence_items([1, 9], predecessors, popular, keys, 5)
    assert (items, filled) == ([2, 3, 5, 6], 2)  # the popular fillers skip 1 (own), 2 (chosen); 4 items exist
    assert bl.cooccurrence_items([7], predecessors, popular, keys, 1) == ([1], 1)  # nothing precedes 7


def test_training_item_mask_and_top_k():
    mask = bl.training_item_mask([[1, 2], [2, 4]], 6)
    assert mask.tolist() == [False, True, True, False, True, False]
    keys = np.array([5, 4, 3, 2, 1, 0])
    scores = np.array([-np.inf, 0.5, 0.9, 0.5, 0.5, -np.inf])
    assert bl.top_k(scores, keys, 2).tolist() == [2, 4]  # ties at the cut: the smaller key (item 4) wins
    assert bl.top_k(scores, keys, 3).tolist() == [2, 4, 3]
    assert bl.top_k(scores, keys, 10).tolist() == [2, 4, 3, 1]  # fewer allowed than k
    assert bl.top_k(scores, keys, 0).tolist() == []


def test_pool_from_scores_keeps_only_training_items_outside_the_prefix():
    allowed = bl.training_item_mask([[1, 2, 3], [4]], 7)  # 5 and 6: no training prefix holds them
    scores = np.array([9.0, 1.0, 2.0, 3.0, 4.0, 99.0, 98.0])  # padding and 5, 6 score best
    pool = bl.pool_from_scores(scores, allowed, [4], np.arange(7), 5)
    assert pool.tolist() == [3, 2, 1]
    near = [0, 0.3000001, 0.3000002, 0, 0, 0, 0]  # equal to 1e-6: a tie, which the seeded key decides
    assert bl.pool_from_scores(near, allowed, [], np.array([0, 2, 1, 0, 0, 0, 0]), 1).tolist() == [2]


def test_text_pools_rank_by_similarity_to_the_history_profile():
    vectors = np.array([[0, 0], [1, 0], [0.9, 0.1], [0, 1], [0.7, 0.7], [1, 0.01]], dtype=np.float32)
    allowed = bl.training_item_mask([[1, 2, 3, 4]], 6)  # item 5 only in validation/test: never in a pool
    ranker = OfflineRanker(0.8)
    pools = bl.text_pools(vectors, [[1], [3]], [[1], [3]], allowed, np.arange(6), 2, ranker, batch=1)
    assert [p.tolist() for p in pools] == [[2, 4], [4, 2]]
    # a history without usable vectors scores every item 0: the seeded keys decide
    pools = bl.text_pools(vectors, [[0]], [[0]], allowed, np.array([0, 3, 2, 1, 0, 0]), 3, ranker)
    assert pools[0].tolist() == [4, 3, 2]


def test_artifact_settings_follow_the_llm_only_switch():
    config = {k: None for k in AUG_KEYS + LLM_AUG_KEYS}
    config.update(snf_mode="llm_only", arv_weight=0.5, llm_shuffle_candidates=True)
    assert set(artifact_settings(config, "llm")) == set(AUG_KEYS + LLM_AUG_KEYS)  # the LLM still answers SNF
    assert set(artifact_settings(config, "offline")) == set(AUG_KEYS)
    for mode in ("ccg_top", "random", "cooccurrence"):  # as before: no LLM stage, no presentation key
        assert set(artifact_settings({**config, "snf_mode": mode}, "llm")) == set(AUG_KEYS)
    assert set(artifact_settings({**config, "snf_mode": "filter"}, "llm")) == set(AUG_KEYS + LLM_AUG_KEYS)


# ----- leakage: validation and test items nobody else has -------------------------------------------------------
SHARED = 12


def write_leak_dataset(root, name="leak", n_users=30, seed=0, with_item=True):
    """Users whose training prefixes hold 3-6 of 12 shared items and whose validation and test items are their own
    (``v<u>``, ``t<u>``), with titles that repeat the user's whole history: the most similar items there are, and
    with at most 9 shared items outside a prefix, a source that could use them would need them to reach M = 8."""
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    title = {f"s{i}": f"shared thing {i} colour {['red', 'blue', 'green'][i % 3]}" for i in range(1, SHARED + 1)}
    lines, prefixes = ["user_id:token\titem_id:token\ttimestamp:float"], {}
    for u in range(1, n_users + 1):
        prefix = [f"s{i}" for i in rng.sample(range(1, SHARED + 1), rng.randint(3, 6))]
        prefixes[f"u{u}"] = prefix
        for kind in "vt":
            title[f"{kind}{u}"] = " ".join(title[i] for i in prefix)
        for t, item in enumerate(prefix + [f"v{u}", f"t{u}"]):
            lines.append(f"u{u}\t{item}\t{1000 * u + t}")
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    if with_item:
        rows = ["item_id:token\ttitle:token_seq"] + [f"{item}\t{text}" for item, text in title.items()]
        (folder / f"{name}.item").write_text("\n".join(rows) + "\n")
    return prefixes


def _augment(data, dataset, **extra):
    out = run("SASRec", dataset, config_dict=tiny_config_dict(data, **{**SMALL, **extra}), cmd_args=[])
    path = Path(out["artifact"])
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return path, records, json.loads((path.parent / "summary.json").read_text())


def _check_leak_free(records, prefixes, want):
    assert {r["user_id"] for r in records} == set(prefixes)
    for r in records:
        pseudo, prefix = r["pseudo_items"], prefixes[r["user_id"]]
        assert all(item.startswith("s") for item in pseudo), r  # never a validation or test item
        assert not set(pseudo) & set(prefix) and len(set(pseudo)) == len(pseudo)
        assert len(pseudo) == min(want, SHARED - len(prefix))  # as many as the training items allow
        assert r["ccg_rank"] is None and len(r["source_rank"]) == len(pseudo)


@pytest.mark.parametrize("backend", ["offline", "model"])
@pytest.mark.parametrize("mode", ["cooccurrence", "llm_only"])
def test_baselines_never_choose_a_validation_or_test_item(mode, backend, tmp_path, tmp_cwd):
    data = tmp_path / "data"
    prefixes = write_leak_dataset(data, with_item=backend == "offline")
    extra = dict(aug_num_pseudo=8, snf_num_picks=8, ccg_num_candidates=10, snf_mode=mode)
    _, records, summary = _augment(data, "leak", **extra, **({} if backend == "offline" else NO_TEXT))
    assert summary["backend"] == backend and summary["snf_mode"] == mode
    kind = {"cooccurrence": "cooccurrence", "llm_only": "text_pool" if backend == "offline" else "forward_pool"}
    assert summary["pseudo_source"]["kind"] == kind[mode] and {r["pseudo_source"] for r in records} == {kind[mode]}
    _check_leak_free(records, prefixes, 8)
    if mode == "cooccurrence":  # M = 8 needs the popularity fallback for every user here
        assert summary["pseudo_source"]["users_filled_by_popularity"] > 0


def test_llm_only_asks_the_llm_with_pools_of_training_items(tmp_path, tmp_cwd):
    data = tmp_path / "data"
    prefixes = write_leak_dataset(data)
    extra = dict(aug_num_pseudo=8, snf_num_picks=8, ccg_num_candidates=10, snf_mode="llm_only", arv_weight=0.5)
    with FakeLLMServer() as server:  # "smart" answers: the candidates sharing most words with the history
        llm = dict(llm_base_url=server.base_url, llm_api_key="sk-test", llm_model="fake-llm")
        path, records, summary = _augment(data, "leak", **extra, **llm)
        assert server.calls() == len(prefixes)  # SNF asks although ARV is replaced by a constant weight
        bodies = server.chat_bodies()
    assert summary["backend"] == "llm" and summary["settings"]["llm_shuffle_candidates"] is True
    _check_leak_free(records, prefixes, 8)
    for body in bodies:  # neither the history nor the candidates show a validation or test item
        assert "shared thing" in body["messages"][-1]["content"]
        for line in body["messages"][-1]["content"].splitlines():
            if line.startswith("- ") or line[:1].isdigit():
                assert line.count("shared thing") == 1, line
    for r in records:  # the prompt showed shared items outside the prefix only, and ARV asked nothing
        shown = r["presented"]["snf"]
        assert all(item.startswith("s") for item in shown) and not set(shown) & set(prefixes[r["user_id"]])
        assert set(r["pseudo_items"]) <= set(shown)
        assert r["presented"]["arv"] is None and r["arv_status"] == "constant"


def test_each_mode_has_its_own_artifact_folder(tmp_path, tmp_cwd):
    data = tmp_path / "data"
    write_leak_dataset(data)
    folders = {mode: _augment(data, "leak", snf_mode=mode, arv_weight=1.0)[0].parent.name
               for mode in ("cooccurrence", "llm_only", "ccg_top")}
    assert len(set(folders.values())) == 3


# ----- CCG widened by the similarity pool (ccg_text_candidates; our addition, 0 = the paper) ----------------
def test_mix_candidates_keeps_ccg_first_then_new_pool_items():
    ccg_items = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    pools = [[3, 11, 12, 13, 14], [15]]  # row 0: 3 is CCG's already; row 1: the pool runs short
    assert ccg.mix_candidates(ccg_items, pools, 2).tolist() == [[1, 2, 3, 11, 12], [6, 7, 8, 15, 9]]
    assert (ccg.mix_candidates(ccg_items, pools, 0) == ccg_items).all()
    assert ccg.mix_candidates(ccg_items, [[20, 21, 22, 23, 24, 25]] * 2, 5).tolist() == [[20, 21, 22, 23, 24]] * 2


def test_ccg_text_candidates_keeps_the_artifact_folders_made_before_it():
    base = {k: PROPS[k].default for k in AUG_KEYS} | {"checkpoint_dir": "/x", "dataset": "d"}
    sequences = [[1, 2, 3], [4, 5]]
    # the folder names of these settings before the property existed (at its default the artifact is the same)
    assert augmentation_dir(base, "offline", sequences).name == "a4ab96c43787ca71"
    assert augmentation_dir(base, "model", sequences).name == "4bf5a83128851f55"
    assert augmentation_dir({**base, "ccg_text_candidates": 4}, "offline", sequences).name != "a4ab96c43787ca71"
    with pytest.raises(LLMSeRError, match=r"ccg_text_candidates \(21\) must be at most ccg_num_candidates \(K=20\)"):
        validate({**base, "ccg_text_candidates": 21})


@pytest.mark.parametrize("backend", ["offline", "model"])
def test_ccg_text_candidates_put_training_items_of_the_pool_after_ccgs_first(backend, tmp_path, tmp_cwd, monkeypatch,
                                                                             caplog):
    data = tmp_path / "data"
    prefixes = write_leak_dataset(data, with_item=backend == "offline")
    shown = []
    original = snf.run
    monkeypatch.setattr(snf, "run", lambda ctx, items, requests: (
        shown.append({ctx.user_token(i): [ctx.item_token(x) for x in row] for i, row in zip(ctx.rows, items)})
        or original(ctx, items, requests)))
    extra = dict(aug_num_pseudo=4, snf_num_picks=6, ccg_num_candidates=8, **({} if backend == "offline" else NO_TEXT))
    _augment(data, "leak", **extra)
    _, records, summary = _augment(data, "leak", ccg_text_candidates=3, **extra)
    assert summary["settings"]["ccg_text_candidates"] == 3 and summary["backend"] == backend
    warned = [r.getMessage() for r in caplog.records
              if "(no item text) the pool is the forward helper's" in r.getMessage()]
    assert len(warned) == (backend != "offline")  # the forward helper's pool is named as such, the text pool is not
    plain, mixed = shown
    for user, cands in mixed.items():
        assert len(cands) == 8 == len(set(cands)) and cands[:5] == plain[user][:5]  # CCG's first K - 3 stay
        for item in cands[5:]:  # pool items (training items outside the prefix), or CCG's next when it runs short
            assert (item.startswith("s") and item not in prefixes[user]) or item in plain[user][5:], (user, item)
    assert sum(set(mixed[user]) != set(plain[user]) for user in mixed) > len(mixed) // 2  # the pool adds items
    assert all(not set(r["pseudo_items"]) & set(prefixes[r["user_id"]]) for r in records)


# ----- one tiny training run per switch ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["cooccurrence", "llm_only"])
def test_a_baseline_trains_and_evaluates(mode, tiny_data, tmp_cwd):
    data, sequences = tiny_data
    cfg = tiny_config_dict(data, **{**SMALL, "stage": "all", "snf_mode": mode, "eval_protocols": ["uni20"]})
    result = run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    assert result["epochs_trained"] == 1
    assert 0.0 <= result["test"]["uni20"]["overall"]["ndcg@10"] <= 1.0
    records = [json.loads(line) for line in Path(result["aug_file"]).read_text().splitlines()]
    assert len(records) == len(sequences) and all(len(r["pseudo_items"]) == 4 for r in records)
    assert all(not set(r["pseudo_items"]) & set(sequences[r["user_id"]][:-2]) for r in records)
