"""LLM access layer, through the real openai client against tests/llm_server.py (127.0.0.1 only)."""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recbole_llmser.augment import llm
from recbole_llmser.augment.llm import (
    BudgetExceeded, LLMClient, LLMRequest, LLMSettings, ResponseCache, TokenCounter, settings_from_config,
)
from recbole_llmser.augment.llm_tokens import MESSAGE_OVERHEAD_TOKENS, REPLY_PRIMING_TOKENS
from recbole_llmser.augment.matching import match_answer
from recbole_llmser.augment.prompts import (
    SNF_TEMPLATE_VERSION, expected_answer_tokens, snf_messages, snf_schema,
)
from recbole_llmser.errors import LLMSeRError
from tests.llm_server import FakeLLMServer

KEY = "sk-test-SECRET-0123"
REPO = Path(__file__).resolve().parents[1]
K, N_CANDIDATES = 5, 12
COLOURS = ["red", "blue", "green", "black", "white"]


def candidate_titles(user: int) -> list:
    return [f"product number {user * 100 + j} in colour {COLOURS[j % 5]}" for j in range(N_CANDIDATES)]


def snf_requests(n: int, start: int = 0) -> list:
    """n distinct SNF requests; user u's history is red and blue items."""
    out = []
    for u in range(start, start + n):
        history = [f"old product {u}-{i} in colour {COLOURS[i % 2]}" for i in range(3)]
        out.append(LLMRequest(
            id=f"u{u}:snf", messages=snf_messages(history, candidate_titles(u), K),
            template_version=SNF_TEMPLATE_VERSION, schema=snf_schema(K, N_CANDIDATES),
            expected_completion_tokens=expected_answer_tokens(K),
        ))
    return out


def make_settings(base_url: str, **overrides) -> LLMSettings:
    values = dict(model="fake-llm", base_url=base_url, api_key=KEY, timeout=2.0, max_retries=2, concurrency=8)
    values.update(overrides)
    return LLMSettings(**values)


def make_client(server: FakeLLMServer, cache_path, **overrides) -> LLMClient:
    return LLMClient(make_settings(server.base_url, **overrides), ResponseCache(cache_path), progress=False)


