"""The experiment runner (issue #7): plan expansion and ids, resume, failures, jsonl robustness, report maths."""

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from recbole_llmser import experiments as ex
from recbole_llmser.experiments import runner, store
from recbole_llmser.errors import LLMSeRError
from tests.conftest import stopped_after_epoch, tiny_config_dict

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- plan expansion --
def _plan(**extra):
    plan = {
        "name": "t",
        "common": {"epochs": 3, "show_progress": False},
        "runs": [
            {"dataset": "d", "model": ["SASRec", "GRU4Rec"], "method": ["none", "llmser"], "seeds": [1, 2],
             "overrides": {"epochs": 5}},
            {"dataset": "d", "model": "SASRec", "method": "llmser", "seeds": [1], "group": "ablation",
             "label": "beta 1", "overrides": {"aug_decay_beta": 1.0}},
            {"dataset": "d", "model": "SASRec", "method": "llmser", "seeds": [1], "group": "sweep:aug_decay_beta",
             "overrides": {"aug_decay_beta": 1.0}},
        ],
    }
    plan.update(extra)
    return plan


def test_plan_expands_to_the_cartesian_product_with_stable_ids():
    specs = ex.expand_plan(_plan())
    assert len(specs) == 2 * 2 * 2 + 1 + 1
    first = specs[0]
    assert (first["model"], first["method"], first["seed"]) == ("SASRec", "none", 1)
    assert first["overrides"] == {"epochs": 5, "show_progress": False}  # entry overrides win over common
    assert first["config_dict"] == {"show_progress": False, "epochs": 5, "seed": 1, "method": "none",
                                    "run_name": f"SASRec-none-{first['id']}"}  # its own, resumable folder
    assert first["group"] == "main" and first["label"] is None
    # stable: the same plan gives the same ids; every (model, method, seed) its own id
    assert [s["id"] for s in specs] == [s["id"] for s in ex.expand_plan(_plan())]
    assert len({s["id"] for s in specs[:8]}) == 8
    # the same spec in two entries (ablation and sweep) is one run listed twice; the sweep's x is its override
    assert specs[8]["id"] == specs[9]["id"] and len(ex.unique_runs(specs)) == 9
    assert specs[9]["x"] == 1.0
    # a changed spec is a new id; a non-semantic property (logging) is not part of the id
    assert ex.spec_id("d", "SASRec", "none", 1, {"epochs": 5}) != ex.spec_id("d", "SASRec", "none", 1, {"epochs": 6})
    assert ex.spec_id("d", "SASRec", "none", 1, {"epochs": 5}) == \
        ex.spec_id("d", "SASRec", "none", 1, {"epochs": 5, "show_progress": True, "state": "INFO"})
    assert ex.spec_id("d", "SASRec", "none", 1, {"a": 1, "b": 2}) == \
        ex.spec_id("d", "SASRec", "none", 1, {"b": 2, "a": 1})
    assert first["id"] == ex.spec_id("d", "SASRec", "none", 1, {"epochs": 5})  # documented formula; pinned here
    # pinned: a changed hashing would re-run every finished experiment
    assert ex.spec_id("d", "SASRec", "none", 1, {}) == "71c941b79f01"
    # --only
    assert {s["model"] for s in ex.select_specs(specs, "gru4rec")} == {"GRU4Rec"}
    assert len(ex.select_specs(specs, "beta 1")) == 1


def test_shipped_plans_are_valid_and_share_the_common_runs():
    plans = {p.stem: ex.load_plan(p) for p in sorted((REPO / "plans").glob("*.yaml"))}
    assert {"beauty_main", "beauty_ablations", "fashion_ids", "smoke"} <= set(plans)
    main_specs = ex.expand_plan(plans["beauty_main"])
    main = [s for s in ex.unique_runs(main_specs) if s["group"] == "main"]
    # backbones x methods x seeds, less the plan's documented seed reduction: LLMSeR BERT4Rec runs seed 42 only
    assert len(main) == 3 * 2 * 3 - 2
    assert {s["seed"] for s in main if (s["model"], s["method"]) == ("BERT4Rec", "llmser")} == {42}
    assert {s["seed"] for s in main if (s["model"], s["method"]) != ("BERT4Rec", "llmser")} == {42, 43, 44}
    # the epoch-cap tables reuse the main table's runs and add 60-epoch twins of the capped ones
    capped = [s for s in main_specs if s["group"].startswith("epoch cap")]
    assert {s["id"] for s in capped if "20 epochs" in s["label"]} <= {s["id"] for s in main}
    assert {s["overrides"]["epochs"] for s in capped if "60" in s["label"]} == {60}
    abl = ex.expand_plan(plans["beauty_ablations"])
    # the paper-default LLMSeR and the plain SASRec runs are the main plan's runs (same ids: run once)
    assert len({s["id"] for s in main} & {s["id"] for s in abl}) == 6
    sweep_m = sorted(s["x"] for s in abl if s["group"] == "sweep:aug_num_pseudo" and s["seed"] == 42)
    assert sweep_m == [2, 4, 8, 12, 16]
    m16 = next(s for s in abl if s["x"] == 16)
    assert m16["overrides"]["snf_num_picks"] >= 16
    sweep_b = sorted(s["x"] for s in abl if s["group"] == "sweep:aug_decay_beta" and s["seed"] == 42)
    assert sweep_b == [0.1, 0.3, 0.5, 0.7, 1.0]
    # the lm_score plan: its offline rows are the main table's SASRec LLMSeR runs; its own rows differ only in
    # the backend
    lm = ex.expand_plan(plans["beauty_lm_score"])
    offline = {s["id"] for s in lm if s["overrides"]["llm_backend"] == "offline"}
    assert len(offline) == 3 and offline <= {s["id"] for s in main}
    scored = [s for s in lm if s["overrides"]["llm_backend"] == "lm_score"]
    assert {s["seed"] for s in scored} == {42, 43, 44} and not offline & {s["id"] for s in scored}
    # the preset search: its reference rows (plain, paper defaults) are the main table's runs, all in one group
    search = ex.expand_plan(plans["beauty_preset_search"])
    assert len({s["group"] for s in search}) == 1
    assert len({s["id"] for s in search} & {s["id"] for s in main if s["model"] == "SASRec"}) == 6
    smoke = ex.expand_plan(plans["smoke"])
    assert all(s["overrides"]["epochs"] == 1 and s["overrides"]["MAX_ITEM_LIST_LENGTH"] == 20 for s in smoke)
    assert str(ex.results_dir_for(plans["smoke"], "amazon-fashion-ids")) == "results/smoke/amazon-fashion-ids"
    assert str(ex.results_dir_for(plans["beauty_main"], "amazon-beauty")) == "results/amazon-beauty"


