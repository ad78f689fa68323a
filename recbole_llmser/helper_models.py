"""The helper sequential models that LLMSeR's CCG and ARV and TSLRec's stage 1 share, trained on the users'
TRAINING PREFIXES only (:mod:`recbole_llmser.sequences`).

* The *reverse* helper is any RecBole sequential model (``ccg_model``, default SASRec) trained on the reversed
  training prefixes: CCG (``augment/ccg.py``) asks it for the items before a user's first one.
* The *forward* helper (same class and settings) is trained on the forward training prefixes: ARV
  (``augment/arv.py``) asks it for the item after ``P_u ⊕ history-before-m_u``, the text-free backend ranks SNF's
  candidates with it, and TSLRec's stage 1 clusters its item embeddings.

Helper models are trained on every prefix row of the helper sequences (no hold-out: the rows predicting the
earliest items are exactly what CCG needs) for a fixed ``ccg_epochs``: SASRec/GRU4Rec through the all-positions
path of ``DualChannelTrainer`` (same objective, one forward per sequence; ``dct_all_positions: off`` turns it off),
other models with our ``SequentialTrainer`` on RecBole's own rows. Each is saved under an explicit name that encodes
a hash of everything it depends on (:func:`helper_fingerprint`), and reused when that hash is unchanged. Once
trained, its file's sha256 is recorded in ``<models>/../model_digests/`` (``<name>.sha256``); a checkpoint whose
sha256 is not the recorded one (not written by this package, changed since, or written by a version that recorded
none) is never unpickled: the helper is trained again (a warning says so), since a helper is a cache that this
package can always rebuild.
"""

from __future__ import annotations

import copy
import os
from logging import getLogger
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from recbole.data.interaction import Interaction

from recbole_llmser.compat import load_checkpoint
from recbole_llmser.progress import progress
from recbole_llmser.registry import get_model
from recbole_llmser.schema import HELPER_KEYS
from recbole_llmser.utils import content_hash, digest_problem, record_digest


def helper_config(config, direction: str):
    """Config of the ``reverse`` or ``forward`` helper model: ``ccg_*`` settings over the main data settings."""
    from recbole_llmser.config import Config

    settings = {k: config[k] for k in HELPER_KEYS if config[k] is not None}
    settings.update(
        epochs=int(config["ccg_epochs"]),
        train_batch_size=int(config["ccg_batch_size"] or config["train_batch_size"]),
        MAX_ITEM_LIST_LENGTH=int(config["ccg_max_len"] or config["MAX_ITEM_LIST_LENGTH"]),
        method="none",
        eval_step=int(config["ccg_epochs"]) + 1,  # no validation: fixed epochs
        train_all_positions=config["dct_all_positions"] == "auto",  # SASRec/GRU4Rec: one forward per sequence
    )
    settings.update(config["ccg_model_args"] or {})
    helper = Config(config["ccg_model"], config["dataset"], config_dict=settings, cmd_args=[])
    helper["ccg_direction"] = direction
    return helper


def helper_fingerprint(helper, sequences) -> str:
    """Hash of the helper's settings and its exact training sequences (so a change retrains)."""
    skip = {"checkpoint_dir", "show_progress", "state", "device", "run_name"}  # where and how it logs, not what
    settings = {k: str(v) for k, v in helper.final_config_dict.items() if k not in skip}
    return content_hash(settings, sequences)[:16]


def _helper_dataset(dataset, helper, sequences, users):
    """A copy of the (unbuilt) main dataset whose interactions are ``sequences`` (same id remapping)."""
    lengths = np.fromiter((len(seq) for seq in sequences), dtype=np.int64, count=len(sequences))
    starts = np.cumsum(lengths) - lengths  # one row per (user, position), built with numpy: no per-item tuples
    df = pd.DataFrame({
        dataset.uid_field: np.repeat(np.asarray(users, dtype=np.int64), lengths),
        dataset.iid_field: np.concatenate([np.asarray(seq, dtype=np.int64) for seq in sequences]
                                          + [np.empty(0, np.int64)]),
        dataset.time_field: (np.arange(int(lengths.sum())) - np.repeat(starts, lengths)).astype(np.float32),
    })
    ds = dataset.copy(df)
    # RecBole's sequential presets write into these dicts; the copy must not change the main dataset's.
    ds.field2type, ds.field2source, ds.field2seqlen = (
        copy.copy(dataset.field2type), copy.copy(dataset.field2source), copy.copy(dataset.field2seqlen)
    )
    ds.config = helper
    ds.max_item_list_len = helper["MAX_ITEM_LIST_LENGTH"]
    ds._change_feat_format()  # -> Interaction + one row per prefix (RecBole's data_augmentation)
    return ds


