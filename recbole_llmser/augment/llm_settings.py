"""LLM settings: the ``llm_*`` properties, read and checked once (:func:`settings_from_config`).

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
                                           request's schema; a server that rejects it (any error naming
                                           response_format) gets ``json_object``, then plain text, for the
                                           rest of the run (``llm.py``); ``false``: plain text
``llm_price_prompt``       ``0.15``        USD per 1M prompt tokens (dry-run cost)
``llm_price_completion``   ``0.60``        USD per 1M completion tokens
``llm_budget_tokens``      ``~``           prompt + completion tokens this client may spend on real calls
                                           (``~``: unlimited); see "Budget" below
``llm_retry_failed``       ``true``        read by ``augment/pipeline.py``: a reused artifact whose users fell
                                           back because their calls failed is rebuilt, asking those calls
                                           again; see "Failures" below. ``false``: reuse it as is
=========================  ==============  ================================================================

The API key is never logged, cached, written to a file or shown by ``repr(LLMSettings)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

from recbole_llmser.errors import LLMSeRError


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
