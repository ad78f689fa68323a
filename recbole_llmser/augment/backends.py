"""What picks items in SNF and ARV (the backend), and what the two stages share in one augmentation run.

Backends, named in the log, the summary and every record (:func:`resolve_backend`):

* ``llm``: an OpenAI-compatible endpoint picks the items (SNF) and the masked item (ARV); :func:`ask` sends the
  requests, maps each answer onto its candidates (never outside them) and applies the fallback policy;
* ``offline``: no endpoint configured (or ``llm_backend: offline``): the documented stand-in
  :class:`~recbole_llmser.augment.offline_ranker.OfflineRanker` ranks candidates by text similarity to the history;
* ``lm_score`` (``llm_backend: lm_score``): a local causal LM (``lm_score_model``) ranks the candidates of the very
  requests the LLM would get by the likelihood of their titles after the history
  (:class:`~recbole_llmser.augment.lm_score.LMScoreClient`); it answers through :func:`ask` like the LLM, so SNF
  and ARV treat both alike; nothing is generated, so no answer counts as an echo;
* ``model``: the dataset has no item text (``text: none``): the forward helper model ranks and picks, and its item
  embeddings stand in for the text vectors.

:func:`stage_context` gathers, once per run, what SNF and ARV both read (:class:`StageContext`): the selected users'
training prefixes, item vectors and prompt titles, the LLM client (or the LM-score client) or the offline ranker,
and the per-user LLM bookkeeping (tokens, failed calls, answer statuses, the candidate order each prompt showed,
echoed answers) that ends up in the records and the summary. Prompts show candidates in a per-user order
(``presentation.py``, ``llm_shuffle_candidates``); :func:`ask` maps the answer's presented positions back to
candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from logging import getLogger
from pathlib import Path

import numpy as np

from recbole_llmser.augment.embedding_cache import item_embeddings
from recbole_llmser.augment.llm import BudgetExceeded, LLMClient
from recbole_llmser.augment.llm_cache import ResponseCache
from recbole_llmser.augment.llm_settings import settings_from_config
from recbole_llmser.augment.lm_score import BACKEND as LM_SCORE, identity as lm_identity, lm_score_client
from recbole_llmser.augment.matching import apply_fallback, match_answer
from recbole_llmser.augment.offline_ranker import OfflineRanker
from recbole_llmser.augment.presentation import Shown, echo_line, echo_rates, is_echo, show
from recbole_llmser.augment.semantic import build_backend
from recbole_llmser.augment.similarity import nearest
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.item_text import item_texts, prompt_titles

#: The stages that call the LLM, as named in the summary's ``llm_failed`` and the records' ``llm_failed``.
LLM_STAGES = ("snf", "arv")


def resolve_backend(config) -> str:
    """'llm', 'offline', 'lm_score' or 'model' (no item text), from ``llm_backend`` and the configured endpoint."""
    if not config["item_text_field"]:
        return "model"
    choice = config["llm_backend"] or "auto"
    if choice not in ("auto", "openai", "offline", LM_SCORE):
        raise LLMSeRError(f"property 'llm_backend' = {choice!r}: expected auto, openai, offline or {LM_SCORE}")
    if choice in ("offline", LM_SCORE):
        return choice
    configured = settings_from_config(config).configured
    if choice == "openai" and not configured:
        raise LLMSeRError("llm_backend=openai but no endpoint or key: set OPENAI_BASE_URL and/or OPENAI_API_KEY")
    return "llm" if configured else "offline"


#: SNF modes in which the backend picks among candidates (``filter``: CCG's, ``llm_only``: a text-similarity pool).
PICKING_MODES = ("filter", "llm_only")


def asks_llm(config, backend: str) -> bool:
    """Whether the LLM answers a stage of this run: the LLM backend, and SNF picks (:data:`PICKING_MODES`) or ARV
    verifies (not both replaced by an ablation)."""
    return backend == "llm" and _answered(config)


def _answered(config) -> bool:
    """Whether SNF picks (``filter``, ``llm_only``) or ARV verifies: a stage the LM-score client answers."""
    return config["snf_mode"] in PICKING_MODES or config["arv_weight"] is None


def has_client(config, backend: str) -> bool:
    """Whether a client answers a stage of this run: the LLM (:func:`asks_llm`) or the local LM (``lm_score``)."""
    return asks_llm(config, backend) or (backend == LM_SCORE and _answered(config))


def backend_settings(config, backend: str) -> dict:
    """What an artifact depends on beyond the common settings, per backend: for ``lm_score``, when it answers a
    stage, the LM (name, file fingerprint, dtype, token cut) and the scoring version
    (:func:`~recbole_llmser.augment.lm_score.identity`); nothing for the other backends, whose folder hashes stay
    as they are."""
    return lm_identity(config) if backend == LM_SCORE and _answered(config) else {}


def model_name(ctx) -> str | None:
    """The model that answered SNF and ARV, for the log, the summary and the records: ``llm_model`` for the LLM,
    the LM's label for ``lm_score``, None for the offline and text-free backends."""
    if ctx.backend == "llm":
        return ctx.config["llm_model"]
    if ctx.backend == LM_SCORE:
        return ctx.client.settings.model if ctx.client is not None else lm_identity(ctx.config)["lm_score_model"]
    return None


