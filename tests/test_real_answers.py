"""What real small LLMs and servers do (issue 31), through the real openai client against tests/llm_server.py:
answers that repeat the presented order (echo), per-user shuffled candidate lists mapped back exactly, answers in
```json fences, and a server that answers json_schema with HTTP 500 (llama-cpp-python's)."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest

from recbole_llmser.augment.backends import asks_llm
from recbole_llmser.augment.llm import LLMClient, ResponseCache
from recbole_llmser.augment.matching import match_answer
from recbole_llmser.augment.pipeline import augmentation_dir
from recbole_llmser.augment.presentation import LLM_AUG_KEYS, Shown, is_echo, presentation_order, show
from recbole_llmser.schema import AUG_KEYS, PROPS
from tests.conftest import spy_llm_requests
from tests.llm_server import FakeLLMServer
from tests.test_augment import _augment, _check_records
from tests.test_llm import K, candidate_titles, make_settings, snf_requests

#: The keys of an artifact record before issue 31: the offline and text-free backends' records keep exactly these.
RECORD_KEYS = {"user_id", "pseudo_items", "ccg_rank", "snf_order", "masked_item", "predicted_item", "w", "w_tilde",
               "arv_status", "backend", "llm_model", "text", "templates", "tokens", "prompt_hashes", "llm_failed"}
CANDIDATE = re.compile(r"^(\d+)\. (.+)$", re.MULTILINE)


def title(token: str) -> str:
    """The tiny dataset's title of item ``i<n>`` (tests/conftest.py)."""
    n = int(token[1:])
    return f"product number {n} in colour {['red', 'blue', 'green'][n % 3]}"


def number(token: str) -> int:
    return int(token[1:])


def shown_titles(request) -> list:
    """The candidate titles a prompt shows, in the order shown (checking that they are numbered 1, 2, ...)."""
    numbered = CANDIDATE.findall(request.messages[-1]["content"])
    assert [int(n) for n, _ in numbered] == list(range(1, len(numbered) + 1))
    return [t for _, t in numbered]


def llm_props(server, **extra) -> dict:
    return dict(llm_base_url=server.base_url, llm_model="fake-llm", **extra)


# ----- presentation order and echo (pure) ---------------------------------------------------------------------
def test_presentation_order_is_a_seeded_permutation_per_user_and_stage():
    order = presentation_order(42, "snf", "u1", 15)
    assert sorted(order) == list(range(15)) and order != list(range(15))
    assert order == presentation_order(42, "snf", "u1", 15)  # the same prompt in every run: stable cache keys
    others = [presentation_order(43, "snf", "u1", 15), presentation_order(42, "arv", "u1", 15),
              presentation_order(42, "snf", "u2", 15)]
    assert all(o != order for o in others)
    assert presentation_order(42, "snf", "u1", 15, shuffle=False) == list(range(15))
    assert presentation_order(42, "snf", "u1", 1) == [0]

    config = {"seed": 42, "llm_shuffle_candidates": True}
    shown = show(config, "snf", "u1", [100 + j for j in range(15)])
    assert shown.order == order and shown.items == [100 + j for j in order]
    assert shown.to_candidates([0, 2]) == [order[0], order[2]]
    assert show({**config, "llm_shuffle_candidates": False}, "snf", "u1", [7, 8, 9]) == Shown([0, 1, 2], [7, 8, 9])


@pytest.mark.parametrize("positions, want, echo", [
    (list(range(15)), 15, True),  # all of it, in order
    (list(range(6)), 6, True),  # its first k
    ([0, 1], 6, True),  # a partial answer in presented order
    ([0], 6, False),  # one pick when six were asked for is no evidence
    ([0], 1, True),  # ARV: the first candidate
    ([1], 1, False),
    ([0, 2, 1], 3, False),
    ([1, 2, 3], 3, False),
    ([], 3, False),
])
def test_is_echo(positions, want, echo):
    assert is_echo(positions, want) is echo


# ----- answers as real small models write them ----------------------------------------------------------------
TITLES = [f"title {i}" for i in range(1, 16)]


