"""The LLM response cache and its key (used by :class:`~recbole_llmser.augment.llm.LLMClient`).

:class:`ResponseCache` is an append-only JSON-lines file, one line per finished call
(``{"key", "text", "prompt_tokens", "completion_tokens", "model", "error": null}``), appended with one
``write`` + ``fsync`` as soon as the call finishes, so a killed run loses no finished call and a re-run makes no
call it already paid for. The key is a sha256 over the model, the messages, the sampling parameters
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
