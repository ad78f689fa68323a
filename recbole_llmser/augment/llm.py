"""LLM access for the augmentation stages: one OpenAI-compatible client (:class:`LLMClient`) with bounded
concurrency, failure handling and a token budget; requests and results.

The pieces it uses live beside it: the ``llm_*`` properties in ``llm_settings.py``, the persistent response cache
and its key in ``llm_cache.py``, token counting and dry-run estimates in ``llm_tokens.py``. This module is the entry
point: it also exports those (:data:`__all__`).

Failures
========
The openai client retries 429, 5xx, timeouts and connection errors itself (``llm_max_retries``). What still
fails becomes a result with ``text=None`` and ``error_kind``: ``rate_limit`` (429), ``server`` (5xx or an
unreadable body), ``timeout``, ``connection``, ``bad_request`` (other 4xx), ``empty`` (no choices or no text);
``error`` is one line with the key masked. One bad call never stops the run, except errors no later call can
get past (401, 403, 404: wrong key, no access, unknown model or route): then no further call starts, the calls
in flight finish and are cached, and ``run`` raises :class:`LLMSeRError`.

Structured output
=================
The output mode (:data:`OUTPUT_MODES`) is decided once per client, i.e. per run, and kept for all its calls,
concurrent ones included. With ``llm_structured_output`` the first call with a schema *probes*: it sends
``response_format`` ``json_schema`` while the other calls wait, and it is made without the client's retries, so a
server that answers json_schema with a 5xx costs one request, not 1 + ``llm_max_retries`` with back-off (a probe
that fails for another reason, e.g. a 503 or a timeout, is made again with the retries left: 1 +
``llm_max_retries`` attempts in all, as for any call). ANY error whose message or body names ``response_format``
or ``json_schema``, whatever its status (OpenAI and vLLM answer 400; llama-cpp-python's server, which accepts only
``text`` and ``json_object``, answers 500), steps the run down one mode, logged once per step, however many calls
in flight met it: ``json_object`` (``response_format={"type": "json_object"}``, the schema described at the end of
the prompt), then plain ``text``; the call is made again in the new mode (a different request, not a retry). When
the probe is over the calls go concurrently in the mode reached. The log's summary lines name the mode the
answers came in and ``LLMStats.output_mode`` (the summary's ``llm.output_mode``) records it (None: no call of this
run was answered; ``text`` from the start without ``llm_structured_output``). Answers are cached under the
configured request's key whatever the mode, so the same configuration re-runs from the cache.

A user whose SNF or ARV call failed falls back (``snf_fallback``; CCG order for ARV). The kinds in
:data:`RETRYABLE_ERROR_KINDS` (``rate_limit``, ``server``, ``timeout``, ``connection``: the endpoint or the
network failed, not the model) are *failed calls*: the augmentation artifact's summary lists those users
(``llm_failed``), and a later run that finds the artifact rebuilds it (``llm_retry_failed``, default true):
the cache answers every call that succeeded, so only the failed calls (and the ARV calls of users whose SNF
answer thereby changes) reach the endpoint. ``bad_request`` (the endpoint rejected this very request, e.g. a
prompt over the context length) and ``empty`` (a 200 answer without text) are not: asking the same request
again gets the same answer, like a refusal. A spent budget or a fatal error stops the run before any artifact
is written, so there is nothing to list: the re-run resumes from the cache.

The openai client's transport logs one INFO line per HTTP request (``httpx``, or ``httpx2`` in openai 3.x)
and one per retry (``openai``); :func:`quiet_http_logs` raises those loggers to WARNING while calls are made
(a level set on purpose, e.g. by ``OPENAI_LOG=debug``, is kept).

Budget
======
``llm_budget_tokens`` counts the prompt + completion tokens reported by the server (or counted locally when
the server reports none) for the real calls one :class:`LLMClient` makes, over all its ``run`` calls; cache
hits are free. Before each call starts, the client checks whether the budget is already spent; if so, that
call and every later one is not started. Calls already in flight finish and are cached, so the budget may be
overshot by at most ``llm_concurrency`` calls. Then ``run`` raises :class:`BudgetExceeded`, which carries the
results (``None`` for the calls not started). Nothing is lost: re-running with a larger budget resumes from
the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field, fields, replace
from functools import cached_property

import openai

from recbole_llmser.augment.llm_cache import ResponseCache, request_key
from recbole_llmser.augment.llm_settings import LLMSettings, settings_from_config
from recbole_llmser.augment.llm_tokens import DryRunEstimate, TokenCounter
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.progress import Progress

__all__ = [
    "ERROR_KINDS", "RETRYABLE_ERROR_KINDS", "OUTPUT_MODES", "HTTP_LOGGERS", "PLACEHOLDER_API_KEY", "LLMRequest",
    "LLMResult", "LLMStats", "BudgetExceeded", "LLMClient", "quiet_http_logs",
    # from llm_settings.py, llm_cache.py, llm_tokens.py
    "LLMSettings", "settings_from_config", "ResponseCache", "request_key", "TokenCounter", "DryRunEstimate",
]

log = logging.getLogger(__name__)

#: What went wrong with a call, after the openai client's own retries.
ERROR_KINDS = ("rate_limit", "server", "timeout", "connection", "bad_request", "empty")
#: Failures of the endpoint or the network, not of the request or the answer: a later run asks them again.
RETRYABLE_ERROR_KINDS = ("rate_limit", "server", "timeout", "connection")

#: Structured-output modes, most constrained first: a run steps down one when the endpoint rejects its mode.
OUTPUT_MODES = ("json_schema", "json_object", "text")

#: Loggers that write one INFO line per HTTP request or retry (httpx2: openai 3.x's transport; httpx: older).
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")

#: API key sent to an endpoint configured without one (local servers ignore it; the openai client needs one).
PLACEHOLDER_API_KEY = "not-needed"

#: Errors that no other call can get past (wrong key, no access, unknown model or route): stop the run.
_FATAL_ERRORS = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


# ----- requests and results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LLMRequest:
    """One chat call.

    Attributes:
        id: the caller's name for it (e.g. ``"<user>:snf"``), echoed in the result.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        template_version: the prompt template's version (part of the cache key).
        schema: OpenAI ``json_schema`` object (``{"name", "schema", "strict"}``) for structured output, or None.
        expected_completion_tokens: the dry run's guess of the answer length (None: ``llm_max_tokens``).
    """

    id: str
    messages: list
    template_version: str
    schema: dict | None = None
    expected_completion_tokens: int | None = None


@dataclass(frozen=True)
class LLMResult:
    """The outcome of one request: ``text`` is the model's answer, or None with ``error_kind`` and ``error``."""

    id: str
    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error_kind: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.text is not None

    @property
    def retryable(self) -> bool:
        """Whether the call failed for a reason a later call may not meet (:data:`RETRYABLE_ERROR_KINDS`)."""
        return self.error_kind in RETRYABLE_ERROR_KINDS


