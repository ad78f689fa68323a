"""Prompt templates for LLMSeR's two LLM steps, and the JSON schemas of their answers.

* SNF (pseudo-prior items): the user's history titles (oldest first) and K numbered candidate titles from CCG;
  the LLM picks the k candidates the user most likely interacted with before or alongside that history, most
  likely first, as ``{"items": [numbers]}``.
* ARV (reliability): the history before the masked item and 10 numbered candidates; the LLM picks the one the
  user most likely interacted with next, as ``{"item": number}``.

History titles are "- title" bullet lines and candidates "N. title" lines (each title flattened to one line),
so an answer's numbers can only mean candidates. Pass titles through
:func:`~recbole_llmser.item_text.capped_title` first to cap them.
The messages are a pure function of the inputs (same titles -> identical messages), so the LLM cache key is
stable; change a template's text only together with its ``*_TEMPLATE_VERSION``.
"""

from __future__ import annotations

from recbole_llmser.errors import LLMSeRError
from recbole_llmser.item_text import one_line

SNF_TEMPLATE_VERSION = "snf-v1"
ARV_TEMPLATE_VERSION = "arv-v1"

SYSTEM_PROMPT = (
    "You are a recommender system assistant. You read a user's interaction history and a numbered list of "
    "candidate items, and you answer with JSON only, using only numbers from the candidate list."
)

#: Shown for a title that is empty after flattening (callers normally pass their own fallback to capped_title).
UNTITLED = "(untitled)"


def expected_answer_tokens(n_picks: int) -> int:
    """A guess of the answer's length for the dry run: ~6 tokens of JSON around ~3 per picked number."""
    return 6 + 3 * n_picks


def snf_messages(history_titles: list, candidate_titles: list, k: int) -> list:
    """Chat messages asking for the k candidates most likely interacted with before/alongside the history."""
    _check_picks(k, candidate_titles)
    user = "\n".join([
        _history_block(history_titles),
        "",
        _candidate_block(candidate_titles),
        "",
        f"Some of these candidates are items the user probably interacted with before or alongside the history "
        f"above. Choose exactly {k} of the candidates: the ones this user most likely interacted with, most "
        f"likely first.",
        'Answer with JSON only, in the form {"items": [candidate numbers]}, using only numbers from the candidate '
        "list, each at most once.",
    ])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def snf_schema(k: int, n_candidates: int) -> dict:
    """OpenAI ``json_schema`` object for the SNF answer: exactly min(k, n) candidate numbers."""
    picks = min(k, n_candidates)
    numbers = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": n_candidates},
               "minItems": picks, "maxItems": picks}
    return _schema("snf_answer", {"items": numbers})


def arv_messages(history_titles: list, candidate_titles: list) -> list:
    """Chat messages asking for the ONE candidate the user most likely interacted with next."""
    _check_picks(1, candidate_titles)
    user = "\n".join([
        _history_block(history_titles),
        "",
        _candidate_block(candidate_titles),
        "",
        "Which ONE of the candidates did this user most likely interact with next, right after the history above?",
        'Answer with JSON only, in the form {"item": candidate number}, using a number from the candidate list.',
    ])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def arv_schema(n: int) -> dict:
    """OpenAI ``json_schema`` object for the ARV answer: one candidate number in 1..n."""
    return _schema("arv_answer", {"item": {"type": "integer", "minimum": 1, "maximum": n}})


def _schema(name: str, properties: dict) -> dict:
    return {
        "name": name,
        "strict": True,
        "schema": {"type": "object", "properties": properties, "required": list(properties),
                   "additionalProperties": False},
    }


def _history_block(history_titles: list) -> str:
    lines = [f"- {one_line(str(title)) or UNTITLED}" for title in history_titles] or ["- (no items yet)"]
    return "\n".join(["The user's interaction history, oldest first:", *lines])


def _candidate_block(candidate_titles: list) -> str:
    lines = [f"{i}. {one_line(str(title)) or UNTITLED}" for i, title in enumerate(candidate_titles, start=1)]
    return "\n".join(["Candidate items:", *lines])


def _check_picks(k: int, candidate_titles: list) -> None:
    if not candidate_titles:
        raise LLMSeRError("a prompt needs at least one candidate item")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise LLMSeRError(f"the number of items to pick must be an integer >= 1, got {k!r}")