@pytest.mark.parametrize("change, words", [
    ({"runs": [{"dataset": "d", "model": "SASRec", "seeds": [1], "overrides": {"seed": 3}}]}, "seed"),
    ({"runs": [{"dataset": "d", "model": "SASRec", "method": "bogus", "seeds": [1]}]}, "bogus"),
    ({"runs": [{"dataset": "d", "model": "SASRec", "seeds": [1], "typo": 1}]}, "typo"),
    ({"runs": [{"dataset": "d", "model": "SASRec", "seeds": [1], "group": "sweep:M"}]}, "needs 'x'"),
    ({"runs": [{"dataset": "d", "model": "SASRec"}]}, "seeds"),
    ({"runs": []}, "runs"),
    ({"common": {"method": "none"}}, "method"),
    ({"runs": [{"dataset": "d", "model": "SASRec", "seeds": [1], "overrides": {"run_name": "x"}}]}, "run_name"),
    ({"common": {"run_name": "x"}}, "'common' may not set \\['run_name'\\]"),
])
def test_bad_plans_fail_with_one_clear_line(change, words):
    with pytest.raises(LLMSeRError, match=words):
        ex.expand_plan(_plan(**change))


def test_an_entry_reads_properties_from_config_files_and_keeps_the_run_id_of_the_same_values(tmp_cwd):
    """``config_files`` (a preset, as a user passes it with --config_files) sits between common and overrides; a
    run with the same values as an overrides-only run has the same id (runs once, reused by both tables)."""
    (tmp_cwd / "preset.yaml").write_text("aug_num_pseudo: 2\naug_targets: real\n")
    (tmp_cwd / "more.yaml").write_text("aug_targets: all\naug_decay_beta: 1.0\n")
    plan = _plan(common={"epochs": 3, "aug_num_pseudo": 5}, runs=[
        {"dataset": "d", "model": "SASRec", "seeds": [1], "config_files": ["preset.yaml"], "group": "g1"},
        {"dataset": "d", "model": "SASRec", "seeds": [1], "group": "g2",
         "overrides": {"aug_num_pseudo": 2, "aug_targets": "real"}},
        {"dataset": "d", "model": "SASRec", "seeds": [1], "config_files": "preset.yaml more.yaml",
         "overrides": {"aug_decay_beta": 0.5}},
    ])
    a, b, c = ex.expand_plan(plan)
    assert a["overrides"] == {"epochs": 3, "aug_num_pseudo": 2, "aug_targets": "real"} == b["overrides"]
    assert a["id"] == b["id"] and a["config_dict"]["aug_targets"] == "real"
    assert c["overrides"] == {"epochs": 3, "aug_num_pseudo": 2, "aug_targets": "all", "aug_decay_beta": 0.5}
    for files, words in ((["missing.yaml"], "config_files: missing.yaml: config file not found"),
                         (["bad.yaml"], "bad.yaml: malformed YAML"), (["list.yaml"], "expected a mapping"),
                         (["axis.yaml"], "overrides may not set \\['seed'\\]")):
        (tmp_cwd / "bad.yaml").write_text("a: [1\n")
        (tmp_cwd / "list.yaml").write_text("- 1\n")
        (tmp_cwd / "axis.yaml").write_text("seed: 3\n")
        with pytest.raises(LLMSeRError, match=words):
            ex.expand_plan(_plan(runs=[{"dataset": "d", "model": "SASRec", "seeds": [1], "config_files": files}]))


def test_results_dir_template():
    plan = _plan()
    assert ex.results_dir_for(plan, "d") == Path("results/d")
    assert ex.results_dir_for(plan, "d", "/tmp/x/{dataset}") == Path("/tmp/x/d")
    two = _plan(runs=_plan()["runs"] + [{"dataset": "e", "model": "SASRec", "seeds": [1]}], results_dir="out")
    assert ex.results_dir_for(two, "e") == Path("out/e")  # several datasets: one folder each


