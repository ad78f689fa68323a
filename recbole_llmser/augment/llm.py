"""LLM access for the augmentation stages: one OpenAI-compatible client, a persistent response cache, token
counting, dry-run estimates and a token budget.

Properties (``properties/overall.yaml``; ``--key=value`` on the command line)
=============================================================================

=========================  ==============  ================================================================
key                        default         meaning
=========================  ==============  ================================================================
``llm_model``              ``gpt-4o-mini`` model name sent to the endpoint (part of the cache key)
``llm_base_url``           ``~``           OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp ...); unset:
                                           the environment variable ``OPENAI_BASE_URL``, else OpenAI's API
``llm_api_key``            ``~``           secret; unset: the environment variable ``OPENAI_API_KEY``. A local
                                           server with no key gets the placeholder ``not-needed``
``llm_temperature``        ``0.0``         sampling temperature
``llm_max_tokens``         ``256``         completion length limit per call (also the dry run's upper bound)
``llm_seed``               ``42``          sent as ``seed`` (servers that support it sample reproducibly)
``llm_timeout``            ``60``          seconds per request (per attempt)
``llm_max_retries``        ``5``           the openai client's own retries (429, 5xx, timeouts, connection
                                           errors, with its exponential backoff); we add no retry loop
``llm_concurrency``        ``8``           calls in flight at once
``llm_structured_output``  ``true``        send ``response_format={"type": "json_schema", ...}`` with the
                                           request's schema; falls back to plain text for the rest of the
                                           run when the server rejects it; ``false``: plain text
``llm_price_prompt``       ``0.15``        USD per 1M prompt tokens (dry-run cost)
``llm_price_completion``   ``0.60``        USD per 1M completion tokens
``llm_budget_tokens``      ``~``           prompt + completion tokens this client may spend on real calls
                                           (``~``: unlimited); see "Budget" below
``llm_retry_failed``       ``true``        read by ``augment/pipeline.py``: a reused artifact whose users fell
                                           back because their calls failed is rebuilt, asking those calls
                                           again; see "Failures" below. ``false``: reuse it as is
=========================  ==============  ================================================================

The API key is never logged, cached, written to a file or shown by ``repr(LLMSettings)``.

Cache
=====
:class:`ResponseCache` is an append-only JSON-lines file, one line per finished call
(``{"key", "text", "prompt_tokens", "completion_tokens", "model", "error": null}``), appended with one
``write`` + ``fsync`` as soon as the call finishes, so a killed run loses no finished call and a re-run makes no
call it already paid for. The key is a sha256 over the model, the messages, the sampling parameters
(temperature, max_tokens, seed, structured-output flag and schema) and the prompt template version; never the
API key or the endpoint. Failed calls are not cached (a re-run makes them again; see "Failures" for
artifacts built while calls failed); answers that later prove malformed or refusals are (they are what the
model said). When the server rejects structured output, the
plain-text answers are stored under the configured request's key, so re-running the same configuration makes
no call.

Failures
========
The openai client retries 429, 5xx, timeouts and connection errors itself (``llm_max_retries``). What still
fails becomes a result with ``text=None`` and ``error_kind``: ``rate_limit`` (429), ``server`` (5xx or an
unreadable body), ``timeout``, ``connection``, ``bad_request`` (other 4xx), ``empty`` (no choices or no text);
``error`` is one line with the key masked. One bad call never stops the run, except errors no later call can
get past (401, 403, 404: wrong key, no access, unknown model or route): then no further call starts, the calls
in flight finish and are cached, and ``run`` raises :class:`LLMSeRError`. A 400 that mentions
``response_format``/``json_schema`` switches the run to plain text (logged once) and the call is made again
without it (a different request, not a retry).

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
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path

import openai
from tqdm import tqdm

from recbole_llmser.errors import LLMSeRError

log = logging.getLogger(__name__)

#: What went wrong with a call, after the openai client's own retries.
ERROR_KINDS = ("rate_limit", "server", "timeout", "connection", "bad_request", "empty")
#: Failures of the endpoint or the network, not of the request or the answer: a later run asks them again.
RETRYABLE_ERROR_KINDS = ("rate_limit", "server", "timeout", "connection")

#: Loggers that write one INFO line per HTTP request or retry (httpx2: openai 3.x's transport; httpx: older).
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")

#: API key sent to an endpoint configured without one (local servers ignore it; the openai client needs one).
PLACEHOLDER_API_KEY = "not-needed"

#: Token-count heuristic when tiktoken's encoding cannot be loaded (offline): ceil(characters / 4) per text.
HEURISTIC_CHARS_PER_TOKEN = 4
#: Tokens each chat message adds around its content, and tokens that prime the reply (OpenAI's cookbook).
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3

#: Errors that no other call can get past (wrong key, no access, unknown model or route): stop the run.
_FATAL_ERRORS = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


# ----- settings ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class LLMSettings:
    """Everything the client needs; build it with :func:`settings_from_config`. ``repr`` masks the key."""

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key: str | None = None
    temperature: float = 0.0
    max_tokens: int = 256
    seed: int = 42
    timeout: float = 60.0
    max_retries: int = 5
    concurrency: int = 8
    structured_output: bool = True
    price_prompt: float = 0.15
    price_completion: float = 0.60
    budget_tokens: int | None = None

    @property
    def configured(self) -> bool:
        """Whether an endpoint is configured (a base URL or an API key); else the offline backend applies."""
        return bool(self.base_url or self.api_key)

    def public_dict(self) -> dict:
        """The settings without the key (``"***"`` when one is set): safe for logs and artifacts."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["api_key"] = "***" if self.api_key else None
        return out

    def __repr__(self) -> str:
        return "LLMSettings(" + ", ".join(f"{k}={v!r}" for k, v in self.public_dict().items()) + ")"