@dataclass
class LLMStats:
    """Counters over a client's lifetime (all its ``run`` calls)."""

    calls: int = 0  # real calls finished, answered or failed
    cache_hits: int = 0  # requests answered without a call (cache file, or an identical request in the run)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: dict = field(default_factory=dict)  # error kind -> count
    not_started: int = 0  # calls not started because the budget was spent (or the run had to stop)
    wall_time: float = 0.0  # seconds inside run()
    output_mode: str | None = None  # the structured-output mode answers came in (None: no call answered yet)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total_tokens": self.total_tokens}


class BudgetExceeded(LLMSeRError):
    """``llm_budget_tokens`` was spent: the finished calls are cached, ``results`` has None for the rest."""

    def __init__(self, spent: int, budget: int, finished: int, not_started: int, results: list):
        super().__init__(
            f"LLM token budget spent: {spent:,} of llm_budget_tokens={budget:,} tokens; {finished} call(s) "
            f"finished (answers cached), {not_started} request(s) not started; raise llm_budget_tokens and "
            "re-run to resume"
        )
        self.spent, self.budget, self.finished, self.not_started, self.results = (
            spent, budget, finished, not_started, results)


# ----- logging -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_http_logs(names=HTTP_LOGGERS, level: int = logging.WARNING):
    """Inside the block, the loggers ``names`` whose level is unset log at ``level`` at least; restored after.

    RecBole's logger writes INFO to the run's log: one line per call would bury the run's own lines. A logger
    given a level on purpose (``OPENAI_LOG=debug`` sets ``openai``'s) is left alone.
    """
    changed = [logging.getLogger(name) for name in names if logging.getLogger(name).level == logging.NOTSET]
    for logger in changed:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger in changed:
            logger.setLevel(logging.NOTSET)


