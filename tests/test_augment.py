"""The augmentation stage end to end on tiny data: offline, through a local OpenAI-compatible server, text-free."""

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from recbole_llmser import helper_models
from recbole_llmser.augment import backends
from recbole_llmser.cli import main
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.quick_start import run
from recbole_llmser.sequences import user_sequences
from tests.conftest import spy_llm_requests, tiny_config_dict, write_tiny_dataset
from tests.llm_server import FakeLLMServer

SECRET = "sk-test-SECRET-4242"
SMALL = dict(method="llmser", stage="augment", ccg_epochs=1, semantic_backend="tfidf", ccg_num_candidates=8,
             snf_num_picks=6, aug_num_pseudo=4, arv_num_candidates=5, llm_max_retries=1, llm_timeout=5)


def _augment(data, **extra):
    cfg = tiny_config_dict(data, **{**SMALL, **extra})
    out = run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    path = Path(out["artifact"])
    records = [json.loads(line) for line in path.read_text().splitlines()]
    summary = json.loads((path.parent / "summary.json").read_text())
    return path, records, summary


def _check_records(records, sequences, k):
    assert {r["user_id"] for r in records} == set(sequences)
    for r in records:
        assert len(r["pseudo_items"]) == 4 and len(set(r["pseudo_items"])) == 4
        assert all(1 <= rank <= k for rank in r["ccg_rank"])  # always among the CCG candidates
        prefix = sequences[r["user_id"]][:-2]
        assert not set(r["pseudo_items"]) & set(prefix)  # CCG excludes the training prefix
        assert 0.0 <= r["w_tilde"] <= r["w"] <= 1.0
        if r["arv_status"] == "verified":
            assert r["masked_item"] == prefix[-1]


def test_offline_backend(tiny_data, tmp_cwd):
    data, sequences = tiny_data
    path, records, summary = _augment(data)
    _check_records(records, sequences, 8)
    assert summary["backend"] == "offline" and all(r["backend"] == "offline" for r in records)
    assert summary["augmented_users"] == len(sequences)
    assert set(summary["timings_s"]) == {"ccg", "item_vectors", "snf", "arv", "total"}
    # the same configuration reuses the artifact; the helper models are reused by name
    again, _, _ = _augment(data)
    assert again == path
    models = list((path.parent.parent / "models").iterdir())
    assert len(models) == 2 and {m.name.split("-")[1] for m in models} == {"reverse", "forward"}


