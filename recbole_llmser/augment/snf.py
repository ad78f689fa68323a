"""SNF — semantic noise filtering: which users are augmented, and which CCG candidates become pseudo items P_u.

The LLM (or the offline stand-in, or the forward helper model for a dataset without text; see ``backends.py``) sees
the user's last ``snf_history_max`` training titles and the K numbered candidates (``prompts.py``) and returns
``snf_num_picks`` (k) candidate indices in order of likelihood; the first ``aug_num_pseudo`` (M) become P_u.
P_u is PREPENDED to the user's sequence with the most likely item adjacent to the first real item, i.e. the artifact
stores ``pseudo_items`` in sequence order: ``reversed(top M)``. (CCG's reverse model proposes the item *before* s1;
the best guess for that position is the one right before s1.) An answer that names no usable candidate falls back
(``snf_fallback``: ``skip`` the user, or ``ccg_order``).

The LLM sees the candidates in a per-user shuffled order (``llm_shuffle_candidates``, ``presentation.py``); its
numbers are mapped back to CCG's candidates exactly, and the fallback fills in CCG's order, never the shown one.

**An echoed answer falls back like an unusable one.** An answer that repeats the presented order (all of it or its
first k, in order: ``echo``, counted in ``snf_status`` and the summary's ``llm_echo``) is not kept as the picks:
``snf_fallback`` decides, as for a malformed answer. Reason: an echo carries no judgement of the LLM. With
shuffling on it is the user's random presentation order, so keeping it would make P_u a random draw from the K
candidates, throwing away CCG's ranking; with shuffling off it is CCG's order, which is what ``ccg_order`` gives
anyway. Falling back thus gives the same P_u whichever order was shown, never one that depends on the shuffle's
seed, and says openly (status, summary, the warning above ``llm_echo_warn_rate``) that the LLM did not filter.
With ``snf_num_picks: 1`` a single echoed pick is kept, as in ARV: one pick equals the first shown candidate by
chance once in K.

Ablations: ``snf_mode: ccg_top`` keeps CCG's top M candidates without any filtering; ``snf_mode: random`` prepends
M items drawn uniformly from the catalogue instead (:func:`random_pseudo_items`). Neither calls the LLM.

Baselines (``baselines.py``) hand this stage other candidates in place of CCG's: ``cooccurrence`` (the most frequent
direct predecessors of s1, kept in their own order like ``ccg_top``; no LLM) and ``llm_only`` (a catalogue-wide
pool by text similarity, from which the backend picks exactly as for ``filter``: :data:`PICKING_MODES`).
"""

from __future__ import annotations

import numpy as np

from recbole_llmser.augment.backends import PICKING_MODES, StageContext, ask
from recbole_llmser.augment.llm import LLMRequest
from recbole_llmser.augment.prompts import SNF_TEMPLATE_VERSION, expected_answer_tokens, snf_messages, snf_schema
from recbole_llmser.helper_models import batch_scores


# ----- the method's maths (pure) ----------------------------------------------------------------------------
def select_users(train_lengths: dict, max_len=None) -> list:
    """Users to augment: every user with at least one training item, or only those with ≤ ``max_len``."""
    return [u for u, n in train_lengths.items() if n >= 1 and (max_len is None or n <= max_len)]


def keep_pseudo_items(picked_indices, candidates, m: int) -> list:
    """The first ``m`` picked candidates (LLM order), in prepend (sequence) order."""
    top = [candidates[i] for i in picked_indices[:m]]
    return top[::-1]


def random_pseudo_items(n_items: int, prefixes, m: int, seed: int) -> list:
    """Ablation ``snf_mode: random``: per user ``m`` distinct items drawn uniformly from ids 1..n_items-1 outside
    the user's training prefix (fewer when the catalogue is too small); deterministic in ``seed`` and user order."""
    rng = np.random.default_rng(seed)
    out = []
    for prefix in prefixes:
        seen = set(int(i) for i in prefix)
        want = min(m, n_items - 1 - len(seen))
        picked = []
        while len(picked) < want:
            for item in rng.integers(1, n_items, size=2 * (want - len(picked)) + 4):
                item = int(item)
                if item not in seen:
                    seen.add(item)
                    picked.append(item)
                    if len(picked) == want:
                        break
        out.append(picked)
    return out


# ----- the stage --------------------------------------------------------------------------------------------
def llm_requests(ctx: StageContext, candidates: np.ndarray):
    """One LLM request per selected user (``candidates``: CCG's or a baseline's pool, one row per selected user),
    made as it is read (a generator, read once: by SNF, which streams it to the LLM, or by a dry run); none when
    SNF does not ask the LLM (another backend, or a mode that does not pick)."""
    if ctx.client is None or ctx.config["snf_mode"] not in PICKING_MODES:
        return iter(())
    k = int(ctx.config["snf_num_picks"])
    return (  # CCG always gives K candidates; a baseline's pool may hold fewer
        LLMRequest(id=f"snf:{ctx.user_token(i)}", template_version=SNF_TEMPLATE_VERSION,
                   messages=snf_messages(ctx.titles(ctx.history(i)), ctx.titles(shown), k),
                   schema=snf_schema(k, len(shown)), expected_completion_tokens=expected_answer_tokens(k))
        for row, i in enumerate(ctx.rows) for shown in [ctx.show("snf", i, candidates[row])]
    )


def run(ctx: StageContext, candidates: np.ndarray, requests) -> tuple:
    """``(picks, pseudo)``: per row the picked candidate indices (None: skipped by ``snf_fallback``), and
    ``{row: P_u in sequence order}`` for the users that are augmented."""
    config = ctx.config
    k, m = int(config["snf_num_picks"]), int(config["aug_num_pseudo"])
    rows = ctx.rows
    if config["snf_mode"] not in PICKING_MODES:  # the candidates' own order, or random items in their place
        picks = [list(range(len(candidates[row]))) for row in range(len(rows))]
    elif ctx.client is not None:
        picks = ask(ctx, "SNF", requests, rows, k, m)
    elif ctx.backend == "offline":
        picks = [ctx.ranker.rank(ctx.vectors[ctx.history(i)], ctx.vectors[candidates[row]], k)
                 for row, i in enumerate(rows)]
    else:  # model: forward-model scores of the K candidates after the user's history
        picks = model_rank([ctx.prefixes[i] for i in rows], candidates, ctx.forward, int(config["eval_batch_size"]))
    if config["snf_mode"] == "random":
        drawn = random_pseudo_items(ctx.dataset.item_num, [ctx.prefixes[i] for i in rows], m, int(config["seed"]))
        return picks, dict(enumerate(drawn))
    return picks, {row: keep_pseudo_items(p, list(candidates[row]), m) for row, p in enumerate(picks) if p is not None}


def model_rank(histories, candidates, model, batch) -> list:
    """Per user, candidate indices ordered by the forward model's score after the history."""
    out = []
    for start, scores in batch_scores(model, histories, batch):
        scores = scores.cpu().numpy()
        for r, c in enumerate(candidates[start:start + len(scores)]):
            out.append([int(j) for j in np.argsort(-scores[r][c], kind="stable")])
    return out