# ----- client --------------------------------------------------------------------------------------------------
class LLMClient:
    """Runs chat requests against an OpenAI-compatible endpoint, through the cache, with bounded concurrency.

    Args:
        settings: see :func:`settings_from_config`.
        cache: the :class:`ResponseCache` to read and append to.
        progress: show a tqdm progress bar (else heartbeat lines in the log: recbole_llmser.progress).
    """

    def __init__(self, settings: LLMSettings, cache: ResponseCache, progress: bool = True):
        self.settings = settings
        self.cache = cache
        self.progress = progress
        self.stats = LLMStats()
        self._mode = OUTPUT_MODES[0] if settings.structured_output else "text"  # see "Structured output"
        self._probed = not settings.structured_output  # whether the first call with a schema has been made
        if self._probed:
            self.stats.output_mode = self._mode
        self._probe_lock: asyncio.Lock | None = None
        self._fatal: str | None = None

    @property
    def output_mode(self) -> str:
        """The structured-output mode calls are made in now (see the module doc)."""
        return self._mode

    @cached_property
    def token_counter(self) -> TokenCounter:
        return TokenCounter(self.settings.model)

    def key(self, request: LLMRequest) -> str:
        """The request's cache key (also a stable hash of the prompt for artifacts)."""
        return request_key(self.settings, request)

    # ----- dry run ---------------------------------------------------------------------------------------------
    def estimate(self, requests: list) -> DryRunEstimate:
        """What :meth:`run` would cost, without any call.

        Calls: distinct requests not in the cache. Prompt tokens: :class:`TokenCounter` over the messages (plus
        the schema when structured output is on). Completion tokens: at most ``llm_max_tokens`` per call;
        expected: each request's ``expected_completion_tokens`` (capped at ``llm_max_tokens``; unset counts as
        ``llm_max_tokens``). Cost: tokens times ``llm_price_*`` per 1M tokens.
        """
        s = self.settings
        misses = self._unique_misses(requests, [self.key(r) for r in requests])
        prompt = sum(self._prompt_tokens(r) for r in misses.values())
        expected = sum(min(r.expected_completion_tokens or s.max_tokens, s.max_tokens) for r in misses.values())
        most = s.max_tokens * len(misses)
        return DryRunEstimate(
            model=s.model, token_method=self.token_counter.method, requests=len(requests),
            cached=len(requests) - len(misses), calls=len(misses), prompt_tokens=prompt,
            completion_tokens_expected=expected, completion_tokens_max=most,
            cost_expected_usd=self._cost(prompt, expected), cost_max_usd=self._cost(prompt, most),
            max_tokens=s.max_tokens, budget_tokens=s.budget_tokens,
        )

    def _prompt_tokens(self, request: LLMRequest) -> int:
        tokens = self.token_counter.count_messages(request.messages)
        if self.settings.structured_output and request.schema:
            tokens += self.token_counter.count_text(json.dumps(request.schema))
        return tokens

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        s = self.settings
        return (prompt_tokens * s.price_prompt + completion_tokens * s.price_completion) / 1e6

    def _unique_misses(self, requests: list, keys: list) -> dict:
        """First request of every key that is not in the cache, in request order."""
        misses = {}
        for request, key in zip(requests, keys):
            if key not in self.cache and key not in misses:
                misses[key] = request
        return misses

    # ----- run -------------------------------------------------------------------------------------------------
    def run(self, requests: list, desc: str = "LLM") -> list:
        """Answer ``requests`` (results in request order); see :meth:`arun`. Not for use inside an event loop."""
        return asyncio.run(self.arun(requests, desc))

    async def arun(self, requests: list, desc: str = "LLM") -> list:
        """Answer ``requests``: cache hits first, then the misses, at most ``llm_concurrency`` at a time.

        Each finished call is cached at once. Failed calls give results with ``error_kind`` (never an
        exception). Raises :class:`BudgetExceeded` when the budget stopped some calls, and
        :class:`LLMSeRError` when the endpoint refused the key, the model or the route (after the calls in
        flight finished and were cached).
        """
        start = time.monotonic()
        keys = [self.key(request) for request in requests]
        misses = self._unique_misses(requests, keys)
        answered: dict[str, LLMResult] = {}
        try:
            if misses:
                with quiet_http_logs():
                    await self._call_all(misses, answered, desc)
        finally:
            self.stats.wall_time += time.monotonic() - start
        caller = {}  # key -> position of the request that made the call
        for i, key in enumerate(keys):
            if key in misses:
                caller.setdefault(key, i)
        results = [self._result_for(request, key, caller.get(key) == i, answered)
                   for i, (request, key) in enumerate(zip(requests, keys))]
        self._log_summary(desc, results)
        self._raise_if_stopped(results)
        return results

    def _result_for(self, request: LLMRequest, key: str, made_call: bool, answered: dict) -> LLMResult | None:
        """The request's result; None when its call was not started (budget or a fatal error)."""
        result = answered.get(key)
        if result is None:
            entry = self.cache.get(key)
            if entry is None:
                return None
            result = LLMResult(request.id, entry["text"], entry.get("prompt_tokens", 0),
                               entry.get("completion_tokens", 0))
        elif made_call or not result.ok:
            return replace(result, id=request.id)
        self.stats.cache_hits += 1
        return replace(result, id=request.id, cached=True)

    async def _call_all(self, misses: dict, answered: dict, desc: str) -> None:
        semaphore = asyncio.Semaphore(self.settings.concurrency)
        self._probe_lock = asyncio.Lock()  # bound to this run's event loop
        bar = Progress(len(misses), desc, self.progress, unit="calls")

        async def one(client: openai.AsyncOpenAI, key: str, request: LLMRequest) -> None:
            async with semaphore:
                result = await self._start(client, request)
            if result is None:
                self.stats.not_started += 1
                return
            self._record(key, result)
            answered[key] = result
            bar.update(1)

        try:
            async with self._make_client() as client:
                await asyncio.gather(*(one(client, key, request) for key, request in misses.items()))
        finally:
            bar.close()

    def _make_client(self) -> openai.AsyncOpenAI:
        s = self.settings
        if not s.configured:
            raise LLMSeRError("no LLM endpoint configured: set OPENAI_BASE_URL (or llm_base_url) for a local "
                              "server, or OPENAI_API_KEY for OpenAI's API")
        return openai.AsyncOpenAI(base_url=s.base_url, api_key=s.api_key or PLACEHOLDER_API_KEY,
                                  timeout=s.timeout, max_retries=s.max_retries)

    def _must_stop(self) -> bool:
        budget = self.settings.budget_tokens
        return self._fatal is not None or (budget is not None and self.stats.total_tokens >= budget)

    async def _start(self, client: openai.AsyncOpenAI, request: LLMRequest) -> LLMResult | None:
        """The request's call, or None when it must not start (budget spent, fatal error). Until the first call
        with a schema (the probe) is over, the other calls with a schema wait for it."""
        if request.schema and not self._probed:
            async with self._probe_lock:
                if not self._probed:
                    if self._must_stop():
                        return None
                    try:
                        return await self._call(client, request, probe=True)
                    finally:
                        self._probed = True
        return None if self._must_stop() else await self._call(client, request)

    async def _call(self, client: openai.AsyncOpenAI, request: LLMRequest, probe: bool = False) -> LLMResult:
        """One call in the current output mode. ``probe``: without the client's retries (see the module doc)."""
        mode = self._mode if request.schema else "text"
        sender = client.with_options(max_retries=0) if probe else client
        try:
            response = await sender.chat.completions.create(**self._create_args(request, mode))
        except (openai.OpenAIError, json.JSONDecodeError) as err:
            if mode != "text" and _rejects_response_format(err):
                self._step_down(mode, err)
                return await self._call(client, request, probe=probe)
            if isinstance(err, _FATAL_ERRORS):
                self._fatal = self._fatal or _one_line(err, self.settings.api_key)
                return self._failure(request, "bad_request", err)
            retries = self.settings.max_retries
            if probe and retries and _client_retries(err):
                return await self._call(client.with_options(max_retries=retries - 1), request)
            return self._failure(request, _error_kind(err), err)
        if request.schema and self.stats.output_mode != mode:
            self.stats.output_mode = mode
            log.info("LLM output mode: %s (the endpoint answers in it)", mode)
        return self._success(request, response)

    def _create_args(self, request: LLMRequest, mode: str) -> dict:
        s = self.settings
        args = {"model": s.model, "messages": request.messages, "temperature": s.temperature,
                "max_tokens": s.max_tokens, "seed": s.seed}
        if mode == "json_schema":
            args["response_format"] = {"type": "json_schema", "json_schema": request.schema}
        elif mode == "json_object":
            args["response_format"] = {"type": "json_object"}
            args["messages"] = _with_schema(request.messages, request.schema)
        return args

    def _step_down(self, mode: str, err: Exception) -> None:
        """The endpoint rejected ``mode``: the run asks in the next mode from now on (once per step, however many
        calls were rejected)."""
        if self._mode != mode:
            return
        self._mode = OUTPUT_MODES[OUTPUT_MODES.index(mode) + 1]
        how = ("json_object, with the schema described in the prompt" if self._mode == "json_object"
               else "plain-text answers")
        log.warning("the LLM endpoint rejects response_format %s (%s); asking for %s for the rest of this run "
                    "(llm_structured_output: false skips structured output)", mode,
                    _one_line(err, self.settings.api_key, 160), how)

    def _success(self, request: LLMRequest, response) -> LLMResult:
        choices = getattr(response, "choices", None) or []
        message = getattr(choices[0], "message", None) if choices else None
        text = getattr(message, "content", None)
        if not isinstance(text, str) or not text.strip():
            return LLMResult(request.id, None, error_kind="empty", error="the response has no answer text")
        usage = getattr(response, "usage", None)
        if usage is not None and usage.prompt_tokens is not None:
            prompt, completion = usage.prompt_tokens, usage.completion_tokens or 0
        else:
            prompt, completion = self._prompt_tokens(request), self.token_counter.count_text(text)
        return LLMResult(request.id, text, prompt, completion)

    def _failure(self, request: LLMRequest, kind: str, err: Exception) -> LLMResult:
        message = _one_line(err, self.settings.api_key)
        log.debug("LLM call %s failed (%s): %s", request.id, kind, message)
        return LLMResult(request.id, None, error_kind=kind, error=message)

    def _record(self, key: str, result: LLMResult) -> None:
        self.stats.calls += 1
        self.stats.prompt_tokens += result.prompt_tokens
        self.stats.completion_tokens += result.completion_tokens
        if result.ok:
            self.cache.append(key, result.text, result.prompt_tokens, result.completion_tokens, self.settings.model)
        else:
            self.stats.failures[result.error_kind] = self.stats.failures.get(result.error_kind, 0) + 1

    def _log_summary(self, desc: str, results: list) -> None:
        failed = {}
        for r in results:
            if r is not None and not r.ok:
                failed[r.error_kind] = failed.get(r.error_kind, 0) + 1
        level = logging.WARNING if failed else logging.INFO
        log.log(level, "%s: %d request(s), %d from the cache, %d failed %s; output mode %s; client total %d "
                "call(s), %d tokens", desc, len(results), sum(bool(r and r.cached) for r in results),
                sum(failed.values()), failed, self.stats.output_mode or "undecided (no call)", self.stats.calls,
                self.stats.total_tokens)

    def _raise_if_stopped(self, results: list) -> None:
        not_started = sum(r is None for r in results)
        if self._fatal is not None:
            raise LLMSeRError(f"the LLM endpoint refused the request ({self._fatal}); check llm_model, "
                              "llm_base_url / OPENAI_BASE_URL and the API key")
        if not_started:
            raise BudgetExceeded(self.stats.total_tokens, self.settings.budget_tokens,
                                 sum(r is not None and not r.cached for r in results), not_started, results)


