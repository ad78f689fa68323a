"""Users' chronological item sequences and their TRAINING PREFIXES: what LLMSeR's augmentation (CCG's helper
models, SNF, ARV) and TSLRec's stages learn from.

The training prefix of a user is the chronological sequence minus its validation and test items: the items of its
RecBole training rows (:func:`~recbole_llmser.data.dataset.train_lengths`: the last two items from 4 items on; a
3-item user has no validation item, so its prefix is ``s_1 s_2``). Nothing computed from it ever sees a validation
or test item.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recbole_llmser.data.dataset import leave_one_out_num, train_lengths
from recbole_llmser.errors import LLMSeRError


def user_sequences(inter_df: pd.DataFrame, uid_field: str, iid_field: str, time_field: str):
    """(user ids, list of item-id arrays) in chronological order; stable for equal timestamps."""
    df = inter_df[[uid_field, iid_field, time_field]]
    order = np.lexsort((np.arange(len(df)), df[time_field].to_numpy(), df[uid_field].to_numpy()))
    uid = df[uid_field].to_numpy()[order]
    iid = df[iid_field].to_numpy()[order]
    users, starts = np.unique(uid, return_index=True)
    return users, np.split(iid, starts[1:])


def training_prefixes(config, seqs) -> list:
    """Each sequence minus its validation and test items under the run's split (``eval_args``; leave-one-out
    only; see :func:`~recbole_llmser.data.dataset.train_lengths`)."""
    k = leave_one_out_num(config)
    if k is None:
        raise LLMSeRError(f"eval_args split {config['eval_args'].get('split')!r}: augmentation needs RecBole's "
                          "leave-one-out split ({LS: valid_and_test} or {LS: test_only}); set eval_args.split")
    return [s[:n] for s, n in zip(seqs, train_lengths([len(s) for s in seqs], k).tolist())]


def dataset_prefixes(config, dataset) -> tuple:
    """``(users, training prefixes)`` of ``dataset`` (our unbuilt SequentialDataset), users in id order."""
    users, seqs = user_sequences(dataset.inter_feat, dataset.uid_field, dataset.iid_field, dataset.time_field)
    return users, training_prefixes(config, seqs)