def test_llm_backend_cached_rerun_faults_and_secrets(tiny_data, tmp_cwd, monkeypatch, caplog):
    data, sequences = tiny_data
    asked = spy_llm_requests(monkeypatch)
    with FakeLLMServer(injection="every") as server:
        server.rate_refusal, server.rate_hallucinate, server.rate_malformed = 0.1, 0.1, 0.05
        llm = dict(llm_base_url=server.base_url, llm_api_key=SECRET, llm_model="fake-llm")
        path, records, summary = _augment(data, **llm)
        assert server.calls() == 2 * len(sequences)
        assert all(r.headers.get("authorization") == f"Bearer {SECRET}" for r in server.records)
        _check_records(records, sequences, 8)
        assert all(r["backend"] == "llm" and r["llm_model"] == "fake-llm" for r in records)
        assert summary["llm"]["calls"] == 2 * len(sequences)
        assert summary["snf_status"].get("refusal", 0) + summary["snf_status"].get("hallucinated", 0) > 0

        failed = sum(summary["llm"]["failures"].values())
        assert failed > 0  # injected malformed bodies: not cached, answered by the fallback
        # a second run told not to re-ask failed calls reuses the artifact: zero calls
        assert _augment(data, llm_retry_failed=False, **llm)[1] == records and server.calls() == 2 * len(sequences)
        # without the artifact, the LLM cache answers everything that succeeded; only what is not in it is asked:
        # the failed SNF requests, the failed ARV requests, and the ARV requests of users whose SNF answer
        # changes (ARV's candidates follow the kept pseudo items, so a retried SNF call may change its prompt)
        (cache_file,) = tmp_cwd.rglob("llm_cache.jsonl")
        cached = {json.loads(line)["key"] for line in cache_file.read_text().splitlines()}
        failed_ids = [request.id for key, request in dict(asked).items() if key not in cached]
        failed_snf = {rid.split(":", 1)[1] for rid in failed_ids if rid.startswith("snf:")}
        failed_arv = {rid.split(":", 1)[1] for rid in failed_ids if rid.startswith("arv:")}
        assert len(failed_snf) + len(failed_arv) == failed
        path.unlink()
        server.rate_refusal = server.rate_hallucinate = server.rate_malformed = 0.0
        seen = [request for _, request in asked]  # every prompt of the first run (the leakage check below)
        del asked[:]
        _, records2, summary2 = _augment(data, **llm)
        again = {key: request.id for key, request in asked if key not in cached}
        assert server.calls() == 2 * len(sequences) + len(again)
        assert summary2["llm"]["cache_hits"] == 2 * len(sequences) - len(again)
        assert {rid.split(":", 1)[1] for rid in again.values() if rid.startswith("snf:")} == failed_snf
        asked_arv = {rid.split(":", 1)[1] for rid in again.values() if rid.startswith("arv:")}
        assert failed_arv <= asked_arv <= failed_arv | failed_snf
        _check_records(records2, sequences, 8)

    # leakage: the history part of every prompt holds only training items of that user
    titles = {f"i{i}": f"product number {i} in colour {['red', 'blue', 'green'][i % 3]}" for i in range(1, 51)}
    for request in seen:
        user = request.id.split(":", 1)[1]
        held_out = {titles[i] for i in sequences[user][-2:]}
        history = [line[2:] for line in request.messages[-1]["content"].splitlines() if line.startswith("- ")]
        assert history and not held_out & set(history), request.id
    # the key is nowhere on disk or in the log
    for file in tmp_cwd.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file
    assert SECRET not in caplog.text


@contextlib.contextmanager
def _recbole_log_file():
    """Inside the block RecBole's init_logger attaches its log file, as in a real run: pytest's handlers on the root
    logger make its ``logging.basicConfig`` a no-op otherwise."""
    root = logging.getLogger()
    handlers, level = root.handlers, root.level
    root.handlers = []
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers = handlers
        root.setLevel(level)


def _cached_keys(root):
    (cache_file,) = Path(root).rglob("llm_cache.jsonl")
    return {json.loads(line)["key"] for line in cache_file.read_text().splitlines()}


def _users(pairs, stage):
    """Users of the request ids of one stage (ids are ``<stage>:<user>``)."""
    return {rid.split(":", 1)[1] for _, rid in pairs if rid.startswith(f"{stage}:")}


