"""How SNF and ARV show their candidates to the LLM, and answers that only repeat what was shown (echo).

Position bias
=============
Small instruction-tuned models asked to pick k of K numbered candidates often answer with the numbers in the
order shown (``{"items": [1, 2, ..., 15]}``: 13 of 14 users with Qwen2.5-Coder-0.5B/1.5B-Instruct). Shown in CCG's
order, such an answer is indistinguishable from an LLM that agrees with CCG, and the "filter" silently becomes
CCG's top k. So, with ``llm_shuffle_candidates: true`` (the default), every user's candidates are shown in an
order of their own (:func:`presentation_order`): a permutation drawn from a generator seeded by the run's
``seed``, the stage (``snf``, ``arv``) and the user's RecBole token, so the same run shows the same prompts again
(stable LLM cache keys) and another seed shows other ones. The numbers in an answer mean *presented* positions;
position j maps back to candidate ``order[j]`` exactly (:class:`Shown`), before any fallback, which works in the
candidates' own order (CCG's for SNF, the forward model's for ARV). Each artifact record keeps the items in the
order they were shown (``presented``), which reproduces the prompt's candidate list. ``false`` shows CCG's (ARV:
the forward model's) order, as before.

The order matters only to the LLM backend: the offline stand-in and the text-free ``model`` backend rank vectors,
not prompts, so their artifacts do not depend on the property, and it is part of the augmentation folder hash only
when the LLM answers a stage (``augment/pipeline.py``, :data:`LLM_AUG_KEYS`).

Echo
====
An answer whose picks, mapped onto the presented list, are exactly its first n entries in order (all of them, or
the first k) is an *echo* (:func:`is_echo`): the LLM kept the order it was shown rather than filtering. It needs at
least two picks when two or more were asked for; when one item is asked for (ARV), answering the first candidate
is an echo. With shuffling on, an echo is the shuffled order, not CCG's, but it is still not filtering. Echoes are
counted as the answer status ``echo`` beside ``ok``, ``partial``, ``refusal``, ``malformed``, ``hallucinated``;
the echo rate per stage (echoed answers / answers received; failed calls are not answers) goes to the log and to
``summary.json`` (``llm_echo``), and a rate above ``llm_echo_warn_rate`` gives one warning line naming the model
(:func:`warn_if_echoing`). What an echo does to the picks is decided by the stage (``snf.py``, ``arv.py``).
"""

from __future__ import annotations

import hashlib
from array import array

import numpy as np

#: Properties that identify an augmentation artifact only when the LLM answers a stage (the offline and text-free
#: backends never show a prompt): part of the folder hash and the summary's settings then, and only then.
LLM_AUG_KEYS = ("llm_shuffle_candidates",)


class Shown:
    """One prompt's candidate list: ``order[j]`` is the index, among the stage's candidates, of presented position
    j (0-based; the prompt numbers it j + 1), and ``items[j]`` is that candidate's item id.

    One is kept per user and stage until the records are written, so both are stored as typed arrays, not lists
    of Python ints (about 0.5 KB instead of 1.3 KB at K = 20, measured with tracemalloc: over a gigabyte less for
    SNF and ARV together at a million users); ``order`` and ``items`` read back as lists."""

    __slots__ = ("_order", "_items")

    def __init__(self, order, items):
        self._order = array("I", order)
        self._items = array("q", items)

    @property
    def order(self) -> list:
        return self._order.tolist()

    @property
    def items(self) -> list:
        return self._items.tolist()

    def to_candidates(self, positions) -> list:
        """Presented positions (0-based) -> candidate indices."""
        return [self._order[j] for j in positions]

    def __eq__(self, other) -> bool:
        return isinstance(other, Shown) and self._order == other._order and self._items == other._items

    __hash__ = None

    def __repr__(self) -> str:
        return f"Shown(order={self.order}, items={self.items})"


def presentation_order(seed, stage: str, user: str, n: int, shuffle: bool = True) -> list:
    """The order in which ``n`` candidates are shown: candidate indices by presented position.

    ``shuffle``: a permutation from a generator seeded by sha256 of ``"<seed>:<stage>:<user>"`` (``user``: the
    RecBole token, stable across runs and datasets' internal ids); else ``[0, 1, ..., n - 1]``."""
    if not shuffle or n < 2:
        return list(range(n))
    digest = hashlib.sha256(f"{seed}:{stage}:{user}".encode("utf-8")).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    return [int(j) for j in rng.permutation(n)]


def show(config, stage: str, user: str, candidates) -> Shown:
    """``candidates`` (item ids, in the stage's own order) as one user's prompt shows them
    (``llm_shuffle_candidates``: unset counts as true)."""
    shuffle = config["llm_shuffle_candidates"] is not False
    order = presentation_order(config["seed"], stage, user, len(candidates), shuffle)
    return Shown(order, [int(candidates[j]) for j in order])


def is_echo(positions, want: int) -> bool:
    """Whether the picks (presented positions, 0-based, in the answer's order) repeat the presented order: they are
    0, 1, ..., n - 1 with n >= 1 when ``want`` is 1, n >= 2 otherwise."""
    n = len(positions)
    return n >= min(max(int(want), 1), 2) and list(positions) == list(range(n))


def echo_rates(answered: dict) -> dict:
    """Per stage: ``{"answers", "echo", "rate"}`` from ``answered`` (stage -> {user: whether the answer was an
    echo}); ``rate`` is None for a stage without answers."""
    out = {}
    for stage, users in answered.items():
        n, echoed = len(users), sum(bool(e) for e in users.values())
        out[stage] = {"answers": n, "echo": echoed, "rate": round(echoed / n, 4) if n else None}
    return out


def echo_line(stage: str, rate: dict) -> str:
    """One log line with a stage's echo rate (``rate``: an entry of :func:`echo_rates`)."""
    share = f"{rate['rate']:.0%}" if rate["rate"] is not None else "n/a"
    return (f"{stage}: {rate['echo']} of {rate['answers']} LLM answer(s) ({share}) repeat the presented candidate "
            "order (echo)")


def warn_if_echoing(rates: dict, model: str, threshold, logger) -> str | None:
    """Log ONE warning line when a stage's echo rate exceeds ``threshold`` (``llm_echo_warn_rate``); returns it."""
    limit = 0.5 if threshold is None else float(threshold)
    high = [(stage, r) for stage, r in rates.items() if r["rate"] is not None and r["rate"] > limit]
    if not high:
        return None
    stages = ", ".join(f"{stage.upper()} {r['rate']:.0%} ({r['echo']} of {r['answers']})" for stage, r in high)
    line = (f"the LLM is not filtering: {model} repeated the presented candidate order in {stages} of its answers "
            f"(llm_echo_warn_rate {limit:g}); its picks carry no information beyond the order shown: try a larger "
            "or better instruction-tuned model")
    logger.warning(line)
    return line