# -------------------------------------------------------------------------------------------------- maths --
def test_mean_std_and_relative_gain():
    m, s, n = ex.mean_std([0.1, 0.2, 0.3])
    assert math.isclose(m, 0.2) and math.isclose(s, 0.1) and n == 3  # sample std (n - 1)
    assert ex.mean_std([0.5]) == (0.5, None, 1)
    assert ex.mean_std([]) == (None, None, 0)
    assert ex.mean_std([None, float("nan"), 1.0]) == (1.0, None, 1)
    assert math.isclose(ex.relative_gain(0.2, 0.3), 50.0)
    assert math.isclose(ex.relative_gain(0.4, 0.3), -25.0)
    assert ex.relative_gain(0.0, 0.3) is None and ex.relative_gain(None, 0.3) is None
    assert ex.fmt_mean_std(0.2, 0.1) == "0.2000 ± 0.1000" and ex.fmt_mean_std(0.5, None) == "0.5000"
    assert ex.fmt_gain(50.0) == "+50.0%" and ex.fmt_gain(-25.0) == "-25.0%" and ex.fmt_gain(None) == "—"
    rows = ex.group_rows([("a", 1), ("b", 2), ("a", 3)], lambda t: t[0])
    assert list(rows) == ["a", "b"] and rows["a"] == [("a", 1), ("a", 3)]


# --------------------------------------------------------------------------------------------- jsonl files --
def test_appends_survive_a_torn_last_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    ex.append_jsonl(path, {"id": "a", "v": 1})
    ex.append_jsonl(path, {"id": "b", "v": 2})
    with open(path, "a") as f:
        f.write('{"id": "c", "v": ')  # a writer killed mid-line
    records, bad = ex.read_jsonl(path)
    assert [r["id"] for r in records] == ["a", "b"] and bad == 1
    ex.append_jsonl(path, {"id": "d", "v": 4})  # starts on a new line: the torn fragment stays alone
    records, bad = ex.read_jsonl(path)
    assert [r["id"] for r in records] == ["a", "b", "d"] and bad == 1
    ex.append_jsonl(path, {"id": "a", "v": 5})  # a repeated id: the last record wins
    runs, _ = ex.load_runs(tmp_path)
    assert {r["id"]: r["v"] for r in runs} == {"a": 5, "b": 2, "d": 4}


# ------------------------------------------------------------------------------------------------- report --
def _result(ndcg, hit, groups, n=100):
    def proto(p):
        return {"protocol": p, "overall": {"n": n, "hit@10": hit, "ndcg@10": ndcg},
                "groups": [{"name": g, "range": r, "n": gn, "hit@10": hit, "ndcg@10": v}
                           for (g, r, gn), v in zip([("tail", "<=3", 40), ("medium", "4-6", 35), ("head", ">=7", 25)],
                                                    groups)]}
    return {"uni100": proto("uni100"), "full": proto("full")}


def _record(model, method, seed, ndcg, group="main", label=None, x=None, overrides=None, groups=None, aug=None):
    overrides = overrides or {}
    groups = groups or [ndcg, ndcg, ndcg]
    return {
        "id": ex.spec_id("d", model, method, seed, overrides), "dataset": "d", "model": model, "method": method,
        "seed": seed, "overrides": overrides, "group": group, "label": label, "x": x,
        "started": "2025-01-01T00:00:00+00:00", "finished": "2025-01-01T00:01:00+00:00", "wall_s": 60.0,
        "peak_rss_mb": 2048.0, "peak_gpu_mb": None, "best_valid_score": ndcg / 2, "train_eval_s": 30.0,
        "valid": _result(ndcg / 2, 0.5, groups), "test": _result(ndcg, 0.5, groups),
        "aug": aug if method == "llmser" else None, "settings": {"valid_metric": "NDCG@10"},
        "env": {"device_name": "cpu"},
    }


AUG = {"backend": "offline", "llm_model": None, "timings_s": {"ccg": 10.0, "snf": 2.0, "arv": 3.0, "total": 15.0},
       "llm": None, "reused": False}


