"""Dataset classes. ``SequentialDataset`` remembers, per user, what the evaluation needs from the raw
interactions before RecBole expands them into prefix rows (after which the first item of each sequence is
no longer a row's target and per-user counts are off by one)."""

from __future__ import annotations

import numpy as np
from recbole.data.dataset import SequentialDataset as _RecBoleSequentialDataset


def per_user_items(uid: np.ndarray, iid: np.ndarray, n_users: int):
    """Sorted unique item ids of each user id 0..n_users-1."""
    order = np.lexsort((iid, uid))
    uid, iid = uid[order], iid[order]
    bounds = np.searchsorted(uid, np.arange(n_users + 1))
    return [np.unique(iid[bounds[u]:bounds[u + 1]]) for u in range(n_users)]


class SequentialDataset(_RecBoleSequentialDataset):
    """RecBole's ``SequentialDataset`` plus two per-user arrays taken from the raw interactions:

    * ``user_train_len[u]``: training items of user ``u`` (interactions minus validation and test, >= 0);
    * ``user_items[u]``: every item user ``u`` interacted with, in any split (for sampled negatives).
    """

    def __init__(self, config):
        super().__init__(config)
        uid = self.inter_feat[self.uid_field].to_numpy()
        iid = self.inter_feat[self.iid_field].to_numpy()
        self.user_train_len = np.maximum(np.bincount(uid, minlength=self.user_num) - 2, 0)
        self.user_items = per_user_items(uid, iid, self.user_num)