def settings_from_config(config) -> LLMSettings:
    """Read the ``llm_*`` properties (see the module docstring) from a Config-like object.

    ``config[key]`` must return ``None`` for a missing key; ``config.secret(key, env=...)`` gives the API key.
    Raises :class:`LLMSeRError` (one line) for an invalid value.
    """
    d = LLMSettings()

    def read(key, default, valid, expect):
        value = config[key]
        if value is None:
            return default
        if not valid(value):
            raise LLMSeRError(f"property '{key}' = {value!r}: expected {expect}")
        return value

    def price(key, default):
        return float(read(key, default, lambda v: _is_number(v) and v >= 0, "a price in USD per 1M tokens >= 0"))

    return LLMSettings(
        model=read("llm_model", d.model, lambda v: isinstance(v, str) and v.strip(), "a model name"),
        base_url=read("llm_base_url", None, lambda v: isinstance(v, str), "a URL")
        or os.environ.get("OPENAI_BASE_URL") or None,
        api_key=config.secret("llm_api_key", env="OPENAI_API_KEY"),
        temperature=float(read("llm_temperature", d.temperature, lambda v: _is_number(v) and 0 <= v <= 2,
                               "a number in [0, 2]")),
        max_tokens=read("llm_max_tokens", d.max_tokens, _int_at_least(1), "an integer >= 1"),
        seed=read("llm_seed", d.seed, _is_int, "an integer"),
        timeout=float(read("llm_timeout", d.timeout, lambda v: _is_number(v) and v > 0, "seconds > 0")),
        max_retries=read("llm_max_retries", d.max_retries, _int_at_least(0), "an integer >= 0"),
        concurrency=read("llm_concurrency", d.concurrency, _int_at_least(1), "an integer >= 1"),
        structured_output=read("llm_structured_output", d.structured_output, lambda v: isinstance(v, bool),
                               "true or false"),
        price_prompt=price("llm_price_prompt", d.price_prompt),
        price_completion=price("llm_price_completion", d.price_completion),
        budget_tokens=read("llm_budget_tokens", d.budget_tokens, _int_at_least(1), "an integer >= 1 or ~"),
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(minimum: int):
    return lambda v: _is_int(v) and v >= minimum


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


# ----- cache ---------------------------------------------------------------------------------------------------
def request_key(settings: LLMSettings, request: LLMRequest) -> str:
    """Cache key: sha256 of the canonical JSON of model, messages, sampling parameters and template version."""
    structured = bool(settings.structured_output and request.schema)
    payload = {
        "model": settings.model,
        "messages": request.messages,
        "temperature": float(settings.temperature),
        "max_tokens": int(settings.max_tokens),
        "seed": settings.seed,
        "structured": structured,
        "schema": request.schema if structured else None,
        "template_version": request.template_version,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Append-only JSON-lines file of finished calls, loaded into a dict ``key -> entry``.

    Corrupt lines (a torn last line after ``kill -9``, or garbage) are skipped, counted in ``n_corrupt`` and
    logged once; those calls are simply made again. Each append is one ``write`` of one full line, then
    ``fsync``; if the file does not end with a newline (a torn line), the append starts with one. The first
    entry of a key wins. Appends use ``O_APPEND``, so two processes sharing the file do not mix their lines.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.n_corrupt = 0
        self._entries: dict[str, dict] = {}
        self._needs_newline = False
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        self._needs_newline = bool(data) and not data.endswith(b"\n")
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            entry = _parse_entry(line)
            if entry is None:
                self.n_corrupt += 1
            elif entry["error"] is None:
                self._entries.setdefault(entry["key"], entry)
        if self.n_corrupt:
            log.warning("LLM cache %s: skipped %d corrupt line(s) (e.g. torn by a crash); those calls are redone",
                        self.path, self.n_corrupt)

    def get(self, key: str) -> dict | None:
        return self._entries.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, key: str, text: str, prompt_tokens: int, completion_tokens: int, model: str) -> None:
        """Store one finished call durably (one write of one line, then fsync)."""
        entry = {"key": key, "text": text, "prompt_tokens": prompt_tokens,
                 "completion_tokens": completion_tokens, "model": model, "error": None}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        if self._needs_newline:
            line = "\n" + line
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab", buffering=0) as f:
            f.write(line.encode("utf-8"))
            os.fsync(f.fileno())
        self._needs_newline = False
        self._entries.setdefault(key, entry)


def _parse_entry(line: bytes) -> dict | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    ok = (isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("text"), str)
          and "error" in entry)
    return entry if ok else None