def test_report_maths_tables_and_plots_from_a_handmade_runs_file(tmp_path):
    recs = [_record("SASRec", "none", s, v, groups=[v, 0.1, 0.1]) for s, v in zip((42, 43, 44), (0.1, 0.2, 0.3))]
    recs += [_record("SASRec", "llmser", s, 0.3, groups=[0.3, 0.1, 0.1], aug=AUG) for s in (42, 43, 44)]
    recs += [_record("SASRec", "llmser", s, 0.15, group="ablation", label="no decay", overrides={"b": 1},
                     aug=AUG) for s in (42, 43)]
    recs += [_record("SASRec", "llmser", 42, v, group="sweep:b", x=x, overrides={"b": x}, aug=AUG)
             for x, v in ((0.1, 0.2), (0.3, 0.25), (1, 0.15))]
    for r in recs:
        ex.append_jsonl(tmp_path / "runs.jsonl", r)
    path = ex.write_report(tmp_path, "python -m recbole_llmser.experiments plan.yaml")
    text = path.read_text()
    # main table: mean ± sample std over the seeds, the gain of llmser over none on the means
    assert "0.2000 ± 0.1000" in text and "0.3000 ± 0.0000" in text
    assert "+50.0%" in text  # (0.3 - 0.2) / 0.2
    assert "| SASRec | gain llmser vs none |" in text
    assert "NDCG@10 tail <=3 (n=40)" in text and "overall (n=100)" in text  # group ranges and sizes
    assert "valid NDCG@10" in text and "validation metrics only" in text
    assert "`offline`" in text and "python -m recbole_llmser.experiments plan.yaml" in text
    # ablation table relative to its first row; sweep table sorted by x
    assert "## Ablations (SASRec)" in text and "no decay" in text
    assert "## Sweep of `b`" in text and "-25.0%" not in text.split("## Sweep")[0].split("## Ablations")[1]
    sweep = text.split("## Sweep of `b`")[1].split("## Cost")[0]
    rows = [ln for ln in sweep.splitlines() if ln.startswith("| SASRec | llmser |")][:3]
    assert [ln.split(" | ")[2] for ln in rows] == ["0.1", "0.3", "1"]
    assert [ln.rstrip(" |").endswith("✓") for ln in rows] == [False, True, False]  # highest valid NDCG@10
    # cost table: stage timings from the augmentation summary fields
    cost = text.split("## Cost")[1]
    assert "| 10.0 | 2.0 | 3.0 | 30.0 | 60.0 |" in cost and "2.00" in cost
    for png in ("main_ndcg10_uni100.png", "main_ndcg10_full.png", "sweep_b_ndcg10_full.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files
    assert ex.sweep_series([(r, "sweep:b", None, r["x"]) for r in recs if r["group"] == "sweep:b"], "full")[
        ("SASRec", "llmser")][0][1]["overall"][0] == 0.2


def test_gains_compare_the_seeds_both_rows_have(tmp_path):
    recs = [_record("BERT4Rec", "none", s, v) for s, v in zip((42, 43, 44), (0.1, 0.2, 0.3))]
    recs += [_record("BERT4Rec", "llmser", 42, 0.15, aug=AUG)]  # one seed so far
    recs += [_record("SASRec", m, s, v) for m, v in (("none", 0.2), ("llmser", 0.3)) for s in (42, 43)]
    for r in recs:
        ex.append_jsonl(tmp_path / "runs.jsonl", r)
    main = ex.write_report(tmp_path, "cmd").read_text().split("## Main results")[1].split("\n## ")[0]
    gains = [ln for ln in main.splitlines() if ln.startswith("| BERT4Rec | gain")]
    assert len(gains) == 2 and all(ln.startswith("| BERT4Rec | gain llmser vs none (seeds both have: 42) |")
                                   for ln in gains)  # one per protocol
    for ln in gains:  # seed 42 against seed 42 (+50 %), not against the 3-seed mean 0.2 (−25 %)
        assert "+50.0%" in ln and "-25.0%" not in ln
    assert "| BERT4Rec | none | 3 | " in main  # the method rows still average all their seeds
    assert "| SASRec | gain llmser vs none | " in main  # same seeds: no label
    assert ex.matched_seeds(recs[:1], recs[1:2])[0] == " (seeds both have: none)"
    # an ablation table's Δ against its first row: the same rule
    entries = [(r, "ablation", r["method"], None) for r in recs[:4]]
    delta = ex.labelled_table(entries, "full").splitlines()[3].split(" | ")[-3]
    assert delta == "+50.0% (seeds both have: 42)"


def test_results_index_summarises_each_folder_from_its_runs(tmp_path):
    beauty, fashion = tmp_path / "beauty", tmp_path / "fashion"
    for r in [_record("SASRec", "none", s, v, groups=[v / 2, 0.1, 0.1]) for s, v in zip((42, 43, 44), (0.1, 0.2, 0.3))]:
        ex.append_jsonl(beauty / "runs.jsonl", r)
    ex.append_jsonl(beauty / "runs.jsonl", _record("SASRec", "llmser", 42, 0.5, group="ablation", label="a"))
    ex.append_jsonl(fashion / "runs.jsonl", _record("GRU4Rec", "llmser", 42, 0.4, aug=AUG))
    for folder in (beauty, fashion):
        ex.write_report(folder, "cmd")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "b.md").write_text("# Bench (generated by `python benchmarks/b.py`)\n")
    text = ex.write_index(tmp_path).read_text()
    assert text.splitlines()[2] == ex.index.MARKER
    row = "| `beauty/` | d | 4 | — | [report.md](beauty/report.md) | [main_ndcg10_full](beauty/main_ndcg10_full.png)"
    assert row in text
    # the main tables' runs only (the ablation run is not summarised): mean ± std over seeds, overall and tail
    assert "| `beauty` | SASRec | none | 3 | tail <=3 (n=40) | 0.2000 ± 0.1000 | 0.1000 ± 0.0500 | " \
           "0.2000 ± 0.1000 | 0.1000 ± 0.0500 |" in text
    assert "| `fashion` | GRU4Rec | llmser | 1 | tail <=3 (n=40) | 0.4000 | 0.4000 | 0.4000 | 0.4000 |" in text
    assert "NDCG@10 overall, uni100 | NDCG@10 tail, uni100 | NDCG@10 overall, full" in text
    assert "* [b.md](benchmarks/b.md): Bench (generated by `python benchmarks/b.py`)" in text
    assert ex.write_index(tmp_path).read_text() == text  # no clock in it: unchanged results, unchanged index
    (tmp_path / "README.md").write_text("my notes\n")  # a README.md the runner did not write is left alone
    assert ex.write_index(tmp_path) is None and (tmp_path / "README.md").read_text() == "my notes\n"
    # where the index goes: the folder holding one results folder per dataset, else nowhere
    plan = _plan()
    assert ex.results_root_for(plan) == Path("results")
    assert ex.results_root_for(plan, "/tmp/x/{dataset}/") == Path("/tmp/x")
    assert ex.results_root_for(_plan(results_dir="out")) is None
    assert ex.results_root_for(_plan(results_dir="{dataset}/out")) is None


