"""Dual-channel training (DCT, LLMSeR section "dual-channel training"): the pure maths and the loss adapters.

Objective, per user ``u`` with reliability weight ``w = w̃_u``::

    Σ_rows  w · ℓ(augmented row)  +  (1 − w) · ℓ(original row)

* The *original channel* of ``u`` is RecBole's prefix expansion of ``T_u`` (the user's training items in time
  order, t_0 .. t_{n-1}): one row per target ``t_j`` (j >= 1) with history ``T_u[:j]`` truncated from the left
  to ``MAX_ITEM_LIST_LENGTH`` (L) items.
* The *augmented channel* is the same expansion of ``P_u ⊕ T_u`` (the pseudo items p_1 .. p_M prepended). Its
  targets are every position >= 1 (``aug_targets: all``: the pseudo items p_2 .. p_M, then t_0 .. t_{n-1}) or
  only ``T_u`` (``aug_targets: real``: t_0 .. t_{n-1}; t_0's history is ``P_u``).
* An augmented row equal to its original row (same target, same truncated history: the pseudo items were
  truncated away, i.e. ``min(L, M + j) == min(L, j)``) is kept ONCE with weight 1 (flag ``SHARED``).
* Rows of weight 0 are dropped (``w = 0``: no augmented row; ``w = 1``: no original row except shared ones).
  Users without an augmentation record train on the original channel with weight 1.

A row is described by the sequence it is cut from (``seq``: 0 = original ``T_u``, 1 = augmented
``P_u ⊕ T_u``), its target position ``end`` in that sequence and its history start ``start = max(0, end - L)``.

Reductions (``dct_reduction``): ``sum`` = Σ w·ℓ over the batch; ``mean`` = Σ w·ℓ / Σ w (the default). RecBole's
models return the batch MEAN of their losses and every default (Adam lr 1e-3, ``clip_grad_norm``,
``weight_decay``) is tuned for that scale; ``mean`` keeps it (and equals RecBole's loss exactly when every
weight is 1), while ``sum`` grows the gradient with the batch size (x128 at the paper's batch size).

Loss paths (all return the reduced weighted loss of one batch):

* rows, causal or not, any model whose ``calculate_loss`` ends in ``self.loss_fct(...)`` with RecBole's
  ``CrossEntropyLoss`` / ``BPRLoss`` (SASRec, GRU4Rec, NARM, STAMP, Caser, ...): the model's own
  ``calculate_loss`` runs unchanged while ``loss_fct`` is swapped for a per-row weighted version
  (:func:`row_weighted_loss_fct`), checked to be called once with one value per row.
* rows, BERT4Rec (:func:`bert4rec_weighted_loss`): a BERT4Rec "row" is one training row's history with
  RecBole's random masks (``transform: mask_itemseq``); its loss is the sum of the masked-item losses over the
  row's masked positions, each weighted with the row's weight; ``mean`` divides by Σ over masked positions of
  their weights, which is exactly RecBole's position-mean when every weight is 1 (RecBole's convention that a
  mask index of 0 means "no mask" is kept).
* all positions, causal backbones in :data:`ALL_POSITION_MODELS` (:func:`all_positions_loss`): one forward
  over a whole window gives every prefix row's prediction (position ``k`` sees positions <= k only, RecBole pads
  on the right and SASRec's positions are absolute), so each window carries one target and one weight per
  position (:func:`windows_from_rows`). Exactly the rows' losses in eval mode; in training mode the positions of
  one window share one dropout draw (each row of the expansion draws its own), so each row's loss is still a
  draw of the same dropout-perturbed loss, only correlated with its window's other rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from recbole.utils import get_model as recbole_get_model  # not the registry's: it imports this module
from torch import nn

from recbole_llmser.errors import LLMSeRError
from recbole_llmser.methods import uses_llmser

#: Per-row weight (rows layout) and channel flag (rows: ORIGINAL / AUGMENTED / SHARED; windows: the sequence).
WEIGHT_FIELD = "dct_weight"
CHANNEL_FIELD = "dct_channel"
#: Windows layout: target item and weight of every input position (0 / 0.0 where the position trains nothing).
TARGET_LIST_FIELD = "dct_target_list"
WEIGHT_LIST_FIELD = "dct_weight_list"

ORIGINAL, AUGMENTED, SHARED = 0, 1, 2


# ----- rows and windows -----------------------------------------------------------------------------------
class Rows(NamedTuple):
    """Training rows, one entry per row, sorted by (user, seq, end)."""

    user: np.ndarray    # index into the per-user input arrays
    seq: np.ndarray     # 0: original sequence T_u, 1: augmented sequence P_u ⊕ T_u
    start: np.ndarray   # history = sequence[start:end]
    end: np.ndarray     # target = sequence[end]
    weight: np.ndarray  # float64 in (0, 1]
    flag: np.ndarray    # ORIGINAL, AUGMENTED or SHARED


class Windows(NamedTuple):
    """All-positions layout: window ``i`` feeds ``sequence[start:start+length]`` of (user, seq) and trains the
    rows ``row_window == i``; row ``r`` is predicted at input position ``row_slot[r] = end - start - 1``."""

    user: np.ndarray
    seq: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row_window: np.ndarray
    row_slot: np.ndarray


def _ranges(lo, hi):
    """(owner, value) for the integer ranges [lo_i, hi_i) laid end to end (empty where hi <= lo)."""
    lo, hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
    counts = np.clip(hi - lo, 0, None)
    owner = np.repeat(np.arange(len(lo)), counts)
    first = np.cumsum(counts) - counts
    return owner, np.arange(counts.sum()) - first[owner] + lo[owner]


def dual_channel_rows(n_train, n_pseudo, weight, max_len: int, aug_targets: str = "all") -> Rows:
    """The weighted training rows of both channels (module docstring), for many users at once.

    Args:
        n_train: ``|T_u|`` per user (0 or >= 2).
        n_pseudo: ``M_u = |P_u|`` per user (ignored where ``weight`` is NaN).
        weight: ``w̃_u`` in [0, 1] per user, NaN for a user without an augmentation record.
        max_len: ``MAX_ITEM_LIST_LENGTH``.
        aug_targets: ``all`` or ``real``.
    """
    if aug_targets not in ("all", "real"):
        raise ValueError(f"aug_targets must be 'all' or 'real', got {aug_targets!r}")
    n = np.asarray(n_train, np.int64)
    w = np.asarray(weight, np.float64)
    has = ~np.isnan(w)
    m = np.where(has, np.asarray(n_pseudo, np.int64), 0)
    L = int(max_len)

    u_o, end_o = _ranges(np.ones_like(n), n)
    shared_o = has[u_o] & (np.minimum(L, m[u_o] + end_o) == np.minimum(L, end_o))
    w_o = np.where(has[u_o] & ~shared_o, 1.0 - np.nan_to_num(w)[u_o], 1.0)
    flag_o = np.where(shared_o, SHARED, ORIGINAL)

    lo = np.ones_like(m) if aug_targets == "all" else np.maximum(m, 1)
    u_a, end_a = _ranges(lo, np.where(has & (n > 0), m + n, 0))
    j = end_a - m[u_a]  # position of the target in T_u (negative: a pseudo item)
    keep = ~((j >= 1) & (np.minimum(L, end_a) == np.minimum(L, j)))  # shared: already an original row
    u_a, end_a = u_a[keep], end_a[keep]

    user = np.concatenate([u_o, u_a])
    seq = np.concatenate([np.zeros_like(u_o), np.ones_like(u_a)])
    end = np.concatenate([end_o, end_a])
    wt = np.concatenate([w_o, w[u_a]])
    flag = np.concatenate([flag_o, np.full(len(u_a), AUGMENTED)])
    order = np.lexsort((end, seq, user))
    order = order[wt[order] > 0]
    return Rows(user[order], seq[order], np.maximum(end[order] - L, 0), end[order], wt[order], flag[order])


def windows_from_rows(rows: Rows, max_len: int) -> Windows:
    """Group rows for the all-positions path: the untruncated rows (start 0) of one (user, seq) share one window
    (input = the sequence's first ``max end`` items); every truncated row (start > 0) keeps its own window."""
    prefix = rows.start == 0
    keys, inverse = np.unique(rows.user[prefix] * 2 + rows.seq[prefix], return_inverse=True)
    n_prefix = len(keys)
    row_window = np.empty(len(rows.user), np.int64)
    row_window[prefix] = inverse.reshape(-1)
    row_window[~prefix] = n_prefix + np.arange((~prefix).sum())
    length = np.zeros(n_prefix + (~prefix).sum(), np.int64)
    np.maximum.at(length, row_window, rows.end - rows.start)
    if length.max(initial=0) > max_len:
        raise ValueError("a row's history is longer than max_len")
    return Windows(
        user=np.concatenate([keys // 2, rows.user[~prefix]]),
        seq=np.concatenate([keys % 2, rows.seq[~prefix]]),
        start=np.concatenate([np.zeros(n_prefix, np.int64), rows.start[~prefix]]),
        length=length,
        row_window=row_window,
        row_slot=rows.end - rows.start - 1,
    )


def eval_pseudo_users(n_pseudo, weight_by_user, min_weight: float) -> np.ndarray:
    """Mask of the users whose validation/test inputs get their pseudo items (``aug_at_eval``): users with pseudo
    items whose DCT weight ``w̃_u`` is at least ``aug_eval_min_weight`` (0: every user with pseudo items, the
    paper). NaN weights (no record) never pass."""
    weight = np.asarray(weight_by_user, np.float64)
    with np.errstate(invalid="ignore"):
        return (np.asarray(n_pseudo) > 0) & (weight >= float(min_weight))


def sample_channels(weight_by_user, seed: int, epoch: int) -> np.ndarray:
    """``dct_mode: sample``: per user, True (train the augmented channel this epoch) with probability ``w̃_u``
    (NaN counts as 0). The same (seed, epoch) gives the same draw in every process."""
    rng = np.random.default_rng([int(seed) % 2**32, int(epoch), 0xDC7])
    return rng.random(len(weight_by_user)) < np.nan_to_num(np.asarray(weight_by_user, np.float64))


def sampled_rows(user, flag, augmented_users) -> np.ndarray:
    """Mask of the rows trained this epoch: shared rows always; a user's augmented rows when the user drew the
    augmented channel, the original rows otherwise."""
    chosen = np.asarray(augmented_users)[user]
    return (flag == SHARED) | ((flag == AUGMENTED) & chosen) | ((flag == ORIGINAL) & ~chosen)


# ----- losses ---------------------------------------------------------------------------------------------
#: Set while a trainer of a multi-process run trains (:func:`across_processes`).
_ACROSS_PROCESSES = ContextVar("dct_across_processes", default=False)


@contextmanager
def across_processes(on: bool):
    """Within the block (``on``), :func:`weighted_reduce` reduces over the global batch of all processes."""
    token = _ACROSS_PROCESSES.set(bool(on))
    try:
        yield
    finally:
        _ACROSS_PROCESSES.reset(token)


def weighted_reduce(loss: torch.Tensor, weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """``sum``: Σ w·ℓ; ``mean``: Σ w·ℓ / Σ w (0 when Σ w = 0).

    Inside :func:`across_processes` the sums run over the global batch: with N processes whose gradients DDP
    averages, each returns N·Σ_local w·ℓ (``sum``) or N·Σ_local w·ℓ / Σ_global w (``mean``), so the averaged
    gradient is the one process's gradient of the same reduction over all N processes' rows."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"dct_reduction must be 'mean' or 'sum', got {reduction!r}")
    total = (loss * weight).sum()
    denominator, n = weight.sum(), 1
    if _ACROSS_PROCESSES.get():
        from recbole_llmser.distributed import global_weight_sum

        denominator, n = global_weight_sum(denominator)
    if reduction == "sum":
        return total * n
    return total * n / denominator.clamp_min(torch.finfo(weight.dtype).tiny)


def _is_bpr(loss_fct) -> bool:
    from recbole.model.loss import BPRLoss

    return isinstance(loss_fct, BPRLoss)


def supports_per_row_loss(loss_fct) -> bool:
    """Whether :func:`per_row_loss` knows ``loss_fct`` (RecBole's CE without class weights, or ``BPRLoss``)."""
    ce = isinstance(loss_fct, nn.CrossEntropyLoss) and loss_fct.weight is None
    return ce or _is_bpr(loss_fct)


def per_row_loss(loss_fct, *args) -> torch.Tensor:
    """The unreduced loss of ``loss_fct(*args)``: ``(logits [N, C], target [N])`` for CE,
    ``(pos_score [N], neg_score [N])`` for BPR. Returns [N]."""
    if _is_bpr(loss_fct):
        pos, neg = args
        return -torch.log(loss_fct.gamma + torch.sigmoid(pos - neg))
    logits, target = args
    return F.cross_entropy(logits, target, ignore_index=loss_fct.ignore_index, reduction="none",
                           label_smoothing=loss_fct.label_smoothing)


class _RowWeightedLoss(nn.Module):
    """Stands in for ``model.loss_fct`` during one ``calculate_loss`` call."""

    def __init__(self, base, weight, reduction, model_name):
        super().__init__()
        self.base, self.weight, self.reduction, self.model_name = base, weight, reduction, model_name
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        loss = per_row_loss(self.base, *args)
        if loss.shape != self.weight.shape:
            raise LLMSeRError(
                f"dct_mode: exact: {self.model_name}.calculate_loss passes {tuple(loss.shape)} losses to loss_fct "
                f"for a batch of {self.weight.shape[0]} rows, so per-row weights cannot apply; use dct_mode: sample"
            )
        return weighted_reduce(loss, self.weight.to(loss.dtype), self.reduction)


@contextmanager
def row_weighted_loss_fct(model, weight: torch.Tensor, reduction: str):
    """Within the block, ``model.calculate_loss`` returns the weighted reduction of its per-row losses.

    Raises a one-line error afterwards unless ``loss_fct`` was called exactly once (with one value per row)."""
    base = model.loss_fct
    probe = _RowWeightedLoss(base, weight, reduction, type(model).__name__)
    model.loss_fct = probe
    try:
        yield probe
    finally:
        model.loss_fct = base
    if probe.calls != 1:
        raise LLMSeRError(
            f"dct_mode: exact: {type(model).__name__}.calculate_loss called loss_fct {probe.calls} times per batch "
            "(expected once), so per-row weights cannot apply; use dct_mode: sample"
        )


def is_bert4rec(model) -> bool:
    from recbole.model.sequential_recommender import BERT4Rec

    return isinstance(model, BERT4Rec) and type(model).calculate_loss is BERT4Rec.calculate_loss


def bert4rec_weighted_loss(model, interaction, weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """BERT4Rec's masked-item loss with a weight per row (module docstring); the maths of
    ``BERT4Rec.calculate_loss`` with the row weights applied to each masked position.

    Only the masked positions of rows with a weight > 0 are scored: RecBole pads every row to
    ``mask_ratio × MAX_ITEM_LIST_LENGTH`` mask slots and scores each slot against every item, though on short
    sequences most slots are padding (about 9 in 10 on amazon-beauty), which zero-weighted them anyway. With every
    weight 1 and ``mean`` this is RecBole's loss (the plain trainer uses it too, see ``SequentialTrainer``)."""
    masked_seq = interaction[model.MASK_ITEM_SEQ]
    masked_index = interaction[model.MASK_INDEX]            # [B, mask_len], 0 = no mask (RecBole's convention)
    pos_items = interaction[model.POS_ITEMS]
    hidden = model.forward(masked_seq)                      # [B, L, H]
    position_weight = (masked_index > 0).to(hidden.dtype) * weight.to(hidden.dtype).unsqueeze(1)
    rows, slots = position_weight.nonzero(as_tuple=True)    # the P positions that count
    hidden = hidden[rows, masked_index[rows, slots]]        # [P, H]
    targets = pos_items[rows, slots]
    if model.loss_type == "BPR":
        negatives = interaction[model.NEG_ITEMS][rows, slots]
        pos = (hidden * model.item_embedding(targets)).sum(-1) + model.output_bias[targets]
        neg = (hidden * model.item_embedding(negatives)).sum(-1) + model.output_bias[negatives]
        loss = -torch.log(1e-14 + torch.sigmoid(pos - neg))
    else:
        logits = hidden @ model.item_embedding.weight[: model.n_items].T + model.output_bias
        loss = F.cross_entropy(logits, targets, reduction="none")
    return weighted_reduce(loss, position_weight[rows, slots], reduction)


# ----- all positions --------------------------------------------------------------------------------------
#: Causal backbones whose ``forward(item_seq, item_seq_len)`` computes a [B, L, H] output in which position k
#: depends on positions <= k only, and ends with ``self.gather_indexes(output, item_seq_len - 1)``; items are
#: scored against ``item_embedding`` (dot product). Matched by exact class (a subclass may change forward).
ALL_POSITION_MODELS = ("SASRec", "GRU4Rec")


def has_all_positions_adapter(model_or_class) -> bool:
    from recbole.model import sequential_recommender

    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    return any(cls is getattr(sequential_recommender, name) for name in ALL_POSITION_MODELS)


def _keep_all_positions(output, gather_index):
    return output


@contextmanager
def all_positions(model):
    """Within the block, ``model.forward(item_seq, item_seq_len)`` returns every position's output [B, L, H]
    (its final ``gather_indexes`` is made the identity); nothing else of the model changes."""
    if not has_all_positions_adapter(model):
        have = ", ".join(ALL_POSITION_MODELS)
        raise LLMSeRError(f"{type(model).__name__} has no all-positions adapter (have: {have})")
    model.gather_indexes = _keep_all_positions
    try:
        yield model
    finally:
        del model.gather_indexes


def all_positions_loss(model, interaction, reduction: str, negatives=None) -> torch.Tensor:
    """Weighted loss of every trained position of a batch of windows.

    ``negatives(users, items)`` (BPR only) returns one negative item per trained position."""
    with all_positions(model):
        hidden = model.forward(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
    weight = interaction[WEIGHT_LIST_FIELD]
    active = weight > 0
    hidden, target, weight = hidden[active], interaction[TARGET_LIST_FIELD][active], weight[active]
    items = model.item_embedding
    if model.loss_type == "BPR":
        users = interaction[model.USER_ID].unsqueeze(1).expand_as(active)[active]
        neg = negatives(users, target).to(target.device)
        loss = per_row_loss(model.loss_fct, (hidden * items(target)).sum(-1), (hidden * items(neg)).sum(-1))
    else:
        loss = per_row_loss(model.loss_fct, hidden @ items.weight.T, target)
    return weighted_reduce(loss, weight.to(loss.dtype), reduction)


# ----- configuration --------------------------------------------------------------------------------------
def model_has_adapter(config) -> bool:
    """Whether the config's model (a name the Config checked) has an all-positions adapter."""
    return has_all_positions_adapter(recbole_get_model(config["model"]))


def dct_enabled(config) -> bool:
    """Whether training goes through ``AugmentedSequentialDataset`` + ``DualChannelTrainer``: LLMSeR with an
    artifact, or plain training with ``train_all_positions: true`` on a model with an all-positions adapter."""
    if uses_llmser(config):
        return bool(config["aug_file"])
    return bool(config["train_all_positions"]) and model_has_adapter(config)


def uses_all_positions(config) -> bool:
    """Whether DCT lays its training rows out as all-positions windows (else as RecBole-style rows)."""
    if not model_has_adapter(config):
        return False
    if uses_llmser(config):
        return config["dct_mode"] == "exact" and config["dct_all_positions"] == "auto"
    return bool(config["train_all_positions"])