def test_failed_llm_calls_are_listed_then_reasked_when_the_endpoint_is_back(tiny_data, tmp_cwd, monkeypatch):
    data, sequences = tiny_data
    asked = spy_llm_requests(monkeypatch)
    with FakeLLMServer(injection="sticky") as server:
        server.rate_500 = 0.25  # the same prompts fail on every attempt: the client's own retries cannot help
        llm = dict(llm_base_url=server.base_url, llm_model="fake-llm")
        path, records, summary = _augment(data, **llm)
        failed = {stage: set(users) for stage, users in summary["llm_failed"].items()}
        assert failed["snf"] and failed["arv"] and summary["llm_reasked_users"] == 0
        assert {kind for users in summary["llm_failed"].values() for kind in users.values()} == {"server"}
        cached = _cached_keys(tmp_cwd)  # failed calls are not cached: the listed users are exactly theirs
        not_cached = [(key, request.id) for key, request in asked if key not in cached]
        assert _users(not_cached, "snf") == failed["snf"] and _users(not_cached, "arv") == failed["arv"]
        by_user = {r["user_id"]: r for r in records}
        assert set(by_user) == set(sequences)  # snf_fallback: ccg_order keeps every user
        for user, r in by_user.items():
            assert r["llm_failed"] == ([s for s in ("snf", "arv") if user in failed[s]] or None), user
        assert all(by_user[user]["ccg_rank"] == [4, 3, 2, 1] for user in failed["snf"])  # CCG's top M

        # the endpoint is back: only the failed calls reach it (plus the ARV calls of users whose SNF answer, and
        # so whose ARV candidates, changed); the artifact is rewritten in place
        server.rate_500 = 0.0
        server.reset()
        del asked[:]
        n_failed = len(failed["snf"] | failed["arv"])
        with _recbole_log_file():
            _augment(data, state="INFO", **llm)
        new = {key: request.id for key, request in asked if key not in cached}
        assert server.calls() == len(new) and 0 < len(new) < len(asked)
        assert _users(new.items(), "snf") == failed["snf"]
        assert failed["arv"] <= _users(new.items(), "arv") <= failed["arv"] | failed["snf"]
        path2, records2, summary2 = _augment(data, **llm)  # and a third run reuses the rewritten artifact
        assert server.calls() == len(new)
    assert path2 == path and sorted(f.name for f in path.parent.iterdir()) == ["artifact.jsonl", "summary.json"]
    assert summary2["llm_failed"] == {"snf": {}, "arv": {}} and summary2["llm_reasked_users"] == n_failed
    assert summary2["llm"]["calls"] == len(new) and summary2["llm"]["failures"] == {}
    assert len(records2) == len(sequences) and all(r["llm_failed"] is None for r in records2)
    _check_records(records2, sequences, 8)
    changed = {r["user_id"] for r in records2 if r != by_user[r["user_id"]]}
    assert changed and changed <= failed["snf"] | failed["arv"]  # the other users' records are as they were
    # the log says how many users were re-asked, and holds no line per HTTP request
    (text,) = [t for t in (f.read_text() for f in tmp_cwd.rglob("*.log")) if t]  # the second run's log
    assert f"holds {n_failed} user(s) whose LLM calls failed" in text and "augmentation: backend llm" in text
    assert "HTTP Request" not in text and "Retrying request" not in text


def test_llm_retry_failed_false_reuses_the_artifact_untouched(tiny_data, tmp_cwd):
    data, sequences = tiny_data
    with pytest.raises(LLMSeRError, match="'llm_retry_failed'.*true or false"):
        _augment(data, llm_retry_failed="sometimes")
    with FakeLLMServer() as server:
        server.rate_500 = 1.0  # every call fails: every user falls back
        llm = dict(llm_base_url=server.base_url, llm_model="fake-llm", llm_max_retries=0)
        path, records, summary = _augment(data, **llm)
        assert set(summary["llm_failed"]["snf"]) == set(summary["llm_failed"]["arv"]) == set(sequences)
        assert all(r["llm_failed"] == ["snf", "arv"] for r in records)
        before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in path.parent.iterdir()}
        server.rate_500 = 0.0
        server.reset()
        again, _, _ = _augment(data, llm_retry_failed=False, **llm)  # the property is not part of the folder hash
        assert again == path and server.calls() == 0
        assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in path.parent.iterdir()} == before
        # a summary written before failed users were listed: its count of failed calls still asks them again
        summary.pop("llm_failed")
        (path.parent / "summary.json").write_text(json.dumps(summary))
        _, records, summary = _augment(data, **llm)
        assert server.calls() == 2 * len(sequences) and summary["llm"]["failures"] == {}
        assert summary["llm_reasked_users"] is None  # users unknown: the old summary counted calls
        assert summary["llm_failed"] == {"snf": {}, "arv": {}} and all(r["llm_failed"] is None for r in records)