@pytest.mark.parametrize("text, indices", [
    ('```json\n{"items": [3, 1, 2]}\n```', [2, 0, 1]),
    ('```\n{"items": [3, 1, 2]}\n```\nThese fit the history best.', [2, 0, 1]),
    ('Here you go:\n```json\n{"items": [3, 1]}\n```', [2, 0]),
    ('{"items": ["3", "1", "2"]}', [2, 0, 1]),  # numbers as strings
    ('{"items": [3, 1, 2]}\n\nExplanation: the user likes items 5 and 7.', [2, 0, 1]),  # trailing prose
    ('```json\n{\n  "items": [\n    3,\n    1,\n    2,\n    4', [2, 0, 1, 3]),  # cut at the token limit
    ('{"items": [3, 1, 2,]}', [2, 0, 1]),  # a trailing comma
    ("{'items': [3, 1, 2]}", [2, 0, 1]),  # single quotes
    ('```json\n{"item": 4}\n```', [3]),
    ('{"item": "4"}', [3]),
])
def test_real_answer_shapes_parse(text, indices):
    result = match_answer(text, TITLES, 15)
    assert result.indices == indices and result.n_hallucinated == 0 and result.method == "numbers"


def test_fenced_answers_through_the_client(tmp_path):
    with FakeLLMServer(seed=1) as server:
        server.fence = True
        client = LLMClient(make_settings(server.base_url), ResponseCache(tmp_path / "cache.jsonl"), progress=False)
        results = client.run(snf_requests(4))
    assert all(r.ok and r.text.startswith("```json\n{") and r.text.endswith("\n```") for r in results)
    for u, result in enumerate(results):
        match = match_answer(result.text, candidate_titles(u), K)
        assert match.status == "ok" and match.indices[:2] == [0, 1]


# ----- structured output: llama-cpp-python answers json_schema with HTTP 500 -----------------------------------
def test_server_rejecting_json_schema_with_500_ends_in_json_object_mode(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="recbole_llmser")
    requests = snf_requests(20)
    with FakeLLMServer(seed=1) as server:
        server.reject_json_schema = 500
        settings = make_settings(server.base_url, max_retries=5, concurrency=8)
        client = LLMClient(settings, ResponseCache(tmp_path / "cache.jsonl"), progress=False)
        results = client.run(requests, desc="SNF")
        bodies = server.chat_bodies()
    assert all(r.ok for r in results) and client.stats.failures == {}
    assert client.stats.output_mode == client.output_mode == "json_object"
    modes = [b.get("response_format", {}).get("type") for b in bodies]
    # the first call probes alone and without the client's retries: ONE json_schema request reached the server
    assert modes == ["json_schema"] + ["json_object"] * 20
    for body in bodies[1:]:  # json_object mode describes the schema in the prompt
        assert body["messages"][-1]["content"].endswith(
            "The JSON object must match this JSON schema: " + json.dumps(requests[0].schema["schema"],
                                                                           separators=(",", ":")))
    for u, result in enumerate(results):
        assert match_answer(result.text, candidate_titles(u), K).status == "ok"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("rejects response_format json_schema" in m for m in messages) == 1
    assert any(m.startswith("SNF: 20 request(s)") and "output mode json_object" in m for m in messages)


def test_concurrent_calls_step_down_once_when_the_probe_failed_otherwise(tmp_path, caplog):
    """The probe meets an outage (503, naming nothing): the mode is still json_schema, the other calls go
    concurrently, all meet the 500 naming response_format, and the run steps down once, not once per call."""
    caplog.set_level(logging.WARNING, logger="recbole_llmser")
    with FakeLLMServer(seed=1, latency=0.2) as server:
        server.reject_json_schema, server.fail_first = 500, 1
        settings = make_settings(server.base_url, max_retries=0, concurrency=8)
        client = LLMClient(settings, ResponseCache(tmp_path / "cache.jsonl"), progress=False)
        results = client.run(snf_requests(9))
        fates = [r.fate for r in server.records]
    assert fates[0] == "503" and fates.count("reject_json_schema") == 8 and fates.count("ok") == 8
    assert [r.ok for r in results] == [False] + [True] * 8 and client.stats.failures == {"server": 1}
    assert client.output_mode == client.stats.output_mode == "json_object"
    assert sum("rejects response_format" in r.getMessage() for r in caplog.records) == 1


