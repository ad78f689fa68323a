"""Text-vector maths shared by the semantic backends, the embedding cache, title matching, ARV's reliability
score ``w_u = sim(text(m̂_u), text(m_u))`` and the offline ranker: plain texts, unit vectors, clipped cosines.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Iterable, Sequence

import numpy as np


def clean_texts(texts: Iterable) -> list[str]:
    """Texts as plain strings: None and NaN become ``""``, everything else ``str()``; no other change."""
    out = []
    for t in texts:
        if t is None or (isinstance(t, float) and math.isnan(t)):
            out.append("")
        else:
            out.append(t if isinstance(t, str) else str(t))
    return out


def texts_sha256(texts: Sequence) -> str:
    """sha256 of the text list (order and boundaries included)."""
    blob = json.dumps(clean_texts(texts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def l2_normalize(x) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        n = float(np.linalg.norm(x))
        return x / n if n > 0 and np.isfinite(n) else np.zeros_like(x)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    norms = np.where((norms > 0) & np.isfinite(norms), norms, np.inf)  # x / inf = 0 for zero rows
    return (x / norms).astype(np.float32, copy=False)


def cosine01(a, b):
    """Cosine similarity clipped to [0, 1] (negative similarity counts as none). Vectors are renormalized, a zero
    vector gives 0. 1-D inputs give a float, 2-D inputs one value per row pair."""
    a, b = l2_normalize(a), l2_normalize(b)
    sim = np.clip(np.sum(a * b, axis=-1), 0.0, 1.0)
    return float(sim) if np.ndim(sim) == 0 else sim


def similarity_matrix(query_vecs, cand_vecs) -> np.ndarray:
    """``(n_query, n_cand)`` cosine similarities clipped to [0, 1]."""
    q = l2_normalize(np.atleast_2d(np.asarray(query_vecs, dtype=np.float32)))
    c = l2_normalize(np.atleast_2d(np.asarray(cand_vecs, dtype=np.float32)))
    if q.shape[0] == 0 or c.shape[0] == 0 or q.shape[1] == 0:
        return np.zeros((q.shape[0], c.shape[0] if c.shape[1] else 0), dtype=np.float32)
    return np.clip(q @ c.T, 0.0, 1.0)


def nearest(query_vecs, cand_vecs, threshold: float) -> list[int | None]:
    """Per query row, the index of the most similar candidate row (the first on ties), or None when its
    similarity is below ``threshold`` or there are no candidates."""
    sims = similarity_matrix(query_vecs, cand_vecs)
    if sims.shape[1] == 0:
        return [None] * sims.shape[0]
    best = sims.argmax(axis=1)
    return [int(j) if sims[i, j] >= threshold else None for i, j in enumerate(best)]