def test_dry_run_makes_no_call(tiny_data, tmp_cwd, capsys, monkeypatch):
    data, _ = tiny_data
    with FakeLLMServer() as server:
        argv = ["--model=SASRec", "--dataset=tiny", "--method=llmser", "--dry_run", f"--llm_base_url={server.base_url}",
                *[f"--{k}={v}" for k, v in tiny_config_dict(data, **SMALL).items() if k not in ("method", "stage")]]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert main(argv + ["--snf_mode=llm_only"]) == 0  # a baseline's text pool needs no helper: the real one
        assert "the baseline's own candidates" in capsys.readouterr().out
        # co-occurrence's pool needs no item vectors: its dry run embeds nothing
        monkeypatch.setattr(backends, "item_embeddings", lambda *a, **k: pytest.fail("a co-occurrence dry run embeds"))
        assert main(argv + ["--snf_mode=cooccurrence"]) == 0
        assert "the baseline's own candidates" in capsys.readouterr().out
        assert server.calls() == 0
    assert "dry run" in out and "calls" in out and "stand in for CCG's candidates" in out
    assert not list(tmp_cwd.rglob("*.pth"))  # no helper model trained: a dry run on the paper's settings is instant
    # the offline stand-in asks no LLM: the dry run says so, and trains nothing either
    assert main([a for a in argv if not a.startswith("--llm_base_url")] + ["--llm_backend=offline"]) == 0
    out = capsys.readouterr().out
    assert "dry run: backend offline" in out and "no LLM calls" in out
    assert not list(tmp_cwd.rglob("*.pth"))


def test_budget_stop_then_resume(tiny_data, tmp_cwd):
    data, sequences = tiny_data
    with FakeLLMServer() as server:
        llm = dict(llm_base_url=server.base_url, llm_concurrency=1)
        with pytest.raises(LLMSeRError, match="budget"):
            _augment(data, llm_budget_tokens=3000, **llm)
        spent = server.calls()
        assert 0 < spent < 2 * len(sequences)
        assert not list(tmp_cwd.rglob("artifact.jsonl"))
        _, records, summary = _augment(data, **llm)
        assert server.calls() == 2 * len(sequences)  # nothing finished was asked twice
        assert len(records) == len(sequences)


def test_text_free_dataset_uses_the_forward_model(tmp_cwd):
    sequences = write_tiny_dataset(tmp_cwd / "data", with_item=False)
    path, records, summary = _augment(tmp_cwd / "data", item_text_field=None,
                                      load_col={"inter": ["user_id", "item_id", "timestamp"]})
    assert summary["text"] == "none" and summary["backend"] == "model"
    assert all(r["text"] == "none" and r["backend"] == "model" for r in records)
    _check_records(records, sequences, 8)


def test_helper_models_train_on_training_prefixes_only(tiny_data, tmp_cwd, monkeypatch):
    data, sequences = tiny_data
    trained = []
    original = helper_models._helper_dataset

    def spy(dataset, helper, seqs, users):
        trained.append((helper["ccg_direction"], [[dataset.id2token(dataset.iid_field, i) for i in s] for s in seqs],
                        [dataset.id2token(dataset.uid_field, u) for u in users]))
        return original(dataset, helper, seqs, users)

    monkeypatch.setattr(helper_models, "_helper_dataset", spy)
    _augment(data)
    assert {d for d, _, _ in trained} == {"reverse", "forward"}
    for direction, seqs, users in trained:
        for user, seq in zip(users, seqs):
            prefix = sequences[user][:-2]
            assert seq == (prefix[::-1] if direction == "reverse" else prefix)


def test_a_helper_stopped_mid_training_is_trained_again_not_reused(tiny_data, tmp_cwd, monkeypatch):
    # without validation RecBole saves the helper after every epoch; a run stopped after such a save (the end of a
    # session, Ctrl-C) must not leave a file that the next run reuses as a fully trained helper
    from recbole.trainer import Trainer

    data, _ = tiny_data
    original = Trainer._save_checkpoint

    def save_then_stop(self, epoch, verbose=True, **kwargs):
        original(self, epoch, verbose=verbose, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _augment(data, ccg_epochs=2)
    assert list(tmp_cwd.rglob("ccg-*.pth")) == [] and len(list(tmp_cwd.rglob(".ccg-*.partial"))) == 1

    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    trained = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: trained.append(1) or fit(self, *a, **k))
    path, _, _ = _augment(data, ccg_epochs=2)
    assert len(trained) == 2  # both helpers trained anew, none reused
    names = sorted(m.name for m in (path.parent.parent / "models").iterdir())
    assert len(names) == 2 and all(n.startswith("ccg-") and n.endswith(".pth") for n in names)