def _rejects_response_format(err: Exception) -> bool:
    """Whether an error answer (any HTTP status) names ``response_format`` or ``json_schema``."""
    if not isinstance(err, openai.APIStatusError):
        return False
    text = f"{err.message} {err.body}".lower()
    return "response_format" in text or "json_schema" in text


def _client_retries(err: Exception) -> bool:
    """Whether the openai client retries this error itself (timeouts, connection errors, 408, 409, 429, 5xx)."""
    if isinstance(err, openai.APIConnectionError):  # APITimeoutError included
        return True
    return isinstance(err, openai.APIStatusError) and (err.status_code in (408, 409, 429) or err.status_code >= 500)


def _with_schema(messages: list, schema: dict) -> list:
    """``messages`` with the answer's JSON schema described at the end of the last user message (json_object
    mode: the server enforces JSON, the prompt says which)."""
    described = json.dumps(schema.get("schema", schema), separators=(",", ":"))
    out = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(out) if m.get("role") == "user"), default=len(out) - 1)
    out[last]["content"] = f"{out[last].get('content', '')}\n\nThe JSON object must match this JSON schema: {described}"
    return out


def _error_kind(err: Exception) -> str:
    if isinstance(err, openai.APITimeoutError):
        return "timeout"
    if isinstance(err, openai.APIConnectionError):
        return "connection"
    if isinstance(err, openai.RateLimitError):
        return "rate_limit"
    if isinstance(err, openai.APIStatusError):
        return "server" if err.status_code >= 500 else "bad_request"
    return "server"  # an unreadable response body (invalid JSON, failed validation)


def _one_line(err: Exception, secret: str | None, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters, with the secret masked."""
    text = re.sub(r"\s+", " ", f"{type(err).__name__}: {err}").strip()
    if secret:
        text = text.replace(secret, "***")
    return text[:limit]