def test_runs_table_shows_kept_and_trained_epochs_and_names_runs_stopped_at_the_cap(tmp_path):
    capped, early, old = (_record("SASRec", m, 42, 0.2) for m in ("none", "llmser", "x"))
    for r, (kept, trained) in ((capped, (20, 20)), (early, (9, 14))):
        r.update(best_epoch=kept, epochs_trained=trained, settings={**r["settings"], "epochs": 20})
    for r in (capped, early, old):  # `old`: recorded before epochs were, shown as "—"
        ex.append_jsonl(tmp_path / "runs.jsonl", r)
    runs = ex.write_report(tmp_path, "cmd").read_text().split("## Runs")[1]
    assert "| 20 / 20 / 20 |" in runs and "| 9 / 14 / 20 |" in runs and "| — |" in runs
    assert "1 of 2 runs with a recorded kept epoch kept their last epoch at the `epochs` cap" in runs
    assert capped["id"] in runs.split("cap, i.e.")[1] and early["id"] not in runs.split("cap, i.e.")[1]
    assert not ex.stopped_at_cap({**capped, "best_epoch": 19}) and not ex.stopped_at_cap(old)


def test_validation_chooses_the_row_with_the_best_mean_validation_ndcg():
    plain = [_record("SASRec", "none", s, 0.2) for s in (42, 43)]          # valid 0.1 (ndcg / 2)
    better_test = [_record("SASRec", "llmser", 42, 0.3)]                   # valid 0.15
    rows = [plain, better_test, [_record("SASRec", "llmser", 42, 0.3, overrides={"x": 1})]]  # a tie: first wins
    assert ex.validation_choice(rows, "full") == 1
    for r in better_test[0]["valid"].values():  # validation, not test, decides
        r["overall"]["ndcg@10"] = 0.05
    assert ex.validation_choice(rows, "full") == 2
    assert ex.validation_choice([[{"id": "x"}]], "full") is None  # no validation results: no choice
    assert ex.selection_protocol(plain) == "full"
    assert ex.selection_protocol([{"valid": {"uni100": {}}}]) == "uni100"
    entries = [(r, "ablation", label, None) for label, rs in (("plain", plain), ("aug", better_test)) for r in rs]
    for p in ("uni100", "full"):  # the same row in each protocol's table (chosen under full ranking)
        table = ex.labelled_table(entries, p)
        rows = [ln for ln in table.splitlines()[2:] if ln.startswith("|")]  # a footnote follows (no per_user)
        assert [ln.rstrip(" |").endswith("✓") for ln in rows] == [True, False]