def test_llama_cpp_like_server_through_the_augmentation(tiny_data, tmp_cwd):
    data, sequences = tiny_data
    with FakeLLMServer() as server:
        server.reject_json_schema, server.fence = 500, True
        _, records, summary = _augment(data, **llm_props(server))
        bodies = server.chat_bodies()
    assert summary["llm"]["output_mode"] == "json_object" and summary["llm"]["failures"] == {}
    assert summary["llm_failed"] == {"snf": {}, "arv": {}}
    assert [b["response_format"]["type"] for b in bodies].count("json_schema") == 1
    assert summary["llm"]["calls"] == 2 * len(sequences)
    assert not {"malformed", "hallucinated", "refusal"} & (set(summary["snf_status"]) | set(summary["arv_status"]))
    _check_records(records, sequences, 8)


# ----- echo -----------------------------------------------------------------------------------------------------
def test_echoing_llm_is_reported_and_its_snf_answers_fall_back(tiny_data, tmp_cwd, caplog):
    data, sequences = tiny_data
    caplog.set_level(logging.INFO)
    with FakeLLMServer() as server:
        server.answer_order = "echo"
        _, records, summary = _augment(data, **llm_props(server))
    n = len(sequences)
    assert summary["llm_echo"] == {"snf": {"answers": n, "echo": n, "rate": 1.0},
                                   "arv": {"answers": n, "echo": n, "rate": 1.0}}
    assert summary["snf_status"] == {"echo": n} and summary["arv_status"] == {"echo": n}
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and ("echo" in r.getMessage() or "filtering" in r.getMessage())]
    assert len(warnings) == 1, warnings
    assert "not filtering" in warnings[0] and "fake-llm" in warnings[0] and "100%" in warnings[0]
    assert "\n" not in warnings[0]
    info = [r.getMessage() for r in caplog.records if "repeat the presented candidate order" in r.getMessage()]
    assert any(m.startswith(f"SNF: {n} of {n}") for m in info) and any(m.startswith(f"ARV: {n} of {n}") for m in info)
    _check_records(records, sequences, 8)
    for r in records:
        # SNF: the echo is not kept; snf_fallback ccg_order gives CCG's top M (not the first M shown)
        assert r["ccg_rank"] == [4, 3, 2, 1] and r["llm_echo"] == ["snf", "arv"]
        assert r["presented"]["snf"][:4] != r["snf_order"]  # what was shown first is not what was kept
        # ARV: the single echoed pick is kept: the first candidate shown
        assert r["predicted_item"] == r["presented"]["arv"][0]

    with FakeLLMServer() as server:  # snf_fallback: skip leaves every echoing user un-augmented
        server.answer_order = "echo"
        _, skipped, summary = _augment(data, snf_fallback="skip", **llm_props(server))
    assert skipped == [] and summary["augmented_users"] == 0 and summary["llm_echo"]["snf"]["rate"] == 1.0


def test_filtering_llm_is_not_reported_as_echoing(tiny_data, tmp_cwd, caplog):
    data, sequences = tiny_data
    caplog.set_level(logging.WARNING)
    with FakeLLMServer() as server:
        server.answer_order = "highest_number"
        _, records, summary = _augment(data, **llm_props(server))
    echo = summary["llm_echo"]
    assert echo["snf"]["answers"] == echo["arv"]["answers"] == len(sequences)
    assert echo["snf"]["rate"] < 0.2 and echo["arv"]["rate"] < 0.5
    assert not [r for r in caplog.records if "not filtering" in r.getMessage()]
    assert summary["snf_status"].get("echo", 0) == echo["snf"]["echo"]