# ----- token counting ------------------------------------------------------------------------------------------
class TokenCounter:
    """Counts tokens with tiktoken's encoding for the model (``cl100k_base`` for models tiktoken does not know).

    When the encoding cannot be loaded (offline: tiktoken downloads it on first use), it logs one warning and
    counts ``ceil(characters / 4)`` per text instead. ``method`` says which: ``"tiktoken:<name>"`` or
    ``"heuristic"``.
    """

    def __init__(self, model: str):
        self.encoding = _load_encoding(model)
        self.method = f"tiktoken:{self.encoding.name}" if self.encoding else "heuristic"

    def count_text(self, text: str) -> int:
        if self.encoding is not None:
            return len(self.encoding.encode(text, disallowed_special=()))
        return math.ceil(len(text) / HEURISTIC_CHARS_PER_TOKEN)

    def count_messages(self, messages: list) -> int:
        """Prompt tokens of a chat request: contents + per-message overhead + reply priming."""
        content = sum(self.count_text(str(m.get("content") or "")) for m in messages)
        return content + MESSAGE_OVERHEAD_TOKENS * len(messages) + REPLY_PRIMING_TOKENS


def _load_encoding(model: str):
    try:
        import tiktoken
        import tiktoken.model

        try:
            name = tiktoken.model.encoding_name_for_model(model)
        except KeyError:
            name = "cl100k_base"
        return tiktoken.get_encoding(name)
    except Exception as err:  # noqa: BLE001 - offline download failure, missing package, ...: all mean "no encoding"
        log.warning("tiktoken encoding for %r unavailable (%s); counting tokens heuristically as "
                    "ceil(characters/%d) + %d per message", model, type(err).__name__, HEURISTIC_CHARS_PER_TOKEN,
                    MESSAGE_OVERHEAD_TOKENS)
        return None


