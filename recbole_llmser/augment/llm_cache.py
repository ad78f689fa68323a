"""The LLM response cache and its key (used by :class:`~recbole_llmser.augment.llm.LLMClient`).

:class:`ResponseCache` is an append-only JSON-lines file, one line per finished call
(``{"key", "text", "prompt_tokens", "completion_tokens", "model", "error": null}``), appended with one
``write`` + ``fsync`` as soon as the call finishes (calls that finish while the previous fsync runs share the next
one: :meth:`ResponseCache.append_many`), so a killed run loses no finished call and a re-run makes no call it
already paid for. The key is a sha256 over the model, the messages, the sampling parameters
(temperature, max_tokens, seed, structured-output flag and schema) and the prompt template version; never the
API key or the endpoint. Failed calls are not cached (a re-run makes them again; see "Failures" in ``llm.py``
for artifacts built while calls failed); answers that later prove malformed or refusals are (they are what the
model said). When the server rejects structured output (``json_schema``), the answers
it gives in the mode the run steps down to (``json_object``, then plain text; see ``llm.py``) are stored under the
configured request's key, so re-running the same configuration makes no call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def request_key(settings, request) -> str:
    """Cache key of an :class:`~recbole_llmser.augment.llm.LLMRequest` under
    :class:`~recbole_llmser.augment.llm_settings.LLMSettings`: sha256 of the canonical JSON of model, messages,
    sampling parameters and template version."""
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
    """Append-only JSON-lines file of finished calls, indexed in memory by key: ``key -> where its line is``.

    Only the index is in memory (about 150 bytes per call: the key and one integer), never the answers: an
    answer is read back from the file (one ``pread``) when its key is asked for, so a cache of millions of calls
    costs a few hundred MiB, not their text. Corrupt lines (a torn last line after ``kill -9``, or garbage) are
    skipped, counted in ``n_corrupt`` and logged once; those calls are simply made again. Each append is one
    ``write`` of whole lines, then ``fsync``; if the file does not end with a newline (a torn line), the append
    starts with one. The first entry of a key wins. Appends use ``O_APPEND``, so two processes sharing the file
    do not mix their lines.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.n_corrupt = 0
        self._index: dict = {}  # compact key -> offset << 32 | length of its line
        self._needs_newline = False
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        offset, last = 0, b""
        with open(self.path, "rb") as f:
            for line in f:  # streamed: the file is never held whole
                last = line
                body = line.rstrip(b"\n")
                if body.strip():
                    entry = _parse_entry(body)
                    if entry is None:
                        self.n_corrupt += 1
                    elif entry["error"] is None:
                        self._index.setdefault(_compact(entry["key"]), offset << 32 | len(body))
                offset += len(line)
        self._needs_newline = bool(last) and not last.endswith(b"\n")
        if self.n_corrupt:
            log.warning("LLM cache %s: skipped %d corrupt line(s) (e.g. torn by a crash); those calls are redone",
                        self.path, self.n_corrupt)

    def get(self, key: str) -> dict | None:
        """The entry of ``key`` (read back from the file), or None."""
        where = self._index.get(_compact(key))
        if where is None:
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return _parse_entry(os.pread(fd, where & 0xFFFFFFFF, where >> 32))
        finally:
            os.close(fd)

    def __contains__(self, key: str) -> bool:
        return _compact(key) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def append(self, key: str, text: str, prompt_tokens: int, completion_tokens: int, model: str) -> None:
        """Store one finished call durably (one write of one line, then fsync)."""
        self.append_many([(key, text, prompt_tokens, completion_tokens, model)])

    def append_many(self, calls) -> None:
        """Store finished calls, ``(key, text, prompt_tokens, completion_tokens, model)`` each, durably: one write
        of their lines, then one fsync (the LLM client's group commit: the calls that finished during the
        previous fsync). Safe to call from a worker thread while the event loop reads the cache."""
        lines = [(key, json.dumps({"key": key, "text": text, "prompt_tokens": prompt, "completion_tokens": completion,
                                   "model": model, "error": None}, ensure_ascii=False).encode("utf-8"))
                 for key, text, prompt, completion, model in calls]
        if not lines:
            return
        lead = b"\n" if self._needs_newline else b""
        data = lead + b"".join(line + b"\n" for _, line in lines)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab", buffering=0) as f:
            f.write(data)
            end = f.tell()  # O_APPEND: the end of this write, wherever another process's lines went
            os.fsync(f.fileno())
        self._needs_newline = False
        offset = end - len(data) + len(lead)
        for key, line in lines:
            self._index.setdefault(_compact(key), offset << 32 | len(line))
            offset += len(line) + 1


def _compact(key: str):
    """A sha256 hex key as its 32 bytes (half the memory of the string); any other key as it is."""
    if len(key) == 64:
        try:
            return bytes.fromhex(key)
        except ValueError:
            pass
    return key


def _parse_entry(line: bytes) -> dict | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    ok = (isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("text"), str)
          and "error" in entry)
    return entry if ok else None