# ----- shuffled order, mapped back exactly ---------------------------------------------------------------------
def test_shuffled_candidates_are_mapped_back_exactly(tiny_data, tmp_cwd, monkeypatch):
    """The server picks by the number in each title (highest first), answering with the positions it was shown: the
    artifact must hold the same items whatever the order shown, and each record's ``presented`` list must be the
    prompt's candidate list."""
    data, sequences = tiny_data
    asked = spy_llm_requests(monkeypatch)
    runs = {}
    with FakeLLMServer() as server:
        server.answer_order = "highest_number"
        for shuffle in (True, False):
            asked.clear()
            path, records, summary = _augment(data, llm_shuffle_candidates=shuffle, **llm_props(server))
            runs[shuffle] = (path, {r["user_id"]: r for r in records}, {r.id: r for _, r in asked}, summary)
    assert runs[True][0] != runs[False][0]  # the LLM backend's folder hash includes the property
    assert runs[True][3]["settings"]["llm_shuffle_candidates"] is True
    moved = 0
    for user in sequences:
        for shuffle, (_, by_user, requests, _) in runs.items():
            r = by_user[user]
            for stage in ("snf", "arv"):  # the recorded order reproduces the prompt
                assert [title(t) for t in r["presented"][stage]] == shown_titles(requests[f"{stage}:{user}"])
            best = sorted(r["presented"]["snf"], key=number, reverse=True)
            assert r["snf_order"] == best[:4] and r["pseudo_items"] == best[:4][::-1]
            assert r["predicted_item"] == max(r["presented"]["arv"], key=number)
            assert r["llm_echo"] is None or r["llm_echo"] == ["arv"]
        shuffled, plain = runs[True][1][user], runs[False][1][user]
        assert sorted(shuffled["presented"]["snf"]) == sorted(plain["presented"]["snf"])  # the same candidates
        moved += shuffled["presented"]["snf"] != plain["presented"]["snf"]
        assert (shuffled["pseudo_items"], shuffled["ccg_rank"]) == (plain["pseudo_items"], plain["ccg_rank"])
        # without shuffling the prompt shows CCG's order: a kept item's CCG rank is its place in that list
        assert plain["ccg_rank"] == [plain["presented"]["snf"].index(p) + 1 for p in plain["pseudo_items"]]
    assert moved >= len(sequences) - 1  # 8 candidates: the identity order is drawn once in 40320


# ----- the offline and text-free backends are unchanged ---------------------------------------------------------
def _artifact_bytes(data, **extra):
    path, records, summary = _augment(data, **extra)
    out = (path, path.read_bytes(), records, summary)
    shutil.rmtree(path.parent)  # the next run builds it again rather than reusing it
    return out


@pytest.mark.parametrize("text", [True, False])
def test_offline_and_model_artifacts_do_not_depend_on_the_shuffle(tmp_cwd, text):
    from tests.conftest import write_tiny_dataset

    data = tmp_cwd / "data"
    write_tiny_dataset(data, with_item=text)
    extra = {} if text else dict(item_text_field=None, load_col={"inter": ["user_id", "item_id", "timestamp"]})
    on = _artifact_bytes(data, llm_shuffle_candidates=True, **extra)
    off = _artifact_bytes(data, llm_shuffle_candidates=False, **extra)
    assert on[3]["backend"] == ("offline" if text else "model")
    assert on[0] == off[0] and on[1] == off[1]  # the same folder hash and the same bytes
    assert all(set(r) == RECORD_KEYS for r in on[2])  # records as before issue 31: no presented / llm_echo
    assert on[3]["llm_echo"] is None and set(on[3]["settings"]) == set(AUG_KEYS)


def test_folder_hash_includes_the_shuffle_only_when_the_llm_answers(tmp_path):
    assert set(LLM_AUG_KEYS) <= set(PROPS) and not set(LLM_AUG_KEYS) & set(AUG_KEYS)
    base = {k: PROPS[k].default for k in AUG_KEYS} | {"checkpoint_dir": str(tmp_path), "dataset": "d"}
    sequences = [[1, 2, 3], [4, 5]]

    def folder(backend, **values):
        return augmentation_dir({**base, "llm_shuffle_candidates": True, **values}, backend, sequences)

    for backend in ("offline", "model"):
        assert folder(backend) == folder(backend, llm_shuffle_candidates=False)
    assert folder("llm") != folder("llm", llm_shuffle_candidates=False)
    # ablations that replace both LLM stages ask no LLM: the order cannot matter
    ablation = dict(snf_mode="ccg_top", arv_weight=0.5)
    assert not asks_llm({**base, **ablation}, "llm")
    assert folder("llm", **ablation) == folder("llm", llm_shuffle_candidates=False, **ablation)
