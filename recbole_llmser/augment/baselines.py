"""The paper's baselines as pseudo-item sources (``snf_mode``): the same pipeline, ARV and dual-channel training,
only where the pseudo items P_u come from changes. Neither runs CCG: the reverse helper is not trained, the forward
helper is (ARV needs it; it is the same file CCG's runs train and reuse).

* ``cooccurrence`` — the items that most often come *directly before* the user's first training item s1 in other
  users' training prefixes. Every adjacent pair (a, b) of every training prefix counts once per occurrence
  (:func:`predecessor_counts`); user u ranks the items a by the count of (a, s1_u), highest first
  (:func:`cooccurrence_items`). Items of u's own prefix are never chosen, which also removes u's own pairs
  exactly (every a of a pair in u's prefix is an item of u's prefix), so only other users' prefixes count. When
  fewer than M items precede s1, the rest are the most popular items of all training prefixes (occurrences),
  again outside u's prefix and not already chosen. Ties (equal counts, equal popularity) are broken by one random
  rank per item drawn from the run's ``seed`` (:func:`tiebreak_keys`): deterministic per seed, never biased
  towards low or high ids. The M items are stored in prepend order with the most frequent predecessor
  right next to s1 (as SNF stores the LLM's best pick), the popularity fillers furthest from it. No LLM.
* ``llm_only`` — the LLM picks the M items, with no CCG, from a catalogue-wide candidate pool of K
  (``ccg_num_candidates``) items per user (:func:`text_pools`): the K items whose text vectors (the embeddings
  the pipeline computes anyway) are most similar to the user's history profile, the recency-weighted mean of its
  last ``snf_history_max`` training items' vectors (``offline_ranker_decay``, as the offline stand-in's profile).
  Then SNF asks exactly as for the method: the same prompt, k picks (``snf_num_picks``), the first M kept, the
  best next to s1, ``snf_fallback`` for unusable answers (``ccg_order`` then means the pool's similarity order).
  Who answers is the run's backend: the LLM endpoint, the offline stand-in (which ranks the pool by the same
  profile, so it keeps the pool's top M), or, without item text (backend ``model``), the forward helper. Without
  text the pool is the forward helper's top K after the user's training prefix instead (:func:`forward_pools`),
  which the forward helper then ranks again by the same scores: the text-free ``llm_only`` is the forward
  model's top M.

Leakage: both read training prefixes only (:func:`~recbole_llmser.sequences.training_prefixes`). The pools and
the popularity fallback hold only items that occur in some training prefix (:func:`training_item_mask`), so an
item seen only as a validation or test item is never a candidate, however similar its text; no user's own prefix
item is chosen. Ties in the pools are broken by the same seeded ranks; scores are rounded to 1e-6 first.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from recbole_llmser.augment.backends import StageContext
from recbole_llmser.augment.offline_ranker import OfflineRanker
from recbole_llmser.augment.similarity import l2_normalize
from recbole_llmser.helper_models import batch_scores, train_helper

#: The ``snf_mode`` values that replace CCG as the source of P_u.
BASELINES = ("cooccurrence", "llm_only")


# ----- the maths (pure) -------------------------------------------------------------------------------------
def tiebreak_keys(n_items: int, seed: int) -> np.ndarray:
    """One random rank per item id (0..n_items-1) from ``seed``: the smaller rank wins a tie."""
    return np.random.default_rng(int(seed)).permutation(int(n_items))


def run_tiebreak_keys(config, dataset) -> np.ndarray:
    """:func:`tiebreak_keys` of a run: one per item of ``dataset``, from the run's ``seed``."""
    return tiebreak_keys(dataset.item_num, int(config["seed"]))


def predecessor_counts(prefixes) -> dict:
    """``{b: Counter({a: n})}``: how often item a comes directly before item b, over every adjacent pair of every
    training prefix (each occurrence counts)."""
    counts = defaultdict(Counter)
    for prefix in prefixes:
        items = [int(i) for i in prefix]
        for a, b in zip(items[:-1], items[1:]):
            counts[b][a] += 1
    return dict(counts)


def popularity_order(prefixes, keys) -> list:
    """Every item of the training prefixes, most frequent (occurrences) first, ties by ``keys``."""
    counts = Counter(int(i) for prefix in prefixes for i in prefix)
    return ranked(counts, set(), keys)


def ranked(counts: dict, exclude, keys, limit=None) -> list:
    """The items of ``counts`` outside ``exclude``, highest count first, ties by the smaller ``keys[item]``."""
    order = sorted((item for item in counts if item not in exclude), key=lambda item: (-counts[item], keys[item]))
    return order if limit is None else order[:limit]


def first_outside(popular: list, taken: set, k: int) -> list:
    """The first ``k`` items of ``popular`` (most frequent first) that are not in ``taken``."""
    picked = []
    for item in popular:
        if len(picked) == k:
            break
        if item not in taken:
            picked.append(item)
    return picked


def popular_outside(prefixes, popular: list, k: int) -> list:
    """Per prefix, the first ``k`` items of ``popular`` that the prefix does not hold: what a dry run, which trains
    no helper model, shows the LLM in place of CCG's candidates."""
    return [np.asarray(first_outside(popular, set(int(i) for i in prefix), k), dtype=np.int64) for prefix in prefixes]


def cooccurrence_items(prefix, predecessors: dict, popular: list, keys, m: int) -> tuple:
    """``(items, filled)``: user's M pseudo items best first (the most frequent direct predecessor of the prefix's
    first item first), and how many of them the popularity fallback (``popular``) supplied."""
    own = set(int(i) for i in prefix)
    items = ranked(predecessors.get(int(prefix[0]), {}), own, keys, m)
    fill = first_outside(popular, own | set(items), m - len(items)) if len(items) < m else []
    return items + fill, len(fill)