def cache_lines(path) -> list:
    return [line for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


class FakeConfig:
    """Stand-in for recbole_llmser.config.Config: ``config[key]`` (None when missing) and ``secret()``."""

    def __init__(self, secrets=None, **values):
        self.values, self.secrets = values, secrets or {}

    def __getitem__(self, key):
        return self.values.get(key)

    def secret(self, key, env=None):
        return self.secrets.get(key) or (os.environ.get(env) if env else None) or None


@pytest.fixture
def server():
    with FakeLLMServer(seed=1) as srv:
        yield srv


@pytest.fixture
def cache_path(tmp_path):
    return tmp_path / "llm_cache.jsonl"


# ----- normal runs and the cache -------------------------------------------------------------------------------
def test_run_answers_requests_and_rerun_makes_no_call(server, cache_path):
    requests = snf_requests(20)
    client = make_client(server, cache_path)
    results = client.run(requests, desc="SNF")
    assert [r.id for r in results] == [r.id for r in requests]
    assert server.calls() == 20 and client.stats.calls == 20 and client.stats.cache_hits == 0
    for request, result in zip(requests, results):
        assert result.ok and not result.cached and result.prompt_tokens > 0 and result.completion_tokens > 0
        match = match_answer(result.text, candidate_titles(int(request.id[1:].split(":")[0])), K)
        assert match.status == "ok" and len(match.indices) == K
        assert match.indices[:2] == [0, 1]  # the server ranks red/blue (shared with the history) first
    body = server.chat_bodies()[0]
    assert body["model"] == "fake-llm" and body["seed"] == 42 and body["temperature"] == 0.0
    assert body["max_tokens"] == 256
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == "snf_answer"
    assert len(cache_lines(cache_path)) == 20

    again = make_client(server, cache_path)
    results_again = again.run(requests)
    assert server.calls() == 20, "a re-run with the same cache must not call the server"
    assert again.stats.calls == 0 and again.stats.cache_hits == 20
    assert [r.text for r in results_again] == [r.text for r in results]
    assert all(r.cached for r in results_again)


def test_identical_requests_share_one_call(server, cache_path):
    request = snf_requests(1)[0]
    twin = LLMRequest("twin", request.messages, request.template_version, request.schema)
    client = make_client(server, cache_path)
    first, second = client.run([request, twin])
    assert server.calls() == 1 and first.ok and second.ok and first.text == second.text
    assert (first.id, first.cached, second.id, second.cached) == ("u0:snf", False, "twin", True)


def test_cache_key_depends_on_model_sampling_and_template(server, cache_path):
    request = snf_requests(1)[0]
    base = make_settings(server.base_url)
    keys = {
        llm.request_key(base, request),
        llm.request_key(make_settings(server.base_url, model="other"), request),
        llm.request_key(make_settings(server.base_url, temperature=0.7), request),
        llm.request_key(make_settings(server.base_url, seed=7), request),
        llm.request_key(make_settings(server.base_url, structured_output=False), request),
        llm.request_key(base, LLMRequest("x", request.messages, "snf-v2", request.schema)),
    }
    assert len(keys) == 6
    # neither the key nor the endpoint, nor the request id, is part of the key
    assert llm.request_key(make_settings("http://elsewhere/v1", api_key="other"), request) == \
        llm.request_key(base, LLMRequest("another id", request.messages, request.template_version, request.schema))
    assert llm.request_key(base, request) == llm.request_key(make_settings(server.base_url, temperature=0), request)


def test_killed_run_resumes_without_losing_or_duplicating(server, cache_path):
    server.latency = 0.15
    n = 30
    script = (
        "import sys\n"
        "from recbole_llmser.augment.llm import LLMClient, ResponseCache\n"
        "from tests.test_llm import make_settings, snf_requests\n"
        "settings = make_settings(sys.argv[1], concurrency=2)\n"
        f"LLMClient(settings, ResponseCache(sys.argv[2]), progress=False).run(snf_requests({n}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, server.base_url, str(cache_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (cache_path.exists() and len(cache_lines(cache_path)) >= 6):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the subprocess made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    cached_before = ResponseCache(cache_path)
    assert 6 <= len(cached_before) < n, "the run must have been killed mid-way"

    server.latency = 0.0
    client = make_client(server, cache_path, api_key="sk-resume")  # its calls are told apart by their key
    results = client.run(snf_requests(n))
    assert all(r.ok for r in results)
    resumed_calls = sum(r.headers.get("authorization") == "Bearer sk-resume" for r in server.records)
    assert resumed_calls == n - len(cached_before), "the resumed run calls only the missing requests"
    assert sum(r.cached for r in results) == len(cached_before)
    per_key = collections.Counter(json.loads(line)["key"] for line in cache_lines(cache_path))
    assert len(per_key) == n and set(per_key.values()) == {1}


def test_torn_last_line_is_skipped_and_next_append_starts_a_fresh_line(server, cache_path, caplog):
    client = make_client(server, cache_path)
    client.run(snf_requests(5))
    with open(cache_path, "ab") as f:
        f.write(b'{"key": "abc", "text": "{\\"ite')  # a write cut short by kill -9
    caplog.set_level(logging.WARNING, logger="recbole_llmser")
    cache = ResponseCache(cache_path)
    assert len(cache) == 5 and cache.n_corrupt == 1
    assert sum("corrupt" in r.getMessage() for r in caplog.records) == 1

    client = LLMClient(make_settings(server.base_url), cache, progress=False)
    results = client.run(snf_requests(6))
    assert server.calls() == 6 and all(r.ok for r in results)
    raw = cache_path.read_text(encoding="utf-8").split("\n")
    assert raw[5].startswith('{"key": "abc"') and json.loads(raw[6])["key"] == client.key(snf_requests(6)[5])
    reloaded = ResponseCache(cache_path)
    assert len(reloaded) == 6 and reloaded.n_corrupt == 1


def test_garbage_lines_and_failed_entries_are_not_answers(cache_path):
    cache_path.write_text('not json\n{"key": "a", "text": "x", "error": null}\n[1, 2]\n'
                          '{"key": "b", "text": "y", "error": "boom"}\n', encoding="utf-8")
    cache = ResponseCache(cache_path)
    assert "a" in cache and "b" not in cache and cache.n_corrupt == 2


# ----- failures ------------------------------------------------------------------------------------------------
def test_transient_429_500_and_timeouts_are_retried_by_the_client(server, cache_path):
    server.injection = "every"
    # a third of the attempts fail; 9 attempts per call make a call that never succeeds a 1-in-20,000 event
    server.rate_429, server.rate_500, server.rate_timeout = 0.15, 0.1, 0.1
    server.timeout_sleep = 2.0
    client = make_client(server, cache_path, timeout=1.0, max_retries=8)
    results = client.run(snf_requests(40))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    fates = collections.Counter(r.fate for r in server.records)
    assert fates["429"] and fates["500"] and fates["timeout"] and server.calls() > 40
    assert client.stats.failures == {} and client.stats.calls == 40


def test_permanent_failures_are_counted_by_kind_and_not_cached(server, cache_path):
    server.injection = "sticky"  # the same prompt always fails the same way: retries cannot help
    server.rate_429, server.rate_500, server.rate_timeout = 0.2, 0.2, 0.15
    server.timeout_sleep = 1.6
    requests = snf_requests(30)
    client = make_client(server, cache_path, timeout=0.8, max_retries=1)
    results = client.run(requests)
    kinds = collections.Counter(r.error_kind for r in results if not r.ok)
    assert set(kinds) == {"rate_limit", "server", "timeout"}
    assert client.stats.failures == dict(kinds) and client.stats.calls == 30
    for r in results:
        assert r.ok or (r.text is None and r.error and "\n" not in r.error)
    n_ok = sum(r.ok for r in results)
    assert len(ResponseCache(cache_path)) == n_ok == len(cache_lines(cache_path))
    # per prompt, every attempt met the same fate, and each failed request was tried 1 + max_retries times
    assert server.calls() == n_ok + 2 * sum(kinds.values())

    server.rate_429 = server.rate_500 = server.rate_timeout = 0.0
    server.reset()
    rerun = make_client(server, cache_path).run(requests)
    assert all(r.ok for r in rerun) and server.calls() == sum(kinds.values())


def test_malformed_bodies_become_failures(server, cache_path):
    server.rate_malformed = 1.0  # alternates: invalid JSON, JSON without choices
    client = make_client(server, cache_path, max_retries=0)
    results = client.run(snf_requests(4))
    assert collections.Counter(r.error_kind for r in results) == {"server": 2, "empty": 2}
    assert len(ResponseCache(cache_path)) == 0


def test_refusals_and_hallucinations_are_cached_and_never_match_outside_the_candidates(server, cache_path):
    server.injection = "every"
    server.rate_refusal, server.rate_hallucinate = 0.25, 0.25
    requests = snf_requests(16)
    results = make_client(server, cache_path).run(requests)
    assert all(r.ok for r in results) and len(ResponseCache(cache_path)) == 16  # what the model said is kept
    statuses = collections.Counter()
    for request, result in zip(requests, results):
        titles = candidate_titles(int(request.id[1:].split(":")[0]))
        match = match_answer(result.text, titles, K)
        statuses[match.status] += 1
        assert all(0 <= i < len(titles) for i in match.indices)
        if match.status == "hallucinated":
            assert match.indices == [] and match.n_hallucinated == 2
    fates = collections.Counter(r.fate for r in server.records)
    assert fates["refusal"] >= 3 and fates["hallucinate"] >= 3
    assert statuses == {"ok": fates["ok"], "refusal": fates["refusal"], "hallucinated": fates["hallucinate"]}


def test_endpoint_refusing_the_key_stops_the_run(server, cache_path):
    server.force_status = 401
    client = make_client(server, cache_path, concurrency=2)
    with pytest.raises(LLMSeRError, match="401") as info:
        client.run(snf_requests(10))
    assert KEY not in str(info.value)
    assert server.calls() <= 2  # the calls in flight; nothing more was started


def test_no_endpoint_configured_is_a_clear_error(cache_path):
    client = LLMClient(LLMSettings(), ResponseCache(cache_path), progress=False)
    assert client.estimate(snf_requests(2)).calls == 2  # the dry run needs no endpoint
    with pytest.raises(LLMSeRError, match="OPENAI_BASE_URL"):
        client.run(snf_requests(2))


# ----- dry run and budget --------------------------------------------------------------------------------------
def test_estimate_makes_no_call_and_prices_correctly(server, cache_path):
    requests = snf_requests(10)
    client = make_client(server, cache_path, price_prompt=2.0, price_completion=8.0, max_tokens=100)
    est = client.estimate(requests + requests[:3])  # duplicates are one call each
    assert server.calls() == 0
    counter = client.token_counter
    prompt = sum(counter.count_messages(r.messages) + counter.count_text(json.dumps(r.schema)) for r in requests)
    assert (est.requests, est.cached, est.calls) == (13, 3, 10)
    assert est.prompt_tokens == prompt
    assert est.completion_tokens_max == 10 * 100
    assert est.completion_tokens_expected == 10 * expected_answer_tokens(K)
    assert est.cost_max_usd == pytest.approx((prompt * 2.0 + 1000 * 8.0) / 1e6)
    assert est.cost_expected_usd == pytest.approx((prompt * 2.0 + est.completion_tokens_expected * 8.0) / 1e6)
    text = est.format()
    assert "10 calls needed" in text and f"{prompt:,}" in text and "fake-llm" in text

    client.run(requests[:4])
    later = client.estimate(requests)
    assert (later.cached, later.calls) == (4, 6) and server.calls() == 4
    both = later + est
    assert both.calls == 16 and both.prompt_tokens == later.prompt_tokens + est.prompt_tokens


def test_budget_stops_cleanly_and_a_larger_budget_resumes(server, cache_path):
    requests = snf_requests(12)
    per_call = make_client(server, cache_path.with_name("probe.jsonl")).run(requests[:1])[0]
    budget = int(3.5 * (per_call.prompt_tokens + per_call.completion_tokens))
    server.reset()
    client = make_client(server, cache_path, concurrency=1, budget_tokens=budget)
    with pytest.raises(BudgetExceeded) as info:
        client.run(requests)
    exc = info.value
    finished = [r for r in exc.results if r is not None]
    assert exc.finished == len(finished) == server.calls() == len(ResponseCache(cache_path))
    assert 3 <= exc.finished < 12 and exc.not_started == 12 - exc.finished
    spent = [r.prompt_tokens + r.completion_tokens for r in finished]
    assert sum(spent[:-1]) < budget <= sum(spent) == exc.spent  # the last call started under the budget
    assert "llm_budget_tokens" in str(exc)

    server.reset()
    resumed = make_client(server, cache_path, budget_tokens=10**9)
    results = resumed.run(requests)
    assert all(r.ok for r in results) and server.calls() == 12 - exc.finished
    assert sum(r.cached for r in results) == exc.finished


def test_budget_with_concurrency_overshoots_by_at_most_the_calls_in_flight(server, cache_path):
    server.latency = 0.05
    client = make_client(server, cache_path, concurrency=4, budget_tokens=1)
    with pytest.raises(BudgetExceeded) as info:
        client.run(snf_requests(12))
    assert 1 <= info.value.finished <= 4 and len(ResponseCache(cache_path)) == info.value.finished


# ----- logging -------------------------------------------------------------------------------------------------
def test_http_request_lines_stay_out_of_the_log(server, cache_path):
    """The transport logs one INFO line per request; with the root at INFO (RecBole's state: INFO) none gets out."""
    seen = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = seen.append
    root, levels = logging.getLogger(), {name: logging.getLogger(name).level for name in llm.HTTP_LOGGERS}
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        server.injection, server.rate_500 = "every", 0.3  # retried requests: the openai logger's retry lines too
        results = make_client(server, cache_path, max_retries=1).run(snf_requests(6), desc="SNF")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert server.calls() > 6 and any(r.ok for r in results)
    messages = [r.getMessage() for r in seen]
    assert any(m.startswith("SNF: 6 request(s)") for m in messages)  # our INFO/WARNING lines do get through
    assert not [m for m in messages if "HTTP Request" in m or "Retrying request" in m], messages
    assert {name: logging.getLogger(name).level for name in llm.HTTP_LOGGERS} == levels  # restored afterwards


def test_quiet_http_logs_keeps_levels_set_on_purpose():
    transport, sdk = logging.getLogger("httpx2"), logging.getLogger("openai")
    assert transport.level == sdk.level == logging.NOTSET
    sdk.setLevel(logging.DEBUG)  # what OPENAI_LOG=debug does
    try:
        with llm.quiet_http_logs():
            assert transport.level == logging.WARNING and sdk.level == logging.DEBUG
            assert logging.getLogger("httpx").level == logging.WARNING
        assert transport.level == logging.NOTSET and sdk.level == logging.DEBUG
    finally:
        sdk.setLevel(logging.NOTSET)


# ----- secrets -------------------------------------------------------------------------------------------------
def test_api_key_reaches_the_server_but_no_log_cache_or_repr(server, cache_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    settings = settings_from_config(FakeConfig(llm_base_url=server.base_url, llm_max_retries=0))
    assert settings.api_key == KEY
    assert KEY not in repr(settings) and KEY not in str(settings) and "***" in repr(settings)
    assert KEY not in json.dumps(settings.public_dict())
    server.injection = "every"
    server.rate_500 = 0.25  # some failures, so error messages are logged too
    client = LLMClient(settings, ResponseCache(cache_path), progress=False)
    results = client.run(snf_requests(8))
    assert any(not r.ok for r in results)
    assert {r.headers["authorization"] for r in server.records} == {f"Bearer {KEY}"}
    assert KEY not in cache_path.read_text(encoding="utf-8") and server.base_url not in cache_path.read_text()
    assert KEY not in caplog.text and all(KEY not in (r.error or "") for r in results)
    assert llm._one_line(ValueError(f"echoed {KEY}\nsecond line"), KEY) == "ValueError: echoed *** second line"


def test_local_server_without_key_gets_a_placeholder(server, cache_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    settings = settings_from_config(FakeConfig())
    assert settings.base_url == server.base_url and settings.api_key is None and settings.configured
    LLMClient(settings, ResponseCache(cache_path), progress=False).run(snf_requests(1))
    assert server.records[0].headers["authorization"] == f"Bearer {llm.PLACEHOLDER_API_KEY}"


def test_settings_defaults_overrides_and_errors(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    s = settings_from_config(FakeConfig())
    assert s == LLMSettings() and not s.configured
    assert (s.model, s.temperature, s.max_tokens, s.seed, s.timeout, s.max_retries, s.concurrency) == \
        ("gpt-4o-mini", 0.0, 256, 42, 60.0, 5, 8)
    assert (s.structured_output, s.price_prompt, s.price_completion, s.budget_tokens) == (True, 0.15, 0.60, None)
    s = settings_from_config(FakeConfig({"llm_api_key": "k"}, llm_model="m", llm_temperature=1, llm_concurrency=32,
                                        llm_structured_output=False, llm_budget_tokens=1000, llm_base_url="http://x"))
    assert (s.model, s.temperature, s.concurrency, s.structured_output, s.budget_tokens) == ("m", 1.0, 32, False, 1000)
    assert isinstance(s.temperature, float) and s.api_key == "k" and s.base_url == "http://x"
    for key, value in [("llm_concurrency", 0), ("llm_max_tokens", 2.5), ("llm_temperature", "hot"),
                       ("llm_structured_output", "yes"), ("llm_budget_tokens", -1), ("llm_max_retries", True),
                       ("llm_price_prompt", -1), ("llm_timeout", 0)]:
        with pytest.raises(LLMSeRError, match=key):
            settings_from_config(FakeConfig(**{key: value}))


# ----- structured output ---------------------------------------------------------------------------------------
def test_structured_output_steps_down_to_plain_text_once(server, cache_path, caplog):
    caplog.set_level(logging.WARNING, logger="recbole_llmser")
    server.reject_response_format = True  # 400 for any response_format: json_schema, then json_object
    requests = snf_requests(6)
    client = make_client(server, cache_path, concurrency=4)
    results = client.run(requests)
    assert all(match_answer(r.text, candidate_titles(i), K).status == "ok" for i, r in enumerate(results))
    bodies = server.chat_bodies()
    assert [b.get("response_format", {}).get("type") for b in bodies[:2]] == ["json_schema", "json_object"]
    assert len(bodies) == 8 and all("response_format" not in b for b in bodies[2:])
    assert sum("rejects response_format" in r.getMessage() for r in caplog.records) == 2  # one line per step
    assert client.stats.output_mode == client.output_mode == "text" and client.stats.failures == {}
    # the answers are stored under the configured request's key: the same configuration re-runs for free
    server.reset()
    make_client(server, cache_path).run(requests)
    assert server.calls() == 0


def test_plain_text_mode_sends_no_response_format(server, cache_path):
    make_client(server, cache_path, structured_output=False).run(snf_requests(2))
    assert all("response_format" not in b for b in server.chat_bodies())


# ----- token counting ------------------------------------------------------------------------------------------
def test_token_counter_offline_fallback_warns_once(monkeypatch, caplog):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    caplog.set_level(logging.WARNING, logger="recbole_llmser")
    counter = TokenCounter("gpt-4o-mini")
    assert counter.method == "heuristic"
    assert counter.count_text("abcdefgh") == 2 and counter.count_text("abcdefghi") == 3
    assert counter.count_messages([{"role": "user", "content": "abcd"}, {"role": "system", "content": ""}]) == \
        1 + 2 * MESSAGE_OVERHEAD_TOKENS + REPLY_PRIMING_TOKENS
    for _ in range(3):
        counter.count_text("more text")
    warnings = [r for r in caplog.records if "tiktoken" in r.getMessage()]
    assert len(warnings) == 1 and "heuristic" in warnings[0].getMessage()


def test_token_counter_uses_tiktoken_when_available(monkeypatch):
    import tiktoken

    class Encoding:
        name = "fake_base"

        def encode(self, text, disallowed_special=()):
            return text.split()

    names = []
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: names.append(name) or Encoding())
    assert TokenCounter("gpt-4o-mini").method == "tiktoken:fake_base" and names == ["o200k_base"]
    counter = TokenCounter("my-local-llama")
    assert names[-1] == "cl100k_base" and counter.count_text("three word text") == 3


def test_missing_usage_is_counted_locally(server, cache_path):
    server.include_usage = False
    request = snf_requests(1)[0]
    client = make_client(server, cache_path)
    result = client.run([request])[0]
    counter = client.token_counter
    assert result.prompt_tokens == counter.count_messages(request.messages) + counter.count_text(
        json.dumps(request.schema))
    assert result.completion_tokens == counter.count_text(result.text) > 0


# ----- concurrency ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("concurrency", [32, 256])
def test_concurrency_calls_are_in_flight_at_once(server, cache_path, concurrency):
    """The server holds every call until ``concurrency`` are in flight together (and would let them go after 30 s
    otherwise): its high-water mark shows whether the client really had that many calls out, without timing."""
    client = make_client(server, cache_path, concurrency=concurrency, timeout=60.0)
    client.run(snf_requests(1, start=10_000))  # the structured-output probe: a run's first call goes alone
    server.reset()
    server.hold_until, server.hold_timeout = concurrency, 30.0
    results = client.run(snf_requests(2 * concurrency))
    assert all(r.ok for r in results) and server.calls() == 2 * concurrency
    assert server.max_in_flight == concurrency  # never more than llm_concurrency either


def test_stream_reads_a_generator_a_bounded_window_ahead(server, cache_path):
    """A stream pulls at most ``4 x llm_concurrency`` requests ahead of the answers it has handed back, whatever
    the number of requests, and hands back every request exactly once."""
    client = make_client(server, cache_path, concurrency=4)
    pulled, ahead = [0], []

    def requests():
        for request in snf_requests(300):
            pulled[0] += 1
            yield request

    seen = []
    for answer in client.stream(requests(), total=300):
        seen.append(answer.index)
        ahead.append(pulled[0] - len(seen))
        assert answer.result.ok and answer.request.id == f"u{answer.index}:snf"
    assert sorted(seen) == list(range(300)) and server.calls() == 300
    assert max(ahead) <= client.window == 16


def test_stream_caches_each_answer_before_handing_it_back(server, cache_path):
    server.latency = 0.01
    client = make_client(server, cache_path, concurrency=8)
    for answer in client.stream(snf_requests(40)):
        on_disk = ResponseCache(cache_path)  # what a killed run would find
        assert on_disk.get(client.key(answer.request))["text"] == answer.result.text


def test_stream_in_request_order_and_closed_early(server, cache_path):
    server.latency = 0.01
    client = make_client(server, cache_path, concurrency=8)
    stream = client.stream(snf_requests(60), ordered=True)
    first = [next(stream) for _ in range(20)]
    assert [a.index for a in first] == list(range(20))
    stream.close()  # the calls in flight are cancelled; what was answered is cached
    made = server.calls()
    assert 20 <= made <= 20 + client.window
    answered = len(cache_lines(cache_path))
    assert 20 <= answered <= made
    rest = list(make_client(server, cache_path, concurrency=8).stream(snf_requests(60), ordered=True))
    assert [a.index for a in rest] == list(range(60)) and all(a.result.ok for a in rest)
    assert server.calls() == made + 60 - answered  # nothing cached is asked again


def test_stream_identical_requests_share_a_call_and_results_match_run(server, cache_path):
    requests = snf_requests(10) * 3
    client = make_client(server, cache_path, concurrency=4)
    streamed = {a.index: a.result for a in client.stream(iter(requests))}
    assert server.calls() == 10 and len(streamed) == 30
    again = make_client(server, cache_path).run(requests)
    assert [r.text for r in again] == [streamed[i].text for i in range(30)] and server.calls() == 10


def test_settings_from_the_real_config(monkeypatch):
    from recbole_llmser.config import Config

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    config = Config("SASRec", "amazon-fashion-ids",
                    cmd_args=[f"--llm_api_key={KEY}", "--llm_concurrency=4", "--llm_base_url=http://127.0.0.1:1/v1"])
    settings = settings_from_config(config)
    assert (settings.api_key, settings.concurrency, settings.base_url) == (KEY, 4, "http://127.0.0.1:1/v1")
    assert settings.model == "gpt-4o-mini" and KEY not in str(config.to_dict())


def test_server_embeddings_and_models_endpoints(server):
    import math

    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["fake-llm"]
    out = client.embeddings.create(model="fake-embed", input=["red summer dress", "red summer dress", "blue hat"])
    a, b, c = (d.embedding for d in out.data)
    assert a == b != c and len(a) == 64 and math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-6)
    as_floats = client.embeddings.create(model="fake-embed", input="red summer dress", encoding_format="float")
    assert math.isclose(sum(x * y for x, y in zip(a, as_floats.data[0].embedding)), 1.0, rel_tol=1e-6)
    bodies = [r.body for r in server.records if r.path == "/v1/embeddings"]
    assert [b.get("encoding_format") for b in bodies] == ["base64", "float"] and out.usage.prompt_tokens == 8
