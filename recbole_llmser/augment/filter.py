"""SNF — semantic noise filtering: which users are augmented, and which candidates become pseudo items.

The LLM (or the offline stand-in) returns candidate indices in order of likelihood; the first M become P_u.
P_u is PREPENDED to the user's sequence with the most likely item adjacent to the first real item, i.e. the
artifact stores ``pseudo_items`` in sequence order: ``reversed(top M)``. (CCG's reverse model proposes the item
*before* s1; the best guess for that position is the one right before s1.)
"""

from __future__ import annotations


def select_users(train_lengths: dict, max_len=None) -> list:
    """Users to augment: every user with at least one training item, or only those with ≤ ``max_len``."""
    return [u for u, n in train_lengths.items() if n >= 1 and (max_len is None or n <= max_len)]


def keep_pseudo_items(picked_indices, candidates, m: int) -> list:
    """The first ``m`` picked candidates (LLM order), in prepend (sequence) order."""
    top = [candidates[i] for i in picked_indices[:m]]
    return top[::-1]