def test_llmser_all_stages_in_one_run(tiny_data, tmp_cwd):
    """The default method: augment (offline), then dual-channel training with the artifact, grouped results."""
    data, sequences = tiny_data
    cfg = tiny_config_dict(data, **{**SMALL, "stage": "all"})
    result = run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    assert result["method"] == "llmser" and result["aug_file"].endswith("artifact.jsonl")
    assert Path(result["aug_file"]).is_file()
    full = result["test"]["full"]
    assert full["overall"]["n"] == len(sequences) and sum(g["n"] for g in full["groups"]) == len(sequences)


def test_stage_train_needs_an_artifact(tiny_data, tmp_cwd, capsys):
    data, _ = tiny_data
    argv = ["--model=SASRec", "--dataset=tiny", "--method=llmser", "--stage=train", f"--data_path={data}"]
    assert main(argv) == 2
    assert "--aug_file" in capsys.readouterr().err


def test_ablation_ccg_top_and_constant_weight_call_no_llm(tiny_data, tmp_cwd):
    data, sequences = tiny_data
    with FakeLLMServer() as server:
        llm = dict(llm_base_url=server.base_url, llm_api_key=SECRET, llm_model="fake-llm")
        _, records, summary = _augment(data, snf_mode="ccg_top", arv_weight=0.5, **llm)
        assert server.calls() == 0
    assert summary["snf_mode"] == "ccg_top" and summary["arv_weight"] == 0.5
    for r in records:
        assert r["ccg_rank"] == [4, 3, 2, 1]  # CCG's top M, the best next to the first real item
        assert r["arv_status"] == "constant" and r["w"] == 0.5 and r["predicted_item"] is None
    # no ARV: w = 1 for everyone; the decay still applies to w_tilde
    _, records, _ = _augment(data, snf_mode="ccg_top", arv_weight=1.0, aug_decay_beta=0.5, aug_decay_threshold=0)
    assert {r["w"] for r in records} == {1.0} and {r["w_tilde"] for r in records} == {0.5}


def test_ablation_random_pseudo_items(tiny_data, tmp_cwd):
    data, sequences = tiny_data
    _, records, summary = _augment(data, snf_mode="random")
    assert summary["snf_mode"] == "random" and len(records) == len(sequences)
    for r in records:
        prefix = sequences[r["user_id"]][:-2]
        assert len(set(r["pseudo_items"])) == 4 and not set(r["pseudo_items"]) & set(prefix)
        assert r["snf_order"] is None
    _, again, _ = _augment(data, snf_mode="random")
    assert [r["pseudo_items"] for r in again] == [r["pseudo_items"] for r in records]  # seeded


def test_random_pseudo_items_are_uniform_and_outside_the_prefix():
    from recbole_llmser.augment.snf import random_pseudo_items

    drawn = random_pseudo_items(11, [[1, 2, 3]] * 2000, 3, seed=0)
    assert all(len(set(d)) == 3 and not set(d) & {1, 2, 3} for d in drawn)
    counts = np.bincount(np.concatenate(drawn), minlength=11)[4:]
    assert counts.min() > 0.8 * counts.mean()  # 7 allowed items, about equally often
    assert random_pseudo_items(5, [[1, 2, 3]], 3, seed=0) == [[4]]  # a tiny catalogue gives what it has
    assert random_pseudo_items(11, [[1]], 3, seed=1) == random_pseudo_items(11, [[1]], 3, seed=1)


def test_ablation_properties_are_validated(tiny_data, tmp_cwd):
    data, _ = tiny_data
    with pytest.raises(LLMSeRError, match="'snf_mode'.*filter, ccg_top, random"):
        _augment(data, snf_mode="none")
    with pytest.raises(LLMSeRError, match="'arv_weight'.*in \\[0, 1\\]"):
        _augment(data, arv_weight=2)


