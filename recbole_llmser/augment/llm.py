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
import functools
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import NamedTuple

import openai

from recbole_llmser.augment.llm_cache import ResponseCache, request_key
from recbole_llmser.augment.llm_settings import LLMSettings, settings_from_config
from recbole_llmser.augment.llm_tokens import DryRunEstimate, TokenCounter
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.progress import Progress

__all__ = [
    "ERROR_KINDS", "RETRYABLE_ERROR_KINDS", "OUTPUT_MODES", "HTTP_LOGGERS", "PLACEHOLDER_API_KEY", "LLMRequest",
    "LLMResult", "LLMStats", "Answer", "BudgetExceeded", "LLMClient", "WINDOW_PER_CALL", "quiet_http_logs",
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

#: A stream holds at most this many requests per call slot (``llm_concurrency``): pulled from the caller's
#: iterable but not yet handed back. Enough that the next request is ready whenever a call ends.
WINDOW_PER_CALL = 4

#: Call slots per HTTP connection pool. The pool looks at each of its connections for every request, so one pool
#: for 256 slots spends more CPU per call than the call's own work; a client runs one pool per 32 slots.
CALLS_PER_POOL = 32

# markers of the stream's internal queue: a task failed; the feeder pulled the last request; answered later
_FAILED, _FED, _PENDING = object(), object(), object()


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


class Answer(NamedTuple):
    """One item of :meth:`LLMClient.stream`: the request's position in the stream, the request, its result (None:
    not started, the budget was spent or a fatal error stopped the run)."""

    index: int
    request: LLMRequest
    result: LLMResult | None


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
    def estimate(self, requests) -> DryRunEstimate:
        """What :meth:`run` would cost, without any call (``requests``: any iterable, read once; only the keys of
        the distinct calls are kept).

        Calls: distinct requests not in the cache. Prompt tokens: :class:`TokenCounter` over the messages (plus
        the schema when structured output is on). Completion tokens: at most ``llm_max_tokens`` per call;
        expected: each request's ``expected_completion_tokens`` (capped at ``llm_max_tokens``; unset counts as
        ``llm_max_tokens``). Cost: tokens times ``llm_price_*`` per 1M tokens.
        """
        s = self.settings
        n, misses, prompt, expected = 0, set(), 0, 0
        for request in requests:
            n += 1
            key = self.key(request)
            if key not in self.cache and key not in misses:
                misses.add(key)
                prompt += self._prompt_tokens(request)
                expected += min(request.expected_completion_tokens or s.max_tokens, s.max_tokens)
        most = s.max_tokens * len(misses)
        return DryRunEstimate(
            model=s.model, token_method=self.token_counter.method, requests=n,
            cached=n - len(misses), calls=len(misses), prompt_tokens=prompt,
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

    # ----- run -------------------------------------------------------------------------------------------------
    def run(self, requests, desc: str = "LLM") -> list:
        """Answer ``requests`` (results in request order); see :meth:`arun`. Not for use inside an event loop."""
        return asyncio.run(self.arun(requests, desc))

    async def arun(self, requests, desc: str = "LLM") -> list:
        """Answer ``requests`` (a list, or any iterable: it is listed), the results in request order: cache hits
        at once, the misses at most ``llm_concurrency`` at a time, through the same stream as :meth:`stream`.

        Each finished call is cached at once. Failed calls give results with ``error_kind`` (never an
        exception). Raises :class:`BudgetExceeded` when the budget stopped some calls (its ``results`` hold None
        for them), and :class:`LLMSeRError` when the endpoint refused the key, the model or the route (after the
        calls in flight finished and were cached).
        """
        requests = requests if isinstance(requests, list) else list(requests)
        results: list = [None] * len(requests)
        tally = _Tally()
        start = time.monotonic()
        try:
            with quiet_http_logs():
                async for answer in self._answers(requests, desc, len(requests), False, tally):
                    results[answer.index] = answer.result
        finally:
            self.stats.wall_time += time.monotonic() - start
        self._finish(desc, tally, results)
        return results

    def stream(self, requests, desc: str = "LLM", total: int | None = None, ordered: bool = False):
        """Answer the requests of any iterable, a generator included, without listing it: yields one
        :class:`Answer` ``(index, request, result)`` per request; ``index`` is its position in ``requests``.

        ``ordered=False`` (default) yields each result as soon as it is there: cache hits at once, calls as they
        finish. ``ordered=True`` yields them in request order, holding the ones that finish early; a slow call
        then holds back the results behind it (and, once the window below is full, new calls).

        Memory does not grow with the number of requests: the iterable is pulled at most :attr:`window`
        (``4 x llm_concurrency``) requests ahead of the answers handed back, i.e. a request is pulled only
        when a slot is free, and at most ``llm_concurrency`` calls are in flight. Each call's answer is in the
        cache file (fsync'd) before it is yielded, so a stream killed part-way loses no answered call.

        The event loop runs only while the caller waits for the next answer (this thread, no other): calls in
        flight make progress on the server meanwhile, and their answers are read on the next ``next()``. Not
        for use inside a running event loop. ``total``: how many requests there are, for the progress bar
        (default: ``len(requests)`` when it has one; else the bar counts without a total). Cache hits,
        identical requests, the structured-output probe, the budget and fatal errors behave as in :meth:`arun`;
        a request not started (budget, fatal error) is yielded with ``result`` None, and after the last answer
        the stream raises :class:`BudgetExceeded` (``results`` None: a stream keeps no list) or
        :class:`LLMSeRError`. The log's summary line comes when the stream is exhausted.
        """
        if total is None and hasattr(requests, "__len__"):
            total = len(requests)
        tally = _Tally()
        loop = asyncio.new_event_loop()
        answers = self._answers(requests, desc, total, ordered, tally)
        start = time.monotonic()
        try:
            with quiet_http_logs():
                while True:
                    try:
                        answer = loop.run_until_complete(answers.__anext__())
                    except StopAsyncIteration:
                        break
                    yield answer
        finally:
            try:
                loop.run_until_complete(answers.aclose())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
                self.stats.wall_time += time.monotonic() - start
        self._finish(desc, tally, None)

    @property
    def window(self) -> int:
        """Requests a stream holds at most: pulled from the caller's iterable but not yet handed back (queued,
        in flight, or answered and waiting to be yielded)."""
        return WINDOW_PER_CALL * self.settings.concurrency

    async def _answers(self, requests, desc: str, total: int | None, ordered: bool, tally: "_Tally"):
        """The stream behind :meth:`arun` and :meth:`stream`: an async generator of :class:`Answer`.

        A feeder task pulls a request whenever one of :attr:`window` slots is free and sorts it: a cache hit is
        answered at once; a request identical to one in flight waits for that call; one identical to a call of
        this stream that failed gets its failure; anything else goes to a queue that ``llm_concurrency`` worker
        tasks take calls from (the openai client and the workers start with the first such request, so a run
        answered from the cache needs no endpoint). A worker's answer is appended to the cache (group commit,
        :class:`_CacheWriter`) before it is handed on. A slot is freed when its answer is yielded.
        """
        items = iter(requests)
        slots = asyncio.Semaphore(self.window)
        work: asyncio.Queue = asyncio.Queue(maxsize=self.window)  # never full: the slots bound it
        ready: asyncio.Queue = asyncio.Queue()  # answers not yet yielded, and the feeder's end or any task's error
        waiting: dict[str, list] = {}  # key in flight -> [(index, request)] of identical requests waiting for it
        failed: dict[str, LLMResult] = {}  # key -> this stream's failed call (identical requests share it)
        skipped: set = set()  # keys not started (budget spent, fatal error)
        writer = _CacheWriter(self.cache, self.settings.model)
        tasks: list[asyncio.Task] = []
        http: list = []  # the openai clients, once started (:meth:`_make_clients`)
        self._probe_lock = asyncio.Lock()  # bound to this stream's event loop
        bar = Progress(total, desc, self.progress, unit="requests")
        pacer = _Pacer()

        def report_failure(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                ready.put_nowait((_FAILED, task.exception()))

        def spawn(coroutine) -> None:
            task = asyncio.create_task(coroutine)
            task.add_done_callback(report_failure)
            tasks.append(task)

        def twin_result(result: LLMResult | None, twin: LLMRequest) -> LLMResult | None:
            if result is None or not result.ok:
                return result if result is None else replace(result, id=twin.id)
            self.stats.cache_hits += 1
            return replace(result, id=twin.id, cached=True)

        def finish(index: int, key: str, request: LLMRequest, result: LLMResult | None) -> None:
            ready.put_nowait((index, Answer(index, request, result)))
            for twin_index, twin in waiting.pop(key):
                ready.put_nowait((twin_index, Answer(twin_index, twin, twin_result(result, twin))))

        def finish_when_cached(index: int, key: str, request: LLMRequest, result: LLMResult,
                               cached: asyncio.Future) -> None:
            if cached.exception() is not None:  # the cache file could not be written
                ready.put_nowait((_FAILED, cached.exception()))
            else:
                finish(index, key, request, result)

        async def call(client: openai.AsyncOpenAI) -> None:
            while (item := await work.get()) is not None:
                index, key, request = item
                await pacer.wait()
                result = await self._start(client, request)
                pacer.done()
                if result is None:
                    self.stats.not_started += 1
                    skipped.add(key)
                else:
                    self._record(result)
                if result is not None and result.ok:  # handed on once cached; the next call starts meanwhile
                    writer.append(key, result).add_done_callback(
                        functools.partial(finish_when_cached, index, key, request, result))
                else:
                    if result is not None:
                        failed[key] = result
                    finish(index, key, request, result)

        async def feed() -> None:
            index = 0
            while True:
                await slots.acquire()
                try:
                    request = next(items)
                except StopIteration:
                    break
                key = self.key(request)
                entry = self.cache.get(key)
                if entry is not None:
                    self.stats.cache_hits += 1
                    result = LLMResult(request.id, entry["text"], entry.get("prompt_tokens", 0),
                                       entry.get("completion_tokens", 0), cached=True)
                elif key in failed:
                    result = replace(failed[key], id=request.id)
                elif key in waiting:
                    waiting[key].append((index, request))
                    result = _PENDING
                elif key in skipped or self._must_stop():
                    if key not in skipped:
                        self.stats.not_started += 1
                        skipped.add(key)
                    result = None
                else:
                    if not http:
                        http.extend(self._make_clients())
                        for slot in range(self.settings.concurrency):
                            spawn(call(http[slot // CALLS_PER_POOL]))
                    waiting[key] = []
                    await work.put((index, key, request))
                    await asyncio.sleep(0)  # a free call slot starts it now, not once the window is full
                    result = _PENDING
                if result is not _PENDING:
                    ready.put_nowait((index, Answer(index, request, result)))
                index += 1
            ready.put_nowait((_FED, index))

        spawn(feed())
        fed, handled, next_index, held = None, 0, 0, {}
        try:
            while fed is None or handled < fed:
                index, answer = await ready.get()
                if index is _FAILED:
                    raise answer
                if index is _FED:
                    fed = answer
                    continue
                handled += 1
                tally.add(answer.result)
                if not ordered:
                    bar.update(1)
                    slots.release()
                    yield answer
                    continue
                held[index] = answer
                while next_index in held:
                    bar.update(1)
                    slots.release()
                    yield held.pop(next_index)
                    next_index += 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await writer.drain()  # lines already handed to the writer thread are written
            for client in http:
                await client.close()
            bar.close()

    def _make_clients(self) -> list:
        """One openai client per :data:`CALLS_PER_POOL` call slots, each with its own connection pool holding a
        connection per slot (kept alive between calls)."""
        s = self.settings
        if not s.configured:
            raise LLMSeRError("no LLM endpoint configured: set OPENAI_BASE_URL (or llm_base_url) for a local "
                              "server, or OPENAI_API_KEY for OpenAI's API")
        default = openai.DEFAULT_CONNECTION_LIMITS  # 1000 connections, 100 kept alive
        clients = []
        for first in range(0, s.concurrency, CALLS_PER_POOL):
            slots = min(CALLS_PER_POOL, s.concurrency - first)
            limits = type(default)(max_connections=max(default.max_connections, slots),
                                   max_keepalive_connections=max(default.max_keepalive_connections, slots),
                                   keepalive_expiry=default.keepalive_expiry)
            http = openai.DefaultAsyncHttpxClient(limits=limits, **self._tls)
            clients.append(openai.AsyncOpenAI(base_url=s.base_url, api_key=s.api_key or PLACEHOLDER_API_KEY,
                                              timeout=s.timeout, max_retries=s.max_retries, http_client=http))
        return clients

    @cached_property
    def _tls(self) -> dict:
        """``verify=``: one TLS context (the HTTP library's default: system or certifi roots, ``SSL_CERT_*``) for
        all the pools of this client, instead of loading the certificates again for each (~20 ms each);
        nothing (each pool loads its own) where the library offers no ``create_ssl_context``."""
        library = sys.modules.get(type(openai.DEFAULT_CONNECTION_LIMITS).__module__.split(".")[0])
        try:
            return {"verify": library.create_ssl_context()}
        except Exception:  # noqa: BLE001 - another httpx flavour: the pools' own default is as good
            return {}

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
            # the client's generic POST: the same retries, timeouts and errors as chat.completions.create, without
            # its per-call conversion of the request and the answer into typed objects (about half a call's CPU)
            body = await sender.post("/chat/completions", body=self._create_args(request, mode), cast_to=str)
            response = _json_object(body)
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

    def _success(self, request: LLMRequest, response: dict) -> LLMResult:
        choices = response.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = choice.get("message") if isinstance(choice, dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str) or not text.strip():
            return LLMResult(request.id, None, error_kind="empty", error="the response has no answer text")
        usage = response.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            prompt, completion = usage["prompt_tokens"], usage.get("completion_tokens") or 0
        else:
            prompt, completion = self._prompt_tokens(request), self.token_counter.count_text(text)
        return LLMResult(request.id, text, prompt, completion)

    def _failure(self, request: LLMRequest, kind: str, err: Exception) -> LLMResult:
        message = _one_line(err, self.settings.api_key)
        log.debug("LLM call %s failed (%s): %s", request.id, kind, message)
        return LLMResult(request.id, None, error_kind=kind, error=message)

    def _record(self, result: LLMResult) -> None:
        """Count a finished call (the caller caches its answer)."""
        self.stats.calls += 1
        self.stats.prompt_tokens += result.prompt_tokens
        self.stats.completion_tokens += result.completion_tokens
        if not result.ok:
            self.stats.failures[result.error_kind] = self.stats.failures.get(result.error_kind, 0) + 1

    def _finish(self, desc: str, tally: "_Tally", results: list | None) -> None:
        """The summary line of a run or stream, then its stop: :class:`LLMSeRError` after a fatal error,
        :class:`BudgetExceeded` when requests were not started."""
        level = logging.WARNING if tally.failed else logging.INFO
        log.log(level, "%s: %d request(s), %d from the cache, %d failed %s; output mode %s; client total %d "
                "call(s), %d tokens", desc, tally.requests, tally.cached, sum(tally.failed.values()), tally.failed,
                self.stats.output_mode or "undecided (no call)", self.stats.calls, self.stats.total_tokens)
        if self._fatal is not None:
            raise LLMSeRError(f"the LLM endpoint refused the request ({self._fatal}); check llm_model, "
                              "llm_base_url / OPENAI_BASE_URL and the API key")
        if tally.not_started:
            raise BudgetExceeded(self.stats.total_tokens, self.settings.budget_tokens, tally.finished,
                                 tally.not_started, results)


@dataclass
class _Tally:
    """What one run or stream answered, for its summary line and its stop."""

    requests: int = 0
    cached: int = 0  # from the cache file or an identical request of the run
    finished: int = 0  # answered or failed by a call (or sharing an identical request's failure)
    not_started: int = 0  # None: the budget was spent or a fatal error stopped the run
    failed: dict = field(default_factory=dict)  # error kind -> results

    def add(self, result: LLMResult | None) -> None:
        self.requests += 1
        if result is None:
            self.not_started += 1
            return
        if result.cached:
            self.cached += 1
        else:
            self.finished += 1
        if not result.ok:
            self.failed[result.error_kind] = self.failed.get(result.error_kind, 0) + 1


class _Pacer:
    """Spaces the starts of calls by the event loop's own work per call (this thread's CPU time per finished call,
    the answers' handling included), so that their answers come back no faster than the loop can handle them.

    Without it, ``llm_concurrency`` calls started at once come back at once (a server answers each in about the
    same time); the loop then takes every one of them a step further in turn, so all of them finish, and start
    their next calls, only when the last is handled: every round of calls costs the latency plus the loop's work
    for all of them (at 128 calls of ~1.5 ms CPU each, 0.2 s on top of a 0.5 s answer). Spaced starts come back
    spaced and are handled as they come. Once calls run at the server's pace they are further apart than this
    spacing, and it costs nothing."""

    def __init__(self, first_guess: float = 1e-3):
        self.cpu0, self.finished, self.first_guess = 0.0, 0, first_guess
        self.next_start = 0.0

    def spacing(self) -> float:
        if self.finished < 2:
            return self.first_guess
        return (time.thread_time() - self.cpu0) / (self.finished - 1)

    async def wait(self) -> None:
        now = asyncio.get_running_loop().time()
        start = max(now, self.next_start)
        self.next_start = start + self.spacing()
        if start > now:
            await asyncio.sleep(start - now)

    def done(self) -> None:
        self.finished += 1
        if self.finished == 1:  # measured from the first answer on: the clients' start is no call's work
            self.cpu0 = time.thread_time()


class _CacheWriter:
    """Appends the answers of finished calls to the cache without stopping the event loop: one thread writes at a
    time, and the answers that arrive while it writes and fsyncs go together in its next write and fsync (group
    commit; an fsync takes milliseconds on a disk, longer than a call's own work). :meth:`append` returns once the
    answer's line is durable: an answer is handed on only then, while its call slot already makes the next call."""

    def __init__(self, cache: ResponseCache, model: str):
        self.cache, self.model = cache, model
        self.pending: list = []  # ((key, text, prompt tokens, completion tokens, model), future)
        self.task: asyncio.Task | None = None

    def append(self, key: str, result: LLMResult) -> asyncio.Future:
        """Queue the answer's line; the future is done once it is durable (or failed to be written)."""
        done = asyncio.get_running_loop().create_future()
        self.pending.append(((key, result.text, result.prompt_tokens, result.completion_tokens, self.model), done))
        if self.task is None:
            self.task = asyncio.create_task(self._write())
        return done

    async def _write(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    await asyncio.to_thread(self.cache.append_many, [line for line, _ in batch])
                except Exception as err:  # a full disk, a lost permission: the calls waiting for it fail
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(err)
                else:
                    for _, done in batch:
                        if not done.done():
                            done.set_result(None)
        finally:
            self.task = None

    async def drain(self) -> None:
        """Wait for the write in progress (and those queued behind it), e.g. when the stream is closed early."""
        while self.task is not None:
            await asyncio.shield(self.task)


def _rejects_response_format(err: Exception) -> bool:
    """Whether an error answer (any HTTP status) names ``response_format`` or ``json_schema``."""
    if not isinstance(err, openai.APIStatusError):
        return False
    text = f"{err.message} {err.body}".lower()
    return "response_format" in text or "json_schema" in text


def _json_object(body: str) -> dict:
    """The answer's JSON object; an unreadable body raises :class:`json.JSONDecodeError` (error kind ``server``)."""
    data = json.loads(body)
    if not isinstance(data, dict):
        raise json.JSONDecodeError("the response is not a JSON object", body, 0)
    return data


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
