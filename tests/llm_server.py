"""A small OpenAI-compatible HTTP server for tests and benchmarks (stdlib only, 127.0.0.1, a free port).

::

    with FakeLLMServer(latency=0.05) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")
        ...
        server.rate_500 = 0.2          # knobs may be changed between requests
        assert server.calls() == 10

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/embeddings`` (deterministic normalized hashed
bag-of-words vectors, 64 dimensions, as floats or base64 float32), ``GET /v1/models``.

Chat answers: the candidates are read from the last user message (lines ``"12. title"``), the history from its
bullet lines (``"- title"``). ``answer_order`` says how candidates are ranked: ``"smart"`` (default: most words
shared with the history first, ties by number), ``"echo"`` (the presented order, 1, 2, 3, ...: what small
instruction-tuned models do) or ``"highest_number"`` (by the largest number in the title, highest first: a
choice that depends on the items, not on where they are shown). The answer is ``{"items": [...]}`` (as many
numbers as the prompt's "Choose exactly K" or the schema's ``maxItems`` asks for) or ``{"item": n}`` when one item
is asked for (schema property ``item`` or a prompt that shows ``{"item": ...}``). ``fence=True`` wraps every
answer in a ```json fence, as Qwen2.5 and many small models do.

Failure injection, knobs in [0, 1] (share of chat requests): ``rate_429``, ``rate_500``, ``rate_timeout``
(sleeps ``timeout_sleep`` seconds, longer than the client's timeout, before answering), ``rate_malformed``
(HTTP 200 whose body alternates between invalid JSON and JSON without ``choices``), ``rate_refusal``,
``rate_hallucinate`` (alternates between out-of-list numbers and made-up titles, as JSON). Each request draws a
number u in [0, 1) and the knobs, in this order, take consecutive slices of [0, 1). ``injection`` sets u:

* ``"random"``: a seeded RNG per request (``seed``);
* ``"every"``: deterministic, chat request number n (1-based) draws ``frac(n * 0.618...)`` (a golden-ratio
  sequence) instead: each knob hits its share of requests spread evenly, about every (1/rate)-th request;
* ``"sticky"``: by a hash of the prompt, so the same prompt always meets the same fate (a permanent failure
  that outlives the client's retries).

``reject_response_format`` answers 400 to any request carrying ``response_format``; ``reject_json_schema`` (an
HTTP status, e.g. 500) answers requests whose ``response_format`` is ``json_schema`` with that status and a body
naming ``response_format``, and accepts ``json_object`` and plain text, as llama-cpp-python's server does (HTTP
500, no ``retry-after``); ``fail_first`` answers the first n chat requests with 503 (an outage that names nothing);
``force_status`` (e.g. 401)
answers every chat request with that HTTP error; ``include_usage=False`` leaves ``usage`` out. 429 and 500
answers carry ``retry-after-ms`` (``retry_after_ms``) so clients retry fast. Every request is recorded
(``records``: method, path, headers, body, fate).

Concurrency: ``in_flight`` chat requests are being answered now, ``max_in_flight`` at most so far (``reset``
clears it). ``hold_until = n`` holds every chat request until n are in flight at once (then lets all of them
and every later one through), or ``hold_timeout`` seconds passed: a test sees whether a client really has n
calls in flight, without timing anything. Up to 1024 connections may wait to be accepted.

Run on its own (benchmarks: a separate process, as a real endpoint is)::

    python -m tests.llm_server --latency=0.5      # prints its base URL, serves until stdin closes

It then also answers ``GET /v1/stats`` (``{"chat_calls", "in_flight", "max_in_flight"}``) and
``POST /v1/stats/reset`` (forgets the recorded requests and the high-water mark).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CANDIDATE_LINE = re.compile(r"^\s*(\d+)\.\s+(.+?)\s*$", re.MULTILINE)
HISTORY_LINE = re.compile(r"^\s*-\s+(.+?)\s*$", re.MULTILINE)
WANT = re.compile(r"choose\s+exactly\s+(\d+)", re.IGNORECASE)
WORD = re.compile(r"\w+")
TOKEN = re.compile(r"\w+|[^\w\s]")

GOLDEN = (math.sqrt(5) - 1) / 2
FAILURE_KNOBS = ("429", "500", "timeout", "malformed", "refusal", "hallucinate")
REFUSAL = "I'm sorry, I can't help with that."
HALLUCINATED_TITLES = ["Imaginary Gadget Deluxe", "Phantom Widget 3000"]


@dataclass
class Record:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict
    body: object
    fate: str = "ok"
    at: float = field(default_factory=time.monotonic)


def count_tokens(text: str) -> int:
    """The server's token count: words and punctuation marks."""
    return len(TOKEN.findall(text))