# -------------------------------------------------------------------------------- running (subprocesses) --
SMALL = dict(ccg_epochs=1, ccg_max_len=10,
             ccg_model_args={"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1},
             semantic_backend="tfidf", ccg_num_candidates=8, snf_num_picks=6, aug_num_pseudo=4,
             arv_num_candidates=5)


def _tiny_plan(tmp_path, data, runs, name="tiny"):
    common = {k: v for k, v in tiny_config_dict(data, **SMALL).items() if k != "method"}
    plan = {"name": name, "results_dir": str(tmp_path / "results" / "{dataset}"), "common": common, "runs": runs}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_plan_runs_each_spec_once_and_resumes(tiny_data, tmp_cwd, capsys):
    data, sequences = tiny_data
    plan = _tiny_plan(tmp_cwd, data, [{"dataset": "tiny", "model": "SASRec", "method": ["none", "llmser"],
                                        "seeds": [42]}])
    assert ex.main([str(plan)]) == 0
    out = capsys.readouterr().out
    assert "2 to run" in out and "2 run(s) finished, 0 failed" in out
    results = tmp_cwd / "results" / "tiny"
    runs, bad = ex.load_runs(results)
    assert bad == 0 and len(runs) == 2 and (results / "runs.jsonl").read_text().count("\n") == 2
    by_method = {r["method"]: r for r in runs}
    for r in runs:
        assert r["test"]["full"]["overall"]["n"] == len(sequences)
        assert r["valid"]["uni20"]["groups"] and r["best_valid_score"] is not None
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_mb"] > 50 and r["started"] <= r["finished"]
        assert r["settings"]["epochs"] == 1 and r["env"]["device_name"] == "cpu"
        assert r["epochs_trained"] == 1 and r["best_epoch"] == 1 and len(r["valid_curve"]) == 1
    aug = by_method["llmser"]["aug"]
    assert aug["backend"] == "offline" and set(aug["timings_s"]) >= {"ccg", "snf", "arv", "total"}
    assert by_method["none"]["aug"] is None
    report = (results / "report.md").read_text()
    assert "| SASRec | gain llmser vs none |" in report and (results / "main_ndcg10_full.png").is_file()
    assert f"python -m recbole_llmser.experiments {plan}" in report
    index = (tmp_cwd / "results" / "README.md").read_text()  # the index beside the results folders
    assert "[report.md](tiny/report.md)" in index and "| `tiny` | SASRec | llmser | 1 |" in index

    # re-run: nothing new runs; the dry run shows both as done
    assert ex.main([str(plan)]) == 0
    assert "0 to run" in capsys.readouterr().out
    assert len(ex.load_runs(results)[0]) == 2
    assert ex.main([str(plan), "--dry_run"]) == 0
    assert capsys.readouterr().out.count(" done") >= 2
    # --report_only regenerates from runs.jsonl
    (results / "report.md").unlink()
    (tmp_cwd / "results" / "README.md").unlink()
    assert ex.main([str(plan), "--report_only"]) == 0
    assert "--report_only" in (results / "report.md").read_text()
    assert "[report.md](tiny/report.md)" in (tmp_cwd / "results" / "README.md").read_text()
    # ... with the plan's current layout: a new group and label (same runs, same ids) move the runs, nothing runs
    _tiny_plan(tmp_cwd, data, [{"dataset": "tiny", "model": "SASRec", "method": ["none", "llmser"], "seeds": [42],
                                "group": "ablation", "label": "relabelled"}])
    assert ex.main([str(plan), "--report_only"]) == 0
    report = (results / "report.md").read_text()
    assert "## Ablations (SASRec)" in report and "| relabelled |" in report and "## Main results" not in report
    assert len(ex.load_runs(results)[0]) == 2


def test_a_plan_run_keeps_per_user_ranks_and_reports_p_values(tiny_data, tmp_cwd, capsys):
    """Each run's record names its per-user ranks file; the main table's p-value row tests llmser against none over
    the users, with the two seeds paired, and equals the paired test recomputed from those files."""
    import numpy as np

    from recbole_llmser.evaluation import read_per_user, row_metrics

    data, sequences = tiny_data
    plan = _tiny_plan(tmp_cwd, data, [{"dataset": "tiny", "model": "SASRec", "method": ["none", "llmser"],
                                        "seeds": [42, 43]}])
    assert ex.main([str(plan)]) == 0
    results = tmp_cwd / "results" / "tiny"
    runs = ex.load_runs(results)[0]
    assert len(runs) == 4
    for r in runs:
        # kept beside runs.jsonl (a copy of the run folder's file, which a new checkout would not have)
        assert Path(r["per_user"]).resolve() == (results / "per_user" / f"{r['id']}.npz").resolve()
        kept, own = (read_per_user(f)["splits"] for f in (r["per_user"], Path(r["run_dir"]) / "per_user.npz"))
        assert sorted(kept["test"]["user"]) == sorted(own["test"]["user"]) == sorted(sequences)
    report = (results / "report.md").read_text()
    assert "p-values need runs" not in report  # every run kept its ranks: no footnote
    by_key = {(r["method"], r["seed"]): read_per_user(r["per_user"])["splits"]["test"] for r in runs}
    for protocol in ("uni20", "full"):
        table = report.split(f"### Test, protocol `{protocol}`")[1].split("![")[0]
        row = next(ln for ln in table.splitlines() if ln.startswith("| SASRec | p-value llmser vs none |"))
        cells = [c.strip() for c in row.strip("|").split("|")][4:]
        assert len(cells) == 8 and "—" not in cells  # HR@10 and NDCG@10, overall and 3 groups

        def ndcg(method, seed):  # per-user NDCG@10 in the order of the users' tokens
            split = by_key[(method, seed)]
            return row_metrics(split["ranks"][protocol], 10)[1][np.argsort(split["user"])]

        expected = ex.paired_test([ndcg("none", s) for s in (42, 43)], [ndcg("llmser", s) for s in (42, 43)])
        assert expected.n == len(sequences) and cells[1] == ex.fmt_p(expected.p)
    # --report_only writes the same p-values
    assert ex.main([str(plan), "--report_only"]) == 0
    again = (results / "report.md").read_text()
    assert [ln for ln in again.splitlines() if "p-value" in ln] == [ln for ln in report.splitlines() if "p-value" in ln]

    # a run whose ranks file is lost (or was recorded before runs kept one) runs again with --rerun_missing_ranks
    lost = next(r for r in runs if r["method"] == "none" and r["seed"] == 43)
    Path(lost["per_user"]).unlink()
    shutil.rmtree(lost["run_dir"])  # as in a new checkout: saved/ is not kept
    assert "p-values need runs" in ex.write_report(results, "cmd").read_text()
    capsys.readouterr()
    assert ex.main([str(plan), "--dry_run"]) == 0 and "4 runs: 4 done, 0 to run" in capsys.readouterr().out
    assert ex.main([str(plan), "--dry_run", "--rerun_missing_ranks"]) == 0
    dry = capsys.readouterr().out
    assert "4 runs: 3 done, 1 to run" in dry and f"{lost['id']}" in dry and "recorded without per-user ranks" in dry
    assert ex.main([str(plan), "--rerun_missing_ranks"]) == 0
    printed = capsys.readouterr().out
    assert f"[1/1] tiny/SASRec/none/seed43 (id {lost['id']}" in printed
    assert "1 run(s) finished, 0 failed, 3 skipped" in printed
    rerun = {r["id"]: r for r in ex.load_runs(results)[0]}
    assert len(rerun) == 4 and Path(rerun[lost["id"]]["per_user"]).is_file()
    assert rerun[lost["id"]]["finished"] >= lost["finished"]
    report = (results / "report.md").read_text()
    assert "p-values need runs" not in report
    rows = [ln for ln in report.splitlines() if ln.startswith("| SASRec | p-value llmser vs none |")]
    assert len(rows) == 2 and not any("—" in ln for ln in rows)


def test_a_stopped_run_resumes_when_the_plan_runs_again(tiny_data, tmp_cwd, monkeypatch, capsys):
    """A run stopped after its first validated epoch (here in-process, as Ctrl-C or a timeout would) leaves its
    training state in the runner's folder for it; the plan's next run continues it and records where."""
    from recbole_llmser.quick_start import run

    data, _ = tiny_data
    plan = _tiny_plan(tmp_cwd, data, [{"dataset": "tiny", "model": "SASRec", "method": "none", "seeds": [42],
                                        "overrides": {"epochs": 3}}])
    (spec,) = ex.expand_plan(ex.load_plan(plan))
    with stopped_after_epoch(monkeypatch, 0, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        run("SASRec", "tiny", config_dict=spec["config_dict"], cmd_args=[])
    folder = tmp_cwd / "saved" / "tiny" / f"SASRec-none-{spec['id']}"
    assert (folder / "train_state.pth").is_file()
    assert ex.run_folder(spec).resolve() == folder

    capsys.readouterr()
    assert ex.main([str(plan), "--dry_run"]) == 0
    assert "to run (partly trained: resumes)" in capsys.readouterr().out
    assert ex.main([str(plan)]) == 0
    (record,) = ex.load_runs(tmp_cwd / "results" / "tiny")[0]
    assert record["resumed_at_epoch"] == 2 and record["epochs_trained"] == 3 and len(record["valid_curve"]) == 3
    assert record["run_dir"] == str(folder) and not (folder / "train_state.pth").exists()
    report = (tmp_cwd / "results" / "tiny" / "report.md").read_text()
    cost = next(line for line in report.splitlines() if line.startswith("| SASRec none |"))
    assert cost.split("|")[10].strip() == "—"  # wall s: the resumed run's covers only its last attempt

    # a run that finished in its folder but was never recorded (runner stopped in between) is recorded, not retrained
    stamps = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    (tmp_cwd / "results" / "tiny" / "runs.jsonl").unlink()
    assert ex.main([str(plan), "--dry_run"]) == 0
    assert "to run (finished in its folder: recorded without training)" in capsys.readouterr().out
    assert ex.main([str(plan)]) == 0
    (again,) = ex.load_runs(tmp_cwd / "results" / "tiny")[0]
    assert again["finished_earlier"] is True and record["finished_earlier"] is False
    assert again["test"] == record["test"] and again["valid_curve"] == record["valid_curve"]
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == stamps  # no file of the run was rewritten
    report = (tmp_cwd / "results" / "tiny" / "report.md").read_text()
    cost = next(line for line in report.splitlines() if line.startswith("| SASRec none |"))
    assert cost.split("|")[10].strip() == "—"  # nothing was trained: no wall time to report


def test_a_failing_run_is_logged_and_the_plan_continues(tiny_data, tmp_cwd, capsys):
    data, _ = tiny_data
    plan = _tiny_plan(tmp_cwd, data, [
        {"dataset": "tiny", "model": "SASRec", "method": "none", "seeds": [42], "overrides": {"dct_mode": "bogus"}},
        {"dataset": "tiny", "model": "SASRec", "method": "none", "seeds": [42]},
    ])
    assert ex.main([str(plan)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "1 run(s) finished, 1 failed" in out
    results = tmp_cwd / "results" / "tiny"
    failures, _ = ex.read_jsonl(results / "failures.jsonl")
    assert len(failures) == 1 and "dct_mode" in failures[0]["error"] and failures[0]["returncode"] == 2
    assert "dct_mode" in failures[0]["stderr_tail"] and Path(failures[0]["log"]).is_file()
    runs, _ = ex.load_runs(results)
    assert len(runs) == 1 and runs[0]["overrides"].get("dct_mode") is None
    assert "1 run(s) with failed attempts" in (results / "report.md").read_text()
    assert not list((results / "_work" / "tmp").iterdir())  # job files cleaned up


def test_report_tables_hold_only_the_runs_of_recorded_plans(tmp_path):
    """A changed plan entry runs under a new id; the old record stays in runs.jsonl but leaves the tables."""
    old = _record("SASRec", "none", 42, 0.9, overrides={"epochs": 1})
    new = [_record("SASRec", "none", s, 0.2, overrides={"epochs": 2}) for s in (42, 43)]
    for r in [old, *new]:
        ex.append_jsonl(tmp_path / "runs.jsonl", r)
    plan = {"name": "p", "runs": [{"dataset": "d", "model": "SASRec", "method": "none", "seeds": [42, 43],
                                   "overrides": {"epochs": 2}}]}
    specs = ex.expand_plan(plan)
    assert {s["id"] for s in specs} == {r["id"] for r in new}
    ex.record_plan(plan, specs, tmp_path, "python -m recbole_llmser.experiments p.yaml")
    text = ex.write_report(tmp_path).read_text()
    main = text.split("## Main results")[1].split("## Cost")[0]
    assert "0.2000 ± 0.0000" in main and "0.9000" not in main
    assert "1 run(s) in `runs.jsonl` are listed by no recorded plan" in text
    assert "— (in no plan)" in text.split("## Runs")[1]
    assert "Warning" not in text
    # the same row averaging two configurations gets a warning
    ex.record_plan({**plan, "runs": plan["runs"] + [{"dataset": "d", "model": "SASRec", "method": "none",
                                                     "seeds": [42], "overrides": {"epochs": 1}}]},
                   specs + ex.expand_plan({"name": "p", "runs": [{"dataset": "d", "model": "SASRec", "method": "none",
                                                                  "seeds": [42], "overrides": {"epochs": 1}}]}),
                   tmp_path, "cmd")
    text = ex.write_report(tmp_path).read_text()
    assert "**Warning**: row(s) SASRec none average runs with different overrides" in text


def test_recording_an_unchanged_plan_leaves_its_file_alone(tmp_path, monkeypatch):
    clock = iter(f"2026-01-01T00:00:0{i}+00:00" for i in range(10))
    monkeypatch.setattr(store, "_now", lambda: next(clock))
    plan = {"name": "p", "runs": [{"dataset": "d", "model": "SASRec", "method": "none", "seeds": [42],
                                   "overrides": {"epochs": 2}}]}
    path = tmp_path / "plans" / "p.json"
    ex.record_plan(plan, ex.expand_plan(plan), tmp_path, "cmd")
    first = path.read_text()
    assert json.loads(first)["updated"]
    ex.record_plan(plan, ex.expand_plan(plan), tmp_path, "cmd")
    assert path.read_text() == first
    plan["runs"][0]["seeds"] = [42, 43]
    ex.record_plan(plan, ex.expand_plan(plan), tmp_path, "cmd")
    changed = json.loads(path.read_text())
    assert len(changed["specs"]) == 2 and changed["first_recorded"] == json.loads(first)["first_recorded"]
    assert changed["updated"] > json.loads(first)["updated"]


def test_a_run_past_its_time_limit_is_killed_and_logged(tmp_cwd):
    spec = ex.expand_plan({"name": "t", "runs": [{"dataset": "tiny", "model": "SASRec", "method": "none",
                                                  "seeds": [1]}]})[0]
    rec = ex.run_spec(spec, tmp_cwd / "res", timeout=0.3)  # the child's imports alone take longer
    assert not rec["ok"] and rec["kind"] == "timeout" and "timed out after 0.3 s" in rec["error"]
    failures, _ = ex.read_jsonl(tmp_cwd / "res" / "failures.jsonl")
    assert [f["id"] for f in failures] == [spec["id"]] and not (tmp_cwd / "res" / "runs.jsonl").exists()
    assert runner._exit_description(-9).startswith("killed by SIGKILL")


def test_two_runners_never_share_a_results_folder(tmp_path):
    with store._DirLock(tmp_path):
        with pytest.raises(LLMSeRError, match="another experiments runner"):
            with store._DirLock(tmp_path):
                pass
    with store._DirLock(tmp_path):  # released
        pass


def test_items_above_target_reads_a_finished_run(tiny_data, tmp_cwd, capsys):
    import importlib.util
    from pathlib import Path

    from recbole_llmser.quick_start import run
    from tests.conftest import tiny_config_dict

    data, sequences = tiny_data
    result = run("SASRec", "tiny", config_dict=tiny_config_dict(data), cmd_args=[])
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "analysis" / "items_above_target.py"
    spec = importlib.util.spec_from_file_location("items_above_target", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    module.main([result["run_dir"], "--min_len", "1", "--max_above", "1000"])
    out = capsys.readouterr().out
    top10 = float(out.split("top 10: ")[1].split()[0])
    # the same checkpoint, re-evaluated: HR@10 of users with >= 1 training item under full ranking
    assert top10 == pytest.approx(result["test"]["full"]["overall"]["hit@10"], abs=1e-3)
    assert "items most often above the target" in out and "most common test item: " in out


def test_the_report_says_when_validation_rows_repeat_a_few_pairs(tmp_path):
    """The latest run that checked its dataset names the repeated validation rows in the report's intro; a dataset
    without them (or runs recorded before the check) gets no paragraph."""
    old = _record("SASRec", "none", 42, 0.2)
    ex.append_jsonl(tmp_path / "runs.jsonl", old)
    assert "Validation rows repeat" not in ex.write_report(tmp_path, "cmd").read_text()
    new = _record("SASRec", "llmser", 42, 0.3, aug=AUG)
    new["finished"] = "2025-01-02T00:00:00+00:00"
    new["shared_rows"] = {"valid": {"n_rows": 40, "pairs": [{"rows": 10, "share": 0.25, "history": ["a", "b"],
                                                             "target": "a"}]},
                          "test": {"n_rows": 40, "pairs": []}}
    ex.append_jsonl(tmp_path / "runs.jsonl", new)
    text = ex.write_report(tmp_path, "cmd").read_text()
    assert (f"**Validation rows repeat a few (history, target) pairs** (d, run `{new['id']}`) — validation: 10 of 40 "
            "rows (25%) repeat 1 (history, target) pair(s) exactly") in text
    assert "(a b -> a: 10 rows)" in text