def training_item_mask(prefixes, n_items: int) -> np.ndarray:
    """Boolean per item id: whether it occurs in some training prefix (padding 0 never does)."""
    mask = np.zeros(int(n_items), dtype=bool)
    for prefix in prefixes:
        mask[np.asarray(prefix, dtype=np.int64)] = True
    mask[0] = False
    return mask


def top_k(scores, keys, k: int) -> np.ndarray:
    """The ``k`` item ids with the highest finite ``scores`` (one per item id; -inf: not allowed), best first, ties
    by the smaller ``keys``; fewer when fewer are allowed."""
    scores = np.asarray(scores, dtype=np.float64)
    allowed = np.flatnonzero(np.isfinite(scores))
    if len(allowed) > k > 0:  # keep every item scoring at least the k-th best (ties at the cut included)
        cut = np.partition(scores[allowed], len(allowed) - k)[len(allowed) - k]
        allowed = allowed[scores[allowed] >= cut]
    order = np.lexsort((keys[allowed], -scores[allowed]))
    return allowed[order][:max(0, int(k))]


def pool_from_scores(scores, allowed, exclude, keys, k: int) -> np.ndarray:
    """One user's pool: :func:`top_k` of ``scores`` (rounded to 1e-6) over the ``allowed`` items outside
    ``exclude`` (the user's prefix)."""
    scores = np.where(allowed, np.round(np.asarray(scores, dtype=np.float64), 6), -np.inf)
    scores[np.asarray(exclude, dtype=np.int64)] = -np.inf
    return top_k(scores, keys, k)


# ----- the sources --------------------------------------------------------------------------------------------
def forward_helper(config, dataset, users, prefixes, models_dir):
    """The forward helper alone (ARV's, and the text-free pool's), trained or reused exactly as CCG does."""
    return train_helper(config, dataset, list(users), prefixes, "forward", models_dir)


def candidates(ctx: StageContext) -> tuple:
    """``(items, source)``: per selected row, the baseline's candidate items in its own order (best first), and
    what the summary says about the source."""
    config = ctx.config
    mode, k = config["snf_mode"], int(config["ccg_num_candidates"])
    if mode == "cooccurrence":
        keys = run_tiebreak_keys(config, ctx.dataset)
        predecessors = predecessor_counts(ctx.prefixes)
        popular = popularity_order(ctx.prefixes, keys)
        found = [cooccurrence_items(ctx.prefixes[i], predecessors, popular, keys, int(config["aug_num_pseudo"]))
                 for i in ctx.rows]
        return [np.asarray(items, dtype=np.int64) for items, _ in found], {
            "kind": "cooccurrence", "users_filled_by_popularity": sum(1 for _, n in found if n),
            "items_filled_by_popularity": sum(n for _, n in found)}
    pools, kind = similarity_pools(ctx, k)
    return pools, {"kind": kind, "pool_size": k, "picker": ctx.backend}


def uses_text_pool(backend: str) -> bool:
    """Whether the similarity pool of :func:`similarity_pools` is built from item text vectors (every backend but
    ``model``, which has no item text and ranks with the forward helper)."""
    return backend != "model"


def similarity_pools(ctx: StageContext, k: int) -> tuple:
    """``(pools, kind)``: ``llm_only``'s candidate pool of ``k`` items per selected row: the text pool
    (:func:`text_pools`), or without item text (backend ``model``) the forward helper's (:func:`forward_pools`)."""
    keys = run_tiebreak_keys(ctx.config, ctx.dataset)
    allowed = training_item_mask(ctx.prefixes, ctx.dataset.item_num)
    prefixes = [ctx.prefixes[i] for i in ctx.rows]
    if not uses_text_pool(ctx.backend):
        return forward_pools(ctx.forward, prefixes, allowed, keys, k, int(ctx.config["eval_batch_size"])), \
            "forward_pool"
    ranker = OfflineRanker.from_config(ctx.config)
    return text_pools(ctx.vectors, [ctx.history(i) for i in ctx.rows], prefixes, allowed, keys, k, ranker), \
        "text_pool"


def text_pools(vectors, histories, prefixes, allowed, keys, k: int, ranker: OfflineRanker, batch: int = 1024):
    """Per user, the ``k`` allowed items outside its prefix whose vectors are most similar (cosine) to the
    history's profile (:meth:`~recbole_llmser.augment.offline_ranker.OfflineRanker.profile`; no usable profile:
    every score 0, so the seeded ranks decide)."""
    unit = l2_normalize(vectors).astype(np.float64)
    pools = []
    for start in range(0, len(histories), batch):
        profiles = np.zeros((len(histories[start:start + batch]), unit.shape[1]))
        for r, history in enumerate(histories[start:start + batch]):
            profile = ranker.profile(vectors[np.asarray(history, dtype=np.int64)])
            if profile is not None:
                profiles[r] = profile
        for r, scores in enumerate(profiles @ unit.T):
            pools.append(pool_from_scores(scores, allowed, prefixes[start + r], keys, k))
    return pools


def forward_pools(model, prefixes, allowed, keys, k: int, batch: int) -> list:
    """Per user, the forward helper's ``k`` best-scored allowed items after its training prefix, outside it."""
    pools = []
    for start, scores in batch_scores(model, prefixes, batch):
        for r, row in enumerate(scores.cpu().numpy()):
            pools.append(pool_from_scores(row, allowed, prefixes[start + r], keys, k))
    return pools