def embed(text: str, dim: int = 64) -> list[float]:
    """Deterministic, normalized hashed bag-of-words vector."""
    vec = [0.0] * dim
    for word in WORD.findall(text.lower()):
        digest = hashlib.md5(word.encode()).digest()
        vec[digest[0] % dim] += 1.0 if digest[1] % 2 else -1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


class FakeLLMServer:
    """OpenAI-compatible test server; see the module docstring for behaviour and knobs."""

    def __init__(self, *, latency: float = 0.0, seed: int = 0, injection: str = "random", model: str = "fake-llm"):
        self.latency = latency
        self.injection = injection
        self.model = model
        self.rate_429 = self.rate_500 = self.rate_timeout = 0.0
        self.rate_malformed = self.rate_refusal = self.rate_hallucinate = 0.0
        self.timeout_sleep = 2.0
        self.retry_after_ms = 1
        self.reject_response_format = False
        self.reject_json_schema = None
        self.fail_first = 0
        self.answer_order = "smart"
        self.fence = False
        self.force_status = None
        self.include_usage = True
        self.records: list[Record] = []
        self.in_flight = self.max_in_flight = 0
        self.hold_until = 0
        self.hold_timeout = 30.0
        self.stats_routes = False  # GET /v1/stats, POST /v1/stats/reset (the command line turns them on)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._company = threading.Condition(self._lock)
        self._chat_count = 0
        self._alternate = {"malformed": 0, "hallucinate": 0}
        self._httpd = None
        self._thread = None

    # ----- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> "FakeLLMServer":
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.app = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = self._thread = None

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # ----- inspection --------------------------------------------------------------------------------------
    def calls(self, path: str = "/v1/chat/completions") -> int:
        """How many requests reached ``path``."""
        with self._lock:
            return sum(r.path == path for r in self.records)

    def chat_bodies(self) -> list[dict]:
        with self._lock:
            return [r.body for r in self.records if r.path == "/v1/chat/completions"]

    def reset(self) -> None:
        """Forget the recorded requests and the most requests in flight (knobs are kept)."""
        with self._lock:
            self.records.clear()
            self.max_in_flight = self.in_flight

    def stats(self) -> dict:
        with self._lock:
            return {"chat_calls": sum(r.path == "/v1/chat/completions" for r in self.records),
                    "in_flight": self.in_flight, "max_in_flight": self.max_in_flight}

    # ----- behaviour ---------------------------------------------------------------------------------------
    def enter(self) -> None:
        """A chat request starts: count it, and hold it while ``hold_until`` is not reached."""
        with self._company:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.hold_until:
                if self.in_flight >= self.hold_until:
                    self.hold_until = 0
                    self._company.notify_all()
                else:
                    self._company.wait_for(lambda: not self.hold_until, timeout=self.hold_timeout)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def record(self, method: str, path: str, headers, body) -> Record:
        rec = Record(method, path, {k.lower(): v for k, v in headers.items()}, body)
        with self._lock:
            self.records.append(rec)
        return rec

    def chat_fate(self, body: dict) -> str:
        """Which failure (or "ok") this chat request meets."""
        with self._lock:
            self._chat_count += 1
            n = self._chat_count
            u = self._rng.random()
        if self.injection == "every":
            u = (n * GOLDEN) % 1.0
        elif self.injection == "sticky":
            digest = hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64
        edge = 0.0
        for kind in FAILURE_KNOBS:
            edge += float(getattr(self, f"rate_{kind}"))
            if u < edge:
                return kind
        return "ok"

    def take_first_failure(self) -> bool:
        """Whether this chat request is one of the first ``fail_first``."""
        with self._lock:
            if self.fail_first > 0:
                self.fail_first -= 1
                return True
            return False

    def alternate(self, kind: str) -> int:
        with self._lock:
            self._alternate[kind] += 1
            return self._alternate[kind] % 2

    def answer(self, body: dict, fate: str) -> str:
        """The assistant's text for a chat request."""
        prompt = _last_user_text(body)
        candidates = {int(n): title for n, title in CANDIDATE_LINE.findall(prompt)}
        if fate == "refusal":
            return REFUSAL
        if fate == "hallucinate":
            top = max(candidates, default=0)
            picks = [top + 3, top + 11] if self.alternate("hallucinate") else HALLUCINATED_TITLES
        else:
            picks = self.order(candidates, HISTORY_LINE.findall(prompt))
        if _wants_one(body, prompt):
            text = json.dumps({"item": picks[0] if picks else 1})
        else:
            text = json.dumps({"items": picks[: _want(body, prompt, len(picks))]})
        return f"```json\n{text}\n```" if self.fence else text

    def order(self, candidates: dict, history: list) -> list:
        """Candidate numbers, best first, by ``answer_order``."""
        if self.answer_order == "echo":
            return sorted(candidates)
        if self.answer_order == "highest_number":
            return sorted(candidates, key=lambda n: (-max(map(int, re.findall(r"\d+", candidates[n])), default=0), n))
        return _smart_order(candidates, history)

    def chat_response(self, body: dict, text: str) -> dict:
        prompt_tokens = sum(count_tokens(str(m.get("content", ""))) + 3 for m in body.get("messages", []))
        reply = {
            "id": f"chatcmpl-{len(self.records)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                 "logprobs": None}
            ],
        }
        if self.include_usage:
            completion_tokens = count_tokens(text)
            reply["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
        return reply


def _encode(vector: list, as_base64: bool):
    """A float list, or base64 of little-endian float32 values (OpenAI's ``encoding_format: base64``)."""
    if not as_base64:
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _last_user_text(body: dict) -> str:
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    content = users[-1].get("content", "") if users else ""
    return content if isinstance(content, str) else " ".join(part.get("text", "") for part in content)


def _smart_order(candidates: dict, history: list) -> list:
    seen = {w for title in history for w in WORD.findall(title.lower())}
    overlap = {n: len(seen & set(WORD.findall(t.lower()))) for n, t in candidates.items()}
    return sorted(candidates, key=lambda n: (-overlap[n], n))


def _schema(body: dict) -> dict:
    fmt = body.get("response_format") or {}
    return (fmt.get("json_schema") or {}).get("schema") or {}


def _wants_one(body: dict, prompt: str) -> bool:
    props = _schema(body).get("properties") or {}
    return "item" in props or ('"item"' in prompt and '"items"' not in prompt)


def _want(body: dict, prompt: str, n: int) -> int:
    items = (_schema(body).get("properties") or {}).get("items") or {}
    if "maxItems" in items:
        return int(items["maxItems"])
    match = WANT.search(prompt)
    return int(match.group(1)) if match else n


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # the default backlog (5) drops connections under 32 concurrent clients; 256 connect at once
    request_queue_size = 1024

    def handle_error(self, request, client_address):  # a client that hung up is not an error here
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else the body, written after the headers, waits for the client's delayed ACK

    def log_message(self, format, *args):  # quiet
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) or was killed
            pass

    @property
    def app(self) -> FakeLLMServer:
        return self.server.app

    def do_GET(self):
        if self.app.stats_routes and self.path == "/v1/stats":
            return self._json(200, self.app.stats())
        self.app.record("GET", self.path, self.headers, None)
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": self.app.model, "object": "model", "created": 0, "owned_by": "tests"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = raw.decode("utf-8", "replace")
        if self.app.stats_routes and self.path == "/v1/stats/reset":
            self.app.reset()
            return self._json(200, self.app.stats())
        rec = self.app.record("POST", self.path, self.headers, body)
        if not isinstance(body, dict):
            self._json(400, {"error": {"message": "body is not a JSON object", "type": "invalid_request_error"}})
        elif self.path == "/v1/chat/completions":
            self.app.enter()
            try:
                self._chat(body, rec)
            finally:
                self.app.leave()
        elif self.path == "/v1/embeddings":
            self._embeddings(body)
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def _chat(self, body: dict, rec: Record):
        app = self.app
        if app.latency:
            time.sleep(app.latency)
        if app.reject_response_format and body.get("response_format") is not None:
            rec.fate = "reject_response_format"
            return self._json(400, {"error": {
                "message": "response_format of type json_schema is not supported by this server",
                "type": "invalid_request_error", "param": "response_format", "code": None}})
        if app.take_first_failure():
            rec.fate = "503"
            return self._json(503, {"error": {"message": "Service unavailable", "type": "server_error"}})
        if app.reject_json_schema and (body.get("response_format") or {}).get("type") == "json_schema":
            rec.fate = "reject_json_schema"
            return self._json(app.reject_json_schema, {"error": {
                "message": "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n  Input should "
                           "be 'text' or 'json_object' [type=literal_error, input_value='json_schema', "
                           "input_type=str]", "type": "internal_server_error", "param": None, "code": None}})
        if app.force_status:
            rec.fate = str(app.force_status)
            return self._json(app.force_status, {"error": {"message": f"forced HTTP {app.force_status}",
                                                           "type": "test_error"}})
        rec.fate = fate = app.chat_fate(body)
        retry = {"retry-after-ms": str(app.retry_after_ms)}
        if fate == "429":
            return self._json(429, {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}, retry)
        if fate == "500":
            return self._json(500, {"error": {"message": "The server had an error", "type": "server_error"}}, retry)
        if fate == "timeout":
            time.sleep(app.timeout_sleep)
        if fate == "malformed":
            if app.alternate("malformed"):
                return self._send(200, b'{"id": "chatcmpl-x", "choices": [ {"index": 0, "mess', "application/json")
            return self._json(200, {"id": "chatcmpl-x", "object": "chat.completion", "model": app.model})
        self._json(200, app.chat_response(body, app.answer(body, fate)))

    def _embeddings(self, body: dict):
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        as_base64 = body.get("encoding_format") == "base64"  # what the openai client asks for by default
        data = [{"object": "embedding", "index": i, "embedding": _encode(embed(str(text)), as_base64)}
                for i, text in enumerate(inputs)]
        tokens = sum(count_tokens(str(text)) for text in inputs)
        self._json(200, {"object": "list", "data": data, "model": body.get("model", self.app.model),
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def _json(self, status: int, obj, headers=None):
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _send(self, status: int, payload: bytes, content_type: str, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()


def main(argv=None) -> None:
    """``python -m tests.llm_server [--latency=S] [--port=N]``: serve until stdin closes (or the process is ended);
    the first line on stdout is the base URL."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per chat request")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    args = parser.parse_args(argv)
    server = FakeLLMServer(latency=args.latency)
    server.stats_routes = True
    server._httpd = _Server(("127.0.0.1", args.port), _Handler)
    server._httpd.app = server
    thread = threading.Thread(target=server._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    print(server.base_url, flush=True)
    sys.stdin.read()  # until the parent closes it or ends
    server._httpd.shutdown()


if __name__ == "__main__":
    main()
