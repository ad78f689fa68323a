"""ARV — augmentation reliability verification: the maths, as small pure functions.

For a user u with training items S_u (validation and test excluded) the pipeline masks the LAST training item
m_u, lets the forward helper model propose 10 candidates after ``P_u ⊕ S_u[:-1]``, and asks the LLM (or the
offline stand-in) to pick one, m̂_u. Then

* w_u  = 1 if m̂_u = m_u, else sim(text(m̂_u), text(m_u)) clipped to [0, 1]          (:func:`reliability`)
* w̃_u = β · w_u  if |P_u ⊕ S_u| > T + M, else w_u                                     (:func:`decayed_weight`)

Users with a single training item have nothing to mask: they get the mean w_u of the users that could be
verified (:func:`fill_unverifiable`), and their record says so (``arv_status: "mean"``).
"""

from __future__ import annotations

import numpy as np


def reliability(predicted: int, masked: int, similarity: float) -> float:
    """w_u: 1 for the exact item, else the similarity of the two items clipped to [0, 1]."""
    if predicted == masked:
        return 1.0
    return float(min(1.0, max(0.0, similarity)))


def decayed_weight(w: float, n_pseudo: int, n_train: int, threshold: int, n_pseudo_max: int, beta: float) -> float:
    """w̃_u = β·w_u when |P_u ⊕ S_u| = n_pseudo + n_train exceeds T + M (long users lean on real data), else w_u."""
    return float(beta * w) if n_pseudo + n_train > threshold + n_pseudo_max else float(w)


def fill_unverifiable(weights: dict, verifiable: set, default: float = 1.0) -> tuple:
    """Give every user not in ``verifiable`` the mean w of the verifiable ones (``default`` if there are none).

    Returns (new weights dict, the fill value)."""
    known = [w for u, w in weights.items() if u in verifiable]
    fill = float(np.mean(known)) if known else float(default)
    return {u: (w if u in verifiable else fill) for u, w in weights.items()}, fill
