"""SNF — semantic noise filtering: which users are augmented, and which candidates become pseudo items.

The LLM (or the offline stand-in) returns candidate indices in order of likelihood; the first M become P_u.
P_u is PREPENDED to the user's sequence with the most likely item adjacent to the first real item, i.e. the
artifact stores ``pseudo_items`` in sequence order: ``reversed(top M)``. (CCG's reverse model proposes the item
*before* s1; the best guess for that position is the one right before s1.)
"""

from __future__ import annotations

import numpy as np


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