def test_helper_windows_hold_exactly_recboles_prefix_rows(tiny_data, tmp_cwd):
    """The all-positions layout of a helper model trains the same (history, target) rows as RecBole's rows."""
    from recbole_llmser.config import Config
    from recbole_llmser.data import create_dataset
    from recbole_llmser.dct import TARGET_LIST_FIELD, WEIGHT_LIST_FIELD

    data, _ = tiny_data
    config = Config("SASRec", "tiny", config_dict=tiny_config_dict(data, **SMALL, ccg_max_len=3), cmd_args=[])
    dataset = create_dataset(config.copy_with(method="none"))
    users, seqs = user_sequences(dataset.inter_feat, dataset.uid_field, dataset.iid_field, dataset.time_field)
    helper = helper_models.helper_config(config, "forward")
    assert helper["train_all_positions"] is True
    ds = helper_models._helper_dataset(dataset, helper, seqs, list(users))
    inter = ds.inter_feat
    rows = sorted((tuple(h[:n].tolist()), int(t)) for h, n, t in zip(
        inter["item_id_list"], inter["item_length"], inter["item_id"]))
    ds.use_all_prefix_windows()
    win = ds.inter_feat
    expanded = sorted((tuple(h[:p + 1].tolist()), int(t))
                      for h, ts, ws in zip(win["item_id_list"], win[TARGET_LIST_FIELD], win[WEIGHT_LIST_FIELD])
                      for p, (t, w) in enumerate(zip(ts, ws)) if w > 0)
    assert rows == expanded and ds.dct_n_rows == len(rows) and len(win) < len(rows)
    assert max(len(h) for h, _ in rows) == 3  # truncated histories are kept as their own windows


def test_helper_fingerprint_follows_training_settings_not_run_bookkeeping(tiny_data):
    """Cached helpers are reused by every run with the same helper settings, whatever the run's folder or logging."""
    from recbole_llmser.config import Config

    config = Config("SASRec", "tiny", config_dict=tiny_config_dict(tiny_data[0], **SMALL), cmd_args=[])
    sequences = [np.array([1, 2, 3]), np.array([4, 5])]
    helper = helper_models.helper_config(config, "reverse")
    before = helper_models.helper_fingerprint(helper, sequences)
    for key, value in (("run_name", "somewhere"), ("checkpoint_dir", "/elsewhere"), ("show_progress", True)):
        helper[key] = value
        assert helper_models.helper_fingerprint(helper, sequences) == before, key
    helper["learning_rate"] = 0.5
    assert helper_models.helper_fingerprint(helper, sequences) != before
    assert helper_models.helper_fingerprint(helper_models.helper_config(config, "reverse"), sequences[:1]) != before


def test_helper_trains_with_a_sampled_loss_from_ccg_model_args(tiny_data, tmp_cwd, monkeypatch):
    """A large catalogue: ``ccg_model_args`` gives the helpers RecBole's BPR loss with sampled negatives (no
    O(items) softmax per row), on the all-positions path; CCG still ranks the whole catalogue."""
    from recbole.model.loss import BPRLoss

    from recbole_llmser import dct
    from recbole_llmser.config import Config
    from recbole_llmser.data import create_dataset

    data, _ = tiny_data
    sampled = {"loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}}
    config = Config("SASRec", "tiny", config_dict=tiny_config_dict(data, **SMALL, ccg_model_args=sampled),
                    cmd_args=[])
    dataset = create_dataset(config.copy_with(method="none"))
    users, seqs = user_sequences(dataset.inter_feat, dataset.uid_field, dataset.iid_field, dataset.time_field)
    calls = []
    original = dct.per_row_loss

    def spy(loss_fct, *args):
        calls.append((type(loss_fct), [tuple(a.shape) for a in args]))
        return original(loss_fct, *args)

    monkeypatch.setattr(dct, "per_row_loss", spy)
    model = helper_models.train_helper(config, dataset, list(users), seqs, "reverse", tmp_cwd / "models")
    assert model.loss_type == "BPR" and calls and all(kind is BPRLoss for kind, _ in calls)
    # one (positive, negative) score pair per trained prefix position, never a score per catalogue item
    assert all(len(shapes) == 2 and shapes[0] == shapes[1] and len(shapes[0]) == 1 for _, shapes in calls)
    assert sum(shapes[0][0] for _, shapes in calls) == sum(len(s) - 1 for s in seqs)
    assert len(list((tmp_cwd / "models").glob("ccg-reverse-SASRec-*.pth"))) == 1
