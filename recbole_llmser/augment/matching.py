"""Map an LLM's answer strictly onto the candidates it was offered.

The answer is untrusted text. :func:`match_answer` reads it in this order:

1. **JSON** (``{"items": [...]}``, ``{"item": n}``, a bare list, also inside ``` fences or surrounding prose;
   numbers may be strings, ``"3"``); JSON cut short (``{"items": [3, 1, 2`` at the token limit, an unclosed fence)
   or not quite JSON (a trailing comma, single quotes) gives the numbers and quoted strings of its pick list;
   otherwise the **text**: numbered lines ("3. Title", "3) Title"), bullet lines, quoted titles and bare numbers
   ("3, 7 and 12").
2. Each pick is a candidate **number** (1-based, as shown in the prompt) and/or a **title**. A title is matched
   exactly (case, spacing and surrounding punctuation ignored), as a prefix followed by an explanation
   ("Blue Hat - matches their style"), then fuzzily (difflib ratio >= ``fuzzy_cutoff``). A numbered line
   "N. title" means candidate N, unless its title clearly names another candidate (a ranked list of titles).
3. Title strings still unmatched go to the optional ``semantic`` callable
   (``semantic(strings, candidate_titles) -> [index or None]``), whose answers are range-checked too.

Only indices of offered candidates are ever returned; duplicates keep their first occurrence; at most ``want``
picks are kept (the answer's order). Out-of-range numbers and unmatched explicit titles (JSON strings, list
lines, quoted titles) count as hallucinated; unmatched prose lines are ignored.
"""

from __future__ import annotations

import difflib
import json
import numbers
import re
from dataclasses import dataclass, replace

from recbole_llmser.errors import LLMSeRError

#: Statuses of :func:`match_answer`. The LLM stages add "echo" for an answer that repeats the presented order
#: (``presentation.py``).
STATUSES = ("ok", "partial", "refusal", "malformed", "hallucinated")
FALLBACK_POLICIES = ("skip", "ccg_order")

#: JSON keys that hold the picks, in order of preference (matched case-insensitively).
PICK_KEYS = ("items", "item", "answer", "answers", "choice", "choices", "picks", "selection", "selected",
             "recommendations", "numbers", "ids", "candidates", "result")
#: Keys of a pick given as an object, e.g. {"number": 3, "title": "..."}.
NUMBER_KEYS = ("number", "id", "item", "index", "candidate", "no")
TITLE_KEYS = ("title", "name")

REFUSAL = re.compile(
    r"\b(i'm sorry|i am sorry|i apologi[sz]e|i cannot|i can't|i'm unable|i am unable|i'm not able|as an ai|"
    r"i won't|i will not|unable to (help|assist|comply))", re.IGNORECASE)
FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.DOTALL)
NUMBERED_LINE = re.compile(r"^\s*(?:[-*•]\s*)?(?:#|no\.\s*|item\s+|candidate\s+)?(\d+)\s*[.):\]]\s+(.*)$",
                           re.IGNORECASE)
