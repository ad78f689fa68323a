"""Token counting (tiktoken, or a heuristic offline) and the dry run's estimate of calls, tokens and cost."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace

log = logging.getLogger(__name__)

#: Token-count heuristic when tiktoken's encoding cannot be loaded (offline): ceil(characters / 4) per text.
HEURISTIC_CHARS_PER_TOKEN = 4
#: Tokens each chat message adds around its content, and tokens that prime the reply (OpenAI's cookbook).
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3


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