class Titles:
    """Prompt titles of item ids (see :func:`~recbole_llmser.item_text.prompt_titles`)."""

    def __init__(self, values):
        self.values = values

    def __call__(self, items):
        return [self.values[int(i)] for i in items]


@dataclass
class StageContext:
    """What SNF and ARV share. Users are indices into ``users``/``prefixes``; a *row* is a position in ``rows``
    (the selected users), as in CCG's candidates."""

    config: object
    dataset: object  # our unbuilt SequentialDataset (id <-> token, item count)
    backend: str
    users: np.ndarray  # internal user ids
    prefixes: list  # per user: the training prefix
    rows: list  # the selected users
    forward: object  # CCG's forward helper model
    vectors: np.ndarray  # per item id: text vector, or the forward model's item embedding (backend "model")
    matcher: object = None  # answers quoting titles -> candidate indices (text backends)
    titles: Titles | None = None
    client: LLMClient | None = None  # or the LM-score client (backend lm_score)
    ranker: OfflineRanker | None = None
    tokens: dict = field(default_factory=dict)  # user -> [prompt tokens, completion tokens, prompt hashes]
    failed: dict = field(default_factory=lambda: {stage: {} for stage in LLM_STAGES})  # stage -> {user: kind}
    status: dict = field(default_factory=lambda: {f"{stage}_status": {} for stage in LLM_STAGES})
    shown: dict = field(default_factory=lambda: {stage: {} for stage in LLM_STAGES})  # stage -> {user: Shown}
    answered: dict = field(default_factory=lambda: {stage: {} for stage in LLM_STAGES})  # stage -> {user: echo?}

    def item_token(self, item) -> str:
        return self.dataset.id2token(self.dataset.iid_field, int(item))

    def user_token(self, user) -> str:
        """The RecBole token of user index ``user``."""
        return self.dataset.id2token(self.dataset.uid_field, int(self.users[user]))

    def history(self, user, drop_last: bool = False):
        """The user's last ``snf_history_max`` training items (before the masked last one with ``drop_last``)."""
        prefix = self.prefixes[user][:-1] if drop_last else self.prefixes[user]
        return prefix[-int(self.config["snf_history_max"]):]

    def show(self, stage: str, user, candidates) -> list:
        """The items of ``candidates`` (user index ``user``'s row, in the stage's own order) in the order its
        ``stage`` prompt shows them (:func:`~recbole_llmser.augment.presentation.show`); remembered for mapping the
        answer back and for the record."""
        shown = show(self.config, stage, self.user_token(user), candidates)
        self.shown[stage][user] = shown
        return shown.items


def stage_context(config, dataset, backend, users, prefixes, rows, forward, root: Path,
                  embed: bool = True) -> StageContext:
    """Item vectors (embedded once per dataset and semantic backend, under ``root/embeddings``; none without
    ``embed``, for a dry run that only counts tokens), prompt titles, the LLM client (cache ``root/llm_cache.jsonl``;
    only when a stage asks the LLM), the LM-score client (cache ``root/lm_score_cache.jsonl``; only when a stage is
    answered) or the offline ranker."""
    texts = item_texts(dataset, config["item_text_field"]) if backend != "model" else None
    vectors = matcher = None
    if texts is not None and embed:
        vectors, matcher = _item_vectors(config, texts, root)
    elif texts is None:
        vectors = _model_vectors(forward)
    snf_mode, const_w = config["snf_mode"], config["arv_weight"]
    if snf_mode != "filter" or const_w is not None:
        getLogger().info(f"augmentation ablation: snf_mode={snf_mode}, arv_weight={const_w}")
    client = None
    if asks_llm(config, backend):
        client = llm_client(config, root)
    elif has_client(config, backend):
        client = lm_score_client(config, root)
        getLogger().info(f"augmentation: SNF and ARV candidates ranked by {client.settings.model} (lm_score: "
                         "length-normalised title log-likelihood after the history; scores cached in "
                         f"{client.cache.path})")
    titles = Titles(prompt_titles(dataset, texts, int(config["title_max_chars"]))) if texts is not None else None
    ranker = OfflineRanker.from_config(config) if backend == "offline" else None
    return StageContext(config, dataset, backend, users, prefixes, rows, forward, vectors, matcher, titles, client,
                        ranker)


def llm_client(config, root) -> LLMClient:
    return LLMClient(settings_from_config(config), ResponseCache(Path(root) / "llm_cache.jsonl"),
                     progress=bool(config["show_progress"]))


