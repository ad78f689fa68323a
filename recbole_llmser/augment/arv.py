"""ARV — augmentation reliability verification: how far to trust each augmented user's pseudo items.

For a user u with training items S_u (validation and test excluded) ARV masks the LAST training item m_u, lets the
forward helper model propose ``arv_num_candidates`` (10) candidates after ``P_u ⊕ S_u[:-1]``, and asks the LLM (or
the offline stand-in; the text-free backend takes the forward model's top candidate) to pick one, m̂_u. Then

* w_u  = 1 if m̂_u = m_u, else sim(text(m̂_u), text(m_u)) clipped to [0, 1]          (:func:`reliability`)
* w̃_u = β · w_u  if |P_u ⊕ S_u| > T + M, else w_u                                     (:func:`decayed_weight`)

sim is the cosine of the items' text vectors (the forward model's item embeddings without text). Users with a
single training item have nothing to mask: they get the mean w_u of the users that could be verified
(:func:`fill_unverifiable`), and their record says so (``arv_status: "mean"``). A failed or unusable LLM answer
falls back to the forward model's order.

The LLM sees the candidates in a per-user shuffled order (``llm_shuffle_candidates``, ``presentation.py``); its
number is mapped back to the forward model's candidates exactly. Answering the first candidate shown counts as an
``echo`` (``arv_status`` counts, the summary's ``llm_echo``), but the pick is kept: one answer equals the first
shown candidate by chance once in ``arv_num_candidates``, so a single answer is no evidence; only the echo rate over
all users is (about 1/``arv_num_candidates`` from an LLM that reads the prompt, 1.0 from one that always answers 1).

Ablation: ``arv_weight: <w>`` skips ARV and gives every user the same w (1.0 = no ARV); no LLM call.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from recbole_llmser.augment.backends import StageContext, ask
from recbole_llmser.augment.ccg import score_top_k
from recbole_llmser.augment.llm import LLMRequest
from recbole_llmser.augment.prompts import ARV_TEMPLATE_VERSION, arv_messages, arv_schema, expected_answer_tokens
from recbole_llmser.augment.similarity import cosine01


# ----- the method's maths (pure) ----------------------------------------------------------------------------
def reliability(predicted: int, masked: int, similarity: float) -> float:
    """w_u: 1 for the exact item, else the similarity of the two items clipped to [0, 1]."""
    if predicted == masked:
        return 1.0
    return float(min(1.0, max(0.0, similarity)))


def decayed_weight(w: float, n_pseudo: int, n_train: int, threshold: int, n_pseudo_max: int, beta: float) -> float:
    """w̃_u = β·w_u when |P_u ⊕ S_u| = n_pseudo + n_train exceeds T + M (long users lean on real data),
    else w_u."""
    return float(beta * w) if n_pseudo + n_train > threshold + n_pseudo_max else float(w)


def fill_unverifiable(weights: dict, verifiable: set, default: float = 1.0) -> tuple:
    """Give every user not in ``verifiable`` the mean w of the verifiable ones (``default`` if there are none).

    Returns (new weights dict, the fill value)."""
    known = [w for u, w in weights.items() if u in verifiable]
    fill = float(np.mean(known)) if known else float(default)
    return {u: (w if u in verifiable else fill) for u, w in weights.items()}, fill


# ----- the stage --------------------------------------------------------------------------------------------
class Verification(NamedTuple):
    weights: dict  # row -> w_u (every augmented row)
    predicted: dict  # row -> m̂_u (verified rows only)
    mean_w: float  # the w of the rows that could not be verified
    verified: int  # how many rows were verified


def run(ctx: StageContext, pseudo: dict) -> Verification:
    """w_u for every augmented row of ``pseudo`` (``{row: P_u}``, from SNF)."""
    config = ctx.config
    n_arv, const_w = int(config["arv_num_candidates"]), config["arv_weight"]
    users = {row: ctx.rows[row] for row in pseudo}
    rows = [row for row in pseudo if len(ctx.prefixes[users[row]]) >= 2] if const_w is None else []
    histories = [np.concatenate([pseudo[row], ctx.prefixes[users[row]][:-1]]) for row in rows]
    exclude = [np.unique(h) for h in histories]
    candidates = score_top_k(ctx.forward, histories, exclude, n_arv, int(config["eval_batch_size"]), "ARV",
                             bool(config["show_progress"])) if rows else np.zeros((0, n_arv), int)
    if ctx.client is not None and rows:
        requests = (request(ctx.user_token(users[row]), ctx.titles(ctx.history(users[row], drop_last=True)),
                            ctx.titles(ctx.show("arv", users[row], candidates[j])), n_arv)
                    for j, row in enumerate(rows))  # streamed to the LLM, made as it reads them
        picks = ask(ctx, "ARV", requests, [users[row] for row in rows], 1, 1, fallback="ccg_order")
        picked = [p[0] for p in picks]
    elif ctx.backend == "offline":
        picked = [ctx.ranker.pick(ctx.vectors[ctx.history(users[row], drop_last=True)], ctx.vectors[candidates[j]])
                  for j, row in enumerate(rows)]
    else:
        picked = [0 for _ in rows]  # the forward model's own top candidate
    weights, predicted = {}, {}
    for j, row in enumerate(rows):
        masked = int(ctx.prefixes[users[row]][-1])
        predicted[row] = int(candidates[j][picked[j]])
        weights[row] = reliability(predicted[row], masked, cosine01(ctx.vectors[predicted[row]], ctx.vectors[masked]))
    weights.update({row: 0.0 for row in pseudo if row not in weights})
    weights, fill = fill_unverifiable(weights, set(rows), default=1.0 if const_w is None else float(const_w))
    return Verification(weights, predicted, fill, len(rows))


def request(user: str, history_titles, cand_titles, n_arv: int) -> LLMRequest:
    """The ARV request of ``user`` (its RecBole token)."""
    return LLMRequest(id=f"arv:{user}", template_version=ARV_TEMPLATE_VERSION,
                      messages=arv_messages(history_titles, cand_titles), schema=arv_schema(n_arv),
                      expected_completion_tokens=expected_answer_tokens(1))


def dry_run_requests(ctx: StageContext, candidates):
    """The ARV requests a dry run counts: ARV's candidates come from P_u, which only SNF's answers give, so the first
    ``arv_num_candidates`` of the dry run's candidate lists (one per selected user) stand in for them."""
    if ctx.config["arv_weight"] is not None:
        return []
    n_arv = int(ctx.config["arv_num_candidates"])
    return (request(ctx.user_token(i), ctx.titles(ctx.history(i, drop_last=True)),
                    ctx.titles(ctx.show("arv", i, candidates[row][:n_arv])), n_arv)
            for row, i in enumerate(ctx.rows) if len(ctx.prefixes[i]) >= 2)
