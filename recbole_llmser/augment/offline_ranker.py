"""The offline stand-in for the LLM in SNF and ARV, used when no LLM endpoint is configured (``backend: offline``):
candidates ranked by the similarity of their text vectors to the user's history.
"""

from __future__ import annotations

import numpy as np

from recbole_llmser.augment.semantic import setting
from recbole_llmser.augment.similarity import l2_normalize
from recbole_llmser.errors import LLMSeRError


class OfflineRanker:
    """Offline stand-in for the LLM in SNF and ARV (callers label its output ``backend: offline``).

    The user's taste is the recency-weighted mean of their history item vectors: the item at distance ``d`` from
    the most recent one (``d = 0`` for the last) weighs ``decay ** d``, so with the default 0.8 the fifth-last item
    counts 0.41 and the tenth-last 0.13. Candidates are ordered by cosine similarity to that profile; scores are
    rounded to 1e-6 so float noise cannot flip near-ties, and ties keep the candidates' given order (the CCG
    order). With no usable history (empty, or all-zero vectors) the given order is returned unchanged.
    """

    name = "offline"

    def __init__(self, decay: float = 0.8):
        decay = float(decay)
        if not 0.0 < decay <= 1.0:
            raise LLMSeRError(f"property 'offline_ranker_decay' = {decay!r}: expected a number in (0, 1]")
        self.decay = decay

    @classmethod
    def from_config(cls, config) -> "OfflineRanker":
        return cls(decay=setting(config, "offline_ranker_decay"))

    def describe(self) -> dict:
        return {"backend": self.name, "method": "cosine to the recency-weighted mean of the history embeddings",
                "decay": self.decay}

    def profile(self, history_vecs) -> np.ndarray | None:
        """Unit-norm recency-weighted mean of the history rows (oldest first), or None without usable history."""
        h = np.asarray(history_vecs, dtype=np.float32)
        if h.ndim != 2 or h.shape[0] == 0:
            return None
        weights = self.decay ** np.arange(h.shape[0] - 1, -1, -1, dtype=np.float64)
        mean = (weights[:, None] * l2_normalize(h).astype(np.float64)).sum(axis=0)
        norm = np.linalg.norm(mean)
        return (mean / norm).astype(np.float32) if norm > 0 else None

    def scores(self, history_vecs, candidate_vecs) -> np.ndarray:
        """Cosine of each candidate to the history profile (0 for all without usable history)."""
        c = np.asarray(candidate_vecs, dtype=np.float32)
        n = c.shape[0] if c.ndim == 2 else 0
        prof = self.profile(history_vecs)
        if prof is None or n == 0:
            return np.zeros(n, dtype=np.float64)
        if c.shape[1] != prof.shape[0]:
            raise ValueError(f"history vectors have {prof.shape[0]} dims, candidates {c.shape[1]}")
        return np.round(l2_normalize(c).astype(np.float64) @ prof.astype(np.float64), 6)

    def rank(self, history_vecs, candidate_vecs, k: int) -> list[int]:
        """Top ``k`` candidate indices (0-based), best first; ``k`` larger than the candidates gives all."""
        s = self.scores(history_vecs, candidate_vecs)
        order = np.argsort(-s, kind="stable")
        return [int(i) for i in order[: max(0, int(k))]]

    def pick(self, history_vecs, candidate_vecs) -> int:
        """The single best candidate index (top-1 of :meth:`rank`)."""
        top = self.rank(history_vecs, candidate_vecs, 1)
        if not top:
            raise ValueError("OfflineRanker.pick: no candidates")
        return top[0]