def _item_vectors(config, texts, root):
    """(item text vectors, a title matcher for answers that quote titles) from the semantic backend."""
    backend = build_backend(config)
    vectors = item_embeddings(backend, texts, config["semantic_cache_dir"] or root / "embeddings",
                              config["dataset"], config["item_text_field"])
    threshold = float(config["semantic_match_threshold"])

    def matcher(answers, candidate_titles):
        return nearest(backend.encode(answers), backend.encode(candidate_titles), threshold)

    return vectors, matcher


def _model_vectors(model):
    table = getattr(model, "item_embedding", None)
    if table is None:
        raise LLMSeRError(f"ccg_model={type(model).__name__} has no item_embedding; text-free ARV needs one")
    return table.weight.detach().cpu().numpy()


def ask(ctx: StageContext, stage: str, requests, users, want: int, keep: int, fallback=None) -> list:
    """Ask the LLM (``stage``: "SNF" or "ARV") the ``requests`` of user indices ``users``, whose prompts showed
    ``ctx.shown[stage][user]`` (:meth:`StageContext.show`); map each answer onto those candidates (never outside
    them) and back from presented positions to candidate indices; apply the fallback policy (``fallback``, else
    ``snf_fallback``). Returns per request the picked candidate indices, or None (skipped by the policy).

    An echo (:func:`~recbole_llmser.augment.presentation.is_echo`) of a client that generates its answers (the
    LM-score client does not: ``generates = False``) is counted as the status ``echo``; when two or
    more picks were asked for (SNF), it is unusable like a malformed answer and the fallback decides (see
    ``snf.py``), while a single echoed pick (ARV) is kept (see ``arv.py``). Adds each call's tokens and prompt hash
    to ``ctx.tokens[user]``, whether its answer was an echo to ``ctx.answered[stage][user]``, and the error kind of
    each call that failed (:attr:`~recbole_llmser.augment.llm.LLMResult.retryable`) to ``ctx.failed[stage][user]``;
    logs the stage's echo rate.

    ``requests`` may be a generator (one request per user, in ``users`` order): an LLM client streams it
    (:meth:`~recbole_llmser.augment.llm.LLMClient.stream`), so at most a few times ``llm_concurrency`` prompts exist
    at once, and each answer is matched as soon as it comes; a client without ``stream`` (LM scoring) gets the
    list."""
    name = stage.lower()
    policy = fallback or ctx.config["snf_fallback"]
    generates = getattr(ctx.client, "generates", True)
    picks = [None] * len(users)
    try:
        for index, request, result in _answers(ctx.client, requests, stage, len(users)):
            if result is None:  # not started (budget, fatal error): the client raises once the stream ends
                continue
            picks[index] = _pick(ctx, name, users[index], request, result, want, keep, policy, generates)
    except BudgetExceeded as err:
        raise LLMSeRError(
            f"LLM token budget llm_budget_tokens={err.budget} spent during {stage} ({err.finished} calls finished "
            f"and cached); re-run with a larger --llm_budget_tokens to resume"
        ) from None
    if ctx.answered[name]:
        getLogger().info(echo_line(stage, echo_rates({name: ctx.answered[name]})[name]))
    return picks


def _answers(client, requests, stage: str, total: int):
    """``(index, request, result)`` per request, as the answers come (a streaming client) or in order."""
    if hasattr(client, "stream"):
        yield from client.stream(requests, desc=stage, total=total)
        return
    requests = list(requests)
    yield from zip(range(len(requests)), requests, client.run(requests, desc=stage))


def _pick(ctx: StageContext, name: str, user: int, request, result, want: int, keep: int, policy: str,
          generates: bool):
    """One answer of :func:`ask`: its tokens and status counted; its picks (candidate indices), or None."""
    status = ctx.status[f"{name}_status"]
    used = ctx.tokens.setdefault(user, [0, 0, []])
    used[0] += result.prompt_tokens or 0
    used[1] += result.completion_tokens or 0
    used[2].append(ctx.client.key(request)[:16])
    shown = ctx.shown[name][user]
    if result.ok:
        match = _presented_match(ctx, result.text, shown, want, generates)
        if generates:
            ctx.answered[name][user] = match.status == "echo"
    else:
        match = match_answer("", ctx.titles(shown.items), want)
        status[f"error:{result.error_kind}"] = status.get(f"error:{result.error_kind}", 0) + 1
        if result.retryable:
            ctx.failed[name][user] = result.error_kind
    status[match.status] = status.get(match.status, 0) + 1
    filled = apply_fallback(match, len(shown.items), keep, policy)
    return None if filled is None else list(filled.indices)


def _presented_match(ctx: StageContext, text: str, shown: Shown, want: int, generates: bool = True):
    """The answer matched onto the presented candidates, its picks mapped back to candidate indices; an echo of a
    generated answer gets the status "echo" (and, when ``want`` >= 2, no picks: the fallback fills them)."""
    match = match_answer(text, ctx.titles(shown.items), want, semantic=ctx.matcher)
    if generates and is_echo(match.indices, want):
        match = replace(match, status="echo", indices=[] if want >= 2 else match.indices)
    return replace(match, indices=shown.to_candidates(match.indices))
