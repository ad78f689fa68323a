"""CCG — candidate generation with helper sequential models trained on TRAINING PREFIXES only.

* Training prefix of a user = the chronological sequence minus its validation and test items
  (:func:`~recbole_llmser.sequences.training_prefixes`), so nothing here ever sees a validation or test item, and
  CCG never proposes an item the backbone is trained to predict for that user.
* The *reverse* helper model (:mod:`recbole_llmser.helper_models`: ``ccg_model``, default SASRec) is trained on the
  reversed training prefixes; given a user's reversed prefix it scores every item as "the item before the first
  one": the top ``ccg_num_candidates`` (K) items, minus the prefix's own items and padding, are the pseudo-prior
  candidates (:func:`score_top_k`).
* The *forward* helper model (same class and settings) is trained here too, on the forward training prefixes: SNF's
  text-free backend and ARV (``arv.py``) score with it.
* ``ccg_text_candidates`` (0 = the paper) hands the last places of the K to the ``llm_only`` baseline's similarity
  pool (:func:`~recbole_llmser.augment.baselines.similarity_pools`): :func:`mix_candidates`. CCG still proposes the
  rest and SNF, ARV and DCT are unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from recbole_llmser.helper_models import batch_scores, train_helper


class Candidates(NamedTuple):
    """What CCG hands on: the forward helper model and K candidates per selected user (row of ``rows``)."""

    forward: torch.nn.Module
    items: np.ndarray  # (selected users, K) item ids, the reverse model's best first


def run(config, dataset, users, prefixes, rows, models_dir: Path) -> Candidates:
    """Train (or reuse) the reverse and forward helpers on the training ``prefixes`` of all ``users``; the reverse
    model's top ``ccg_num_candidates`` items before each selected user's prefix (``rows``: indices into ``users``)."""
    rev_seqs = [p[::-1] for p in prefixes]
    reverse = train_helper(config, dataset, list(users), rev_seqs, "reverse", models_dir)
    forward = train_helper(config, dataset, list(users), prefixes, "forward", models_dir)
    items = score_top_k(reverse, [rev_seqs[i] for i in rows], [prefixes[i] for i in rows],
                        int(config["ccg_num_candidates"]), int(config["eval_batch_size"]), "CCG",
                        bool(config["show_progress"]))
    return Candidates(forward, items)


def mix_candidates(ccg_items, pools, n_pool: int) -> np.ndarray:
    """``ccg_text_candidates``: per row, CCG's first ``K - n_pool`` candidates, then the items of the row's pool
    (best first) that are not among them, up to K; CCG's next candidates fill in when the pool runs short. Rows keep
    K items, all distinct when CCG's are."""
    ccg_items = np.asarray(ccg_items, dtype=np.int64)
    k = ccg_items.shape[1]
    out = np.empty_like(ccg_items)
    for row, (ccg_row, pool) in enumerate(zip(ccg_items, pools)):
        kept = list(ccg_row[:k - int(n_pool)])
        seen = set(kept)
        for item in (*np.asarray(pool, dtype=np.int64), *ccg_row[k - int(n_pool):]):
            if len(kept) == k:
                break
            if int(item) not in seen:
                kept.append(int(item))
                seen.add(int(item))
        out[row] = kept
    return out


def top_k_excluding(scores: torch.Tensor, exclude, k: int) -> np.ndarray:
    """Top-``k`` item ids per row of ``scores`` (B x n_items), never padding (0) nor an item of ``exclude[row]``."""
    scores = scores.clone()
    scores[:, 0] = -torch.inf
    for row, items in enumerate(exclude):
        if len(items):
            scores[row, torch.as_tensor(np.asarray(items, dtype=np.int64), device=scores.device)] = -torch.inf
    return torch.topk(scores, k, dim=1).indices.cpu().numpy()


def score_top_k(model, histories, exclude, k: int, batch_size: int, desc: str, show_progress=True) -> np.ndarray:
    """Top-``k`` items after each history (left-truncated to the model's max length), minus ``exclude``."""
    out = np.zeros((len(histories), k), dtype=np.int64)
    for start, scores in batch_scores(model, histories, batch_size, desc, show_progress):
        out[start:start + len(scores)] = top_k_excluding(scores, exclude[start:start + batch_size], k)
    return out