BULLET_LINE = re.compile(r"^\s*[-*•]\s+(.+)$")
QUOTED = re.compile(r'"([^"\n]{2,})"|“([^”\n]{2,})”')
BARE_NUMBER = re.compile(r"(?<![\w.])(\d+)(?!\w|\.\d)")
ONLY_NUMBER = re.compile(r"^\s*#?\s*(\d+)\s*[.,;]?\s*$")
#: A pick key and what follows it, in JSON that does not parse (cut short, trailing comma, single quotes).
PICK_VALUE = re.compile(r"""["'](%s)["']\s*:\s*(\[[^\]}]*|[^,}\]\s]+)""" % "|".join(PICK_KEYS), re.IGNORECASE)
LIST_ELEMENT = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|(-?\d+(?:\.0+)?))\s*$""")
_SPACE = re.compile(r"\s+")
_EDGE_PUNCT = " \t\"'`“”‘’*_.,;:!?()[]{}<>-–—"


@dataclass(frozen=True)
class MatchResult:
    """How an answer maps onto the candidates.

    Attributes:
        indices: 0-based candidate indices, in the answer's order (no duplicates, at most ``want``).
        status: "ok" (``want`` picks), "partial" (fewer), "refusal", "malformed" (nothing usable) or
            "hallucinated" (only answers outside the candidates).
        n_hallucinated: out-of-range numbers and unmatched explicit titles.
        method: how the kept picks were matched: "numbers", "titles", "semantic", joined by "+"; "none".
        fallback: the :func:`apply_fallback` policy that filled missing picks, or None.
        n_filled: how many picks the fallback added.
    """

    indices: list
    status: str
    n_hallucinated: int = 0
    method: str = "none"
    fallback: str | None = None
    n_filled: int = 0


@dataclass(frozen=True)
class _Pick:
    number: int | None = None
    title: str | None = None
    explicit: bool = True  # from JSON, a list line or quotes: an unmatched title counts as hallucinated


def match_answer(text, candidates: list, want: int, semantic=None, fuzzy_cutoff: float = 0.85) -> MatchResult:
    """Map the answer ``text`` onto ``candidates`` (the titles as shown, numbered from 1); see the module doc."""
    if not isinstance(text, str) or not text.strip():
        return MatchResult([], "malformed")
    text = text.replace("’", "'")
    picks = _answer_picks(text)
    titles = _TitleIndex(candidates, fuzzy_cutoff)
    slots, pending, hallucinated = _resolve(picks, titles, len(candidates))
    if pending and semantic is not None:
        _match_semantically(slots, pending, semantic, candidates)
    hallucinated += sum(slots[slot] is None for slot, _ in pending)
    indices, methods = _dedupe([s for s in slots if s is not None], want)
    return MatchResult(indices, _status(text, indices, want, hallucinated), hallucinated, methods)


def apply_fallback(result: MatchResult, n_candidates: int, want: int, policy: str) -> MatchResult | None:
    """Handle an answer with fewer than ``want`` picks (``want``: how many the caller needs).

    ``"skip"``: None (the caller skips the user). ``"ccg_order"``: fill up with the unused candidates in CCG
    order (index order), recording ``fallback`` and ``n_filled``. Enough picks: the result unchanged.
    """
    if policy not in FALLBACK_POLICIES:
        raise LLMSeRError(f"fallback policy {policy!r}: expected one of {', '.join(FALLBACK_POLICIES)}")
    if len(result.indices) >= min(want, n_candidates):
        return result
    if policy == "skip":
        return None
    used = set(result.indices)
    fill = [i for i in range(n_candidates) if i not in used][: want - len(result.indices)]
    return replace(result, indices=list(result.indices) + fill, fallback=policy, n_filled=len(fill))


# ----- reading the answer --------------------------------------------------------------------------------------
def _answer_picks(text: str) -> list:
    """Picks from the answer as JSON (the whole text or a fenced block: nothing else is read), else from the
    first JSON object in the prose that holds any, else from the text."""
    for chunk in [text.strip(), *FENCE.findall(text)]:
        try:
            return _json_picks(json.loads(chunk))
        except ValueError:
            pass
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):  # objects only: "[3] and [7]" is prose
        try:
            picks = _json_picks(decoder.raw_decode(text, start)[0])
        except ValueError:
            continue
        if picks:
            return picks
    return _broken_json_picks(text) or _picks_from_text(text)


def _broken_json_picks(text: str) -> list:
    """The numbers and quoted strings of the first pick list in JSON that does not parse (``{"items": [3, 1, 2``
    cut at the token limit; ``[3, 1,]``; single quotes). Other elements (objects cut short, ``...``) are left out."""
    match = PICK_VALUE.search(text)
    if match is None:
        return []
    value = match.group(2).lstrip("[")
    picks = []
    for element in value.split(","):
        parsed = LIST_ELEMENT.match(element)
        if parsed is None:
            continue
        string = parsed.group(1) if parsed.group(1) is not None else parsed.group(2)
        pick = _json_pick(string if string is not None else float(parsed.group(3)))
        if pick is not None:
            picks.append(pick)
    return picks


def _json_picks(value) -> list:
    if isinstance(value, dict):
        lowered = {str(k).lower(): v for k, v in value.items()}
        key = next((k for k in PICK_KEYS if k in lowered), None)
        if key is None and len(lowered) != 1:
            return []
        value = lowered[key] if key else next(iter(lowered.values()))
    elements = value if isinstance(value, list) else [value]
    return [pick for element in elements for pick in [_json_pick(element)] if pick is not None]


def _json_pick(element) -> _Pick | None:
    if isinstance(element, dict):
        lowered = {str(k).lower(): v for k, v in element.items()}
        number = next((_as_int(lowered[k]) for k in NUMBER_KEYS if _as_int(lowered.get(k)) is not None), None)
        title = next((lowered[k] for k in TITLE_KEYS if isinstance(lowered.get(k), str)), None)
        return _Pick(number, title) if number is not None or title else None
    number = _as_int(element)
    if number is not None:
        return _Pick(number)
    if isinstance(element, str) and element.strip():
        return _line_pick(element) or _Pick(title=element)
    return None


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = ONLY_NUMBER.match(value)
        return int(match.group(1)) if match else None
    return None


def _line_pick(line: str) -> _Pick | None:
    """A list line: "3. Title" (number + title), "1. 7" (rank 1: candidate 7) or a bare number."""
    number = _as_int(line)
    if number is not None:
        return _Pick(number)
    match = NUMBERED_LINE.match(line)
    if not match:
        return None
    rest = match.group(2).strip()
    inner = _as_int(rest)
    if inner is not None:
        return _Pick(inner)
    return _Pick(int(match.group(1)), rest or None)


def _picks_from_text(text: str) -> list:
    picks = []
    for line in text.splitlines():
        if not line.strip():
            continue
        pick = _line_pick(line)
        bullet = BULLET_LINE.match(line)
        if pick is not None:
            picks.append(pick)
        elif bullet and not BARE_NUMBER.search(bullet.group(1)):
            picks.append(_Pick(title=bullet.group(1)))
        else:
            picks.extend(_prose_picks(line))
    return picks


def _prose_picks(line: str) -> list:
    """Quoted titles and bare numbers, in their order in the line; a number-free line may be a title itself."""
    found = [(m.start(), _Pick(title=m.group(1) or m.group(2))) for m in QUOTED.finditer(line)]
    unquoted = QUOTED.sub(lambda m: " " * len(m.group(0)), line)
    found += [(m.start(), _Pick(int(m.group(1)))) for m in BARE_NUMBER.finditer(unquoted)]
    if not found:
        return [_Pick(title=line, explicit=False)]
    return [pick for _, pick in sorted(found, key=lambda item: item[0])]


# ----- resolving picks -----------------------------------------------------------------------------------------
class _TitleIndex:
    """Exact, prefix and fuzzy lookup of candidate titles (normalized)."""

    def __init__(self, candidates: list, cutoff: float):
        self.cutoff = cutoff
        self.norms = [_norm(str(c)) for c in candidates]
        self.exact: dict[str, list] = {}
        for i, norm in enumerate(self.norms):
            if norm:
                self.exact.setdefault(norm, []).append(i)
        self.by_length = sorted(self.exact, key=len, reverse=True)

    def find(self, title: str, taken: set) -> int | None:
        norm = _norm(title)
        if not norm:
            return None
        hit = self.exact.get(norm) or self._prefix(norm) or self._fuzzy(norm)
        if not hit:
            return None
        return next((i for i in hit if i not in taken), hit[0])  # same title twice: the next unused candidate

    def _prefix(self, norm: str) -> list | None:
        for title in self.by_length:
            if len(title) >= 4 and len(norm) > len(title) and norm.startswith(title) and not norm[len(title)].isalnum():
                return self.exact[title]
        return None

    def _fuzzy(self, norm: str) -> list | None:
        close = difflib.get_close_matches(norm, self.by_length, n=1, cutoff=self.cutoff)
        return self.exact[close[0]] if close else None


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text.replace("’", "'").casefold()).strip(_EDGE_PUNCT + "…")


def _resolve(picks: list, titles: _TitleIndex, n: int):
    """Slots (index, method) or None per pick, the (slot, title) pairs left for semantic matching, and the
    number of hallucinated picks so far."""
    slots, pending, hallucinated = [], [], 0
    taken = set()
    for pick in picks:
        in_range = pick.number is not None and 1 <= pick.number <= n
        by_title = titles.find(pick.title, taken) if pick.title else None
        if by_title is not None and (not in_range or by_title != pick.number - 1):
            slot = (by_title, "titles")
        elif in_range:
            slot = (pick.number - 1, "numbers")
        else:
            slot = None
            if pick.title and pick.explicit:
                pending.append((len(slots), pick.title))
            elif pick.number is not None:
                hallucinated += 1
        if slot is not None:
            taken.add(slot[0])
        slots.append(slot)
    return slots, pending, hallucinated


def _match_semantically(slots: list, pending: list, semantic, candidates: list) -> None:
    """Fill the pending slots with the semantic callable's answers that are valid candidate indices."""
    found = list(semantic([title for _, title in pending], list(candidates)) or [])
    for (slot, _), index in zip(pending, found):
        if isinstance(index, numbers.Integral) and not isinstance(index, bool) and 0 <= index < len(candidates):
            slots[slot] = (int(index), "semantic")


def _dedupe(slots: list, want: int):
    indices, methods = [], []
    for index, method in slots:
        if index in indices:
            continue
        indices.append(index)
        if method not in methods:
            methods.append(method)
        if len(indices) == want:
            break
    order = [m for m in ("numbers", "titles", "semantic") if m in methods]
    return indices, "+".join(order) or "none"


def _status(text: str, indices: list, want: int, hallucinated: int) -> str:
    if indices:
        return "ok" if len(indices) >= want else "partial"
    if REFUSAL.search(text):
        return "refusal"
    return "hallucinated" if hallucinated else "malformed"