def train_helper(config, dataset, users, sequences, direction: str, out_dir: Path):
    """Train (or reuse) the ``direction`` helper model on ``sequences``; returns the model in eval mode."""
    from recbole.data.utils import get_dataloader
    from recbole.sampler import Sampler
    from recbole.utils import init_seed

    from recbole_llmser.dct import uses_all_positions
    from recbole_llmser.trainer import DualChannelTrainer, SequentialTrainer

    logger = getLogger()
    helper = helper_config(config, direction)
    keep = [i for i, s in enumerate(sequences) if len(s) >= 2]  # a 1-item sequence has no prefix row
    users, sequences = [users[i] for i in keep], [sequences[i] for i in keep]
    path = Path(out_dir) / f"ccg-{direction}-{helper['model']}-{helper_fingerprint(helper, sequences)}.pth"
    digests = helper_digest_dir(out_dir)
    helper["checkpoint_dir"] = str(out_dir)

    init_seed(helper["seed"], helper["reproducibility"])
    ds = _helper_dataset(dataset, helper, sequences, users)
    model = get_model(helper["model"])(helper, ds).to(helper["device"])
    problem = digest_problem(path, digests) if path.is_file() else None
    if problem:
        logger.warning(f"CCG: {path} was not written by recbole_llmser (or changed since: {problem}); training the "
                       f"{direction} helper again instead of loading it")
    if path.is_file() and not problem:
        model.load_state_dict(load_checkpoint(path, map_location=helper["device"], digest_dir=digests)["state_dict"])
        logger.info(f"CCG: reusing the {direction} helper model {path}")
    else:
        sampler = None
        if helper["train_neg_sample_args"]["distribution"] != "none":
            sampler = Sampler(["train"], [ds], helper["train_neg_sample_args"]["distribution"]).set_phase("train")
        windows = uses_all_positions(helper)
        n_rows = len(ds)
        if windows:
            ds.use_all_prefix_windows()
        train_data = get_dataloader(helper, "train")(helper, ds, sampler, shuffle=True)
        logger.info(f"CCG: training the {direction} helper {helper['model']} on {n_rows} prefix rows "
                    f"of {len(sequences)} training prefixes for {helper['epochs']} epochs"
                    + (" (all-positions path)" if windows else ""))
        trainer = (DualChannelTrainer if windows else SequentialTrainer)(helper, model)
        # without validation RecBole saves after every epoch: save under a temp name and rename once training is
        # over, so a run stopped mid-training never leaves a part-trained helper under the name that is reused
        partial = path.with_name(f".{path.name}.partial")
        trainer.saved_model_file = str(partial)
        trainer.record_digest = False  # RecBole's plain saves of the partial file; its digest once it is complete
        trainer.fit(train_data, None, saved=True, show_progress=helper["show_progress"])
        os.replace(partial, path)
        record_digest(path, digests)
        logger.info(f"CCG: saved the {direction} helper model to {path}")
    model.eval()
    return model


def helper_digest_dir(out_dir) -> Path:
    """Folder of the helper checkpoints' recorded sha256 files (beside ``out_dir``, which holds only checkpoints)."""
    return Path(out_dir).parent / "model_digests"


# ----- scoring every item after histories ---------------------------------------------------------------
def to_interaction(histories, max_len: int, item_seq_field: str, item_len_field: str) -> Interaction:
    """Right-padded, left-truncated item sequences as a RecBole ``Interaction`` (what ``full_sort_predict`` reads)."""
    seq = np.zeros((len(histories), max_len), dtype=np.int64)
    lengths = np.zeros(len(histories), dtype=np.int64)
    for row, h in enumerate(histories):
        h = np.asarray(h[-max_len:], dtype=np.int64)
        seq[row, : len(h)] = h
        lengths[row] = len(h)
    return Interaction({item_seq_field: torch.from_numpy(seq), item_len_field: torch.from_numpy(lengths)})


@torch.no_grad()
def batch_scores(model, histories, batch_size: int, desc: str = "", show_progress: bool = False):
    """Yield ``(start, scores)`` per batch: the model's scores of every item after each history
    (left-truncated to the model's max length), ``scores`` of shape (batch, n_items)."""
    device = next(model.parameters()).device
    starts = range(0, len(histories), batch_size)
    for start in progress(starts, desc or "scoring", show_progress, unit="batches", min_total=2):
        batch = histories[start:start + batch_size]
        inter = to_interaction(batch, model.max_seq_length, model.ITEM_SEQ, model.ITEM_SEQ_LEN).to(device)
        yield start, model.full_sort_predict(inter).view(len(batch), -1)