# ----- dry run -------------------------------------------------------------------------------------------------
@dataclass
class DryRunEstimate:
    """Calls, tokens and cost the requests would need (cache hits are free). See :meth:`LLMClient.estimate`."""

    model: str
    token_method: str
    requests: int
    cached: int
    calls: int
    prompt_tokens: int
    completion_tokens_expected: int
    completion_tokens_max: int
    cost_expected_usd: float
    cost_max_usd: float
    max_tokens: int
    budget_tokens: int | None

    def __add__(self, other: "DryRunEstimate") -> "DryRunEstimate":
        """Two stages' estimates together (same settings)."""
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)
                  if f.name not in ("model", "token_method", "max_tokens", "budget_tokens")}
        return replace(self, **summed)

    def format(self) -> str:
        budget = "unlimited" if self.budget_tokens is None else f"{self.budget_tokens:,} tokens"
        return "\n".join([
            f"LLM dry run: model {self.model}, tokens counted by {self.token_method}",
            f"  requests           {self.requests:,} ({self.cached:,} in the cache, {self.calls:,} calls needed)",
            f"  prompt tokens      {self.prompt_tokens:,}",
            f"  completion tokens  {self.completion_tokens_expected:,} expected, "
            f"{self.completion_tokens_max:,} at most (llm_max_tokens={self.max_tokens} per call)",
            f"  cost (USD)         ${self.cost_expected_usd:,.4f} expected, ${self.cost_max_usd:,.4f} at most",
            f"  budget             {budget}",
        ])


# ----- client --------------------------------------------------------------------------------------------------
class LLMClient:
    """Runs chat requests against an OpenAI-compatible endpoint, through the cache, with bounded concurrency.

    Args:
        settings: see :func:`settings_from_config`.
        cache: the :class:`ResponseCache` to read and append to.
        progress: show a tqdm progress bar.
    """

    def __init__(self, settings: LLMSettings, cache: ResponseCache, progress: bool = True):
        self.settings = settings
        self.cache = cache
        self.progress = progress
        self.stats = LLMStats()
        self._structured = settings.structured_output
        self._fatal: str | None = None

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
        bar = tqdm(total=len(misses), desc=desc, unit="call", disable=not self.progress)

        async def one(client: openai.AsyncOpenAI, key: str, request: LLMRequest) -> None:
            async with semaphore:
                if self._must_stop():
                    self.stats.not_started += 1
                    return
                result = await self._call(client, request)
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

    async def _call(self, client: openai.AsyncOpenAI, request: LLMRequest) -> LLMResult:
        structured = bool(self._structured and request.schema)
        try:
            response = await client.chat.completions.create(**self._create_args(request, structured))
        except openai.BadRequestError as err:
            if structured and _rejects_response_format(err):
                self._disable_structured()
                return await self._call(client, request)
            return self._failure(request, "bad_request", err)
        except _FATAL_ERRORS as err:
            self._fatal = self._fatal or _one_line(err, self.settings.api_key)
            return self._failure(request, "bad_request", err)
        except (openai.OpenAIError, json.JSONDecodeError) as err:
            return self._failure(request, _error_kind(err), err)
        return self._success(request, response)

    def _create_args(self, request: LLMRequest, structured: bool) -> dict:
        s = self.settings
        args = {"model": s.model, "messages": request.messages, "temperature": s.temperature,
                "max_tokens": s.max_tokens, "seed": s.seed}
        if structured:
            args["response_format"] = {"type": "json_schema", "json_schema": request.schema}
        return args

    def _disable_structured(self) -> None:
        if self._structured:
            self._structured = False
            log.warning("the LLM endpoint rejects response_format (structured output); asking for plain-text "
                        "answers for the rest of this run (set llm_structured_output: false to skip the attempt)")

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
        log.log(level, "%s: %d request(s), %d from the cache, %d failed %s; client total %d call(s), %d tokens",
                desc, len(results), sum(bool(r and r.cached) for r in results), sum(failed.values()), failed,
                self.stats.calls, self.stats.total_tokens)

    def _raise_if_stopped(self, results: list) -> None:
        not_started = sum(r is None for r in results)
        if self._fatal is not None:
            raise LLMSeRError(f"the LLM endpoint refused the request ({self._fatal}); check llm_model, "
                              "llm_base_url / OPENAI_BASE_URL and the API key")
        if not_started:
            raise BudgetExceeded(self.stats.total_tokens, self.settings.budget_tokens,
                                 sum(r is not None and not r.cached for r in results), not_started, results)


def _rejects_response_format(err: openai.BadRequestError) -> bool:
    text = f"{err.message} {err.body}".lower()
    return "response_format" in text or "json_schema" in text


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
