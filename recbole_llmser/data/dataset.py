"""Dataset classes. ``SequentialDataset`` remembers, per user, what the evaluation needs from the raw
interactions before RecBole expands them into prefix rows (after which the first item of each sequence is
no longer a row's target and per-user counts are off by one)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset as _RecBoleSequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils import FeatureSource, FeatureType

from recbole_llmser.dct import (
    AUGMENTED,
    CHANNEL_FIELD,
    ORIGINAL,
    SHARED,
    TARGET_LIST_FIELD,
    WEIGHT_FIELD,
    WEIGHT_LIST_FIELD,
    dual_channel_rows,
    eval_pseudo_users,
    uses_all_positions,
    windows_from_rows,
)
from recbole_llmser import compat  # noqa: F401  (RecBole fixes before RecBole's dataset code runs)
from recbole_llmser.data.atomic import FILE_ORDER_FIELD
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.methods import uses_llmser


def leave_one_out_num(config):
    """Items RecBole's ``LS`` split holds out per user at the end of the sequence: 2 (``valid_and_test``),
    1 (``test_only``); None for other splits."""
    split = (config["eval_args"] or {}).get("split") or {}
    return {"valid_and_test": 2, "test_only": 1}.get(split.get("LS")) if isinstance(split, dict) else None


def train_lengths(n_items, leave_one_num: int = 2) -> np.ndarray:
    """Training items per user (``T_u``: its training rows' histories and targets) under RecBole's leave-one-out
    split of a sequence of ``n_items`` interactions. RecBole expands a sequence into ``n - 1`` prefix rows and holds
    out ``min(leave_one_num, rows - 1)`` of them, so a user with 3 items has no validation row and 2 training
    items (``s_1 -> s_2``), one with 2 items only a training row; from 4 items on it is ``n - 2``."""
    n = np.asarray(n_items, dtype=np.int64)
    return np.where(n >= 2, n - np.minimum(leave_one_num, np.maximum(n - 2, 0)), 0)


def per_user_items(uid: np.ndarray, iid: np.ndarray, n_users: int):
    """Sorted unique item ids of each user id 0..n_users-1."""
    order = np.lexsort((iid, uid))
    uid, iid = uid[order], iid[order]
    bounds = np.searchsorted(uid, np.arange(n_users + 1))
    return [np.unique(iid[bounds[u]:bounds[u + 1]]) for u in range(n_users)]


def cap_token_seqs(values, token_max: int, text_max: int):
    """``(values, n_cut)``: each array of tokens with every token cut to ``token_max`` characters and only the
    tokens whose running length (tokens plus one space between them) stays within ``text_max`` (at least one)."""
    out, cut = [], 0
    for tokens in values:
        capped, used = [], -1
        for token in tokens:
            token = token[:token_max]
            used += len(token) + 1
            if capped and used > text_max:
                break
            capped.append(token)
        changed = len(capped) != len(tokens) or any(len(t) > token_max for t in tokens)
        cut += changed
        out.append(np.array(capped) if changed else tokens)
    return out, cut


class SequentialDataset(_RecBoleSequentialDataset):
    """RecBole's ``SequentialDataset`` plus two per-user arrays taken from the raw interactions:

    * ``user_train_len[u]``: training items of user ``u`` (its interactions minus its validation and test items,
      :func:`train_lengths`; a user with 3 interactions has no validation item under ``LS``);
    * ``user_items[u]``: every item user ``u`` interacted with, in any split (for sampled negatives).
    """

    def __init__(self, config):
        super().__init__(config)
        uid = self.inter_feat[self.uid_field].to_numpy()
        iid = self.inter_feat[self.iid_field].to_numpy()
        counts = np.bincount(uid, minlength=self.user_num)
        self.user_train_len = train_lengths(counts, leave_one_out_num(config) or 2)
        self.user_items = per_user_items(uid, iid, self.user_num)
        single = int(np.count_nonzero(counts[1:] == 1))
        if single:
            self.logger.warning(f"dataset '{self.dataset_name}': {single} users have a single interaction: no "
                                "sequence to learn from or to evaluate, they are left out")

    def build(self):
        """RecBole's split, then a warning per evaluation split whose rows largely repeat a few (history, target)
        pairs (:func:`~recbole_llmser.evaluation.shared_rows`; kept in ``self.shared_rows``: per split its number
        of rows and the pairs, in item tokens)."""
        from recbole_llmser.evaluation import shared_rows, shared_rows_line

        datasets = super().build()
        self.shared_rows = {}
        if len(datasets) == 3:
            tokens = self.field2id_token[self.iid_field]
            for name, part in (("valid", datasets[1]), ("test", datasets[2])):
                inter = part.inter_feat
                found = shared_rows(inter[self.item_id_list_field].numpy(), inter[self.item_list_length_field].numpy(),
                                    inter[self.iid_field].numpy())
                pairs = [{**s, "history": [str(tokens[i]) for i in s["history"]], "target": str(tokens[s["target"]])}
                         for s in found]
                self.shared_rows[name] = {"n_rows": len(inter), "pairs": pairs}
                if pairs:
                    self.logger.warning(f"dataset '{self.dataset_name}' " + shared_rows_line(
                        "validation" if name == "valid" else name, pairs, len(inter)))
        return datasets

    def _load_inter_feat(self, token, dataset_path):
        super()._load_inter_feat(token, dataset_path)
        if self.time_field == FILE_ORDER_FIELD and self.inter_feat is not None \
                and FILE_ORDER_FIELD not in self.inter_feat:
            # no time column (recbole_llmser.data.atomic): each interaction's position in the file orders it
            self.inter_feat[FILE_ORDER_FIELD] = np.arange(len(self.inter_feat), dtype=np.float64)
            self.field2type[FILE_ORDER_FIELD] = FeatureType.FLOAT
            self.field2source[FILE_ORDER_FIELD] = FeatureSource.INTERACTION
            self.field2seqlen[FILE_ORDER_FIELD] = 1

    def _filter_inter_by_user_or_item(self):
        before = len(self.inter_feat)
        super()._filter_inter_by_user_or_item()
        dropped = before - len(self.inter_feat)
        if dropped:
            self.logger.warning(
                f"dataset '{self.dataset_name}': {dropped} interactions name a user or item missing from the .user / "
                ".item file and were dropped (RecBole's filter_inter_by_user_or_item) — add them to that file, or set "
                "filter_inter_by_user_or_item: false to keep them")

    def _load_feat(self, filepath, source):
        df = super()._load_feat(filepath, source)
        if df is not None:
            for field in df.columns:
                if self.field2type.get(field) == FeatureType.TOKEN_SEQ:
                    self._cap_text(df, field, filepath)
        return df

    def _cap_text(self, df, field, filepath):
        """Cut each token of a ``token_seq`` field to ``item_text_token_max_chars`` and each value to
        ``item_text_max_chars`` before RecBole remaps the tokens (it concatenates every token into one array whose
        width is the longest token's: one 100,000-character word made that array tens of GB)."""
        values, cut = cap_token_seqs(df[field].values, self.config["item_text_token_max_chars"],
                                     self.config["item_text_max_chars"])
        if cut:
            df[field] = values
            self.field2seqlen[field] = max(map(len, values), default=0)
            self.logger.warning(f"{filepath}: {cut} {field} values were longer than item_text_max_chars / "
                                "item_text_token_max_chars and were cut")

    def data_augmentation(self):
        self._check_field("uid_field", "time_field")
        if self.time_field not in self.inter_feat:
            raise LLMSeRError(f"dataset '{self.dataset_name}': time field '{self.time_field}' (TIME_FIELD) was not "
                              "loaded; add it to load_col.inter (each user's interactions are ordered by it)")
        self.sort(by=[self.uid_field, self.time_field], ascending=True)
        self._raw_inter = self.inter_feat  # the interactions in (user, time) order, before prefix expansion
        super().data_augmentation()

    def use_all_prefix_windows(self):
        """Replace the expanded prefix rows by the all-positions windows of the same rows (weight 1): the training
        data of a helper model trained through ``DualChannelTrainer`` (same objective as RecBole's rows, one
        forward per sequence). Call after ``_change_feat_format()``; every interaction is a training item here."""
        table = _SequenceTable(self._raw_inter, self.uid_field, self.iid_field, {}, self.user_num)
        n = np.where(table.count >= 2, table.count, 0)
        rows = dual_channel_rows(n, np.zeros_like(n), np.full(self.user_num, np.nan), self.max_item_list_len)
        self.inter_feat = self._window_rows(table, rows)
        self.dct_layout, self.dct_n_rows = "windows", len(rows.user)
        self.dct_user_weight = np.full(self.user_num, np.nan)

    def _list_field(self, field):
        return getattr(self, f"{field}_list_field")

    def _rows_interaction(self, table, user, seq, start, length, target_index):
        hist = table.gather(user, seq, start, length, self.max_item_list_len)
        data = {self.uid_field: torch.from_numpy(user), self.item_list_length_field: torch.from_numpy(length)}
        for field, values in table.fields.items():
            data[field] = values[torch.from_numpy(target_index)]
            data[self._list_field(field)] = values[hist]
        return data

    def _window_rows(self, table, rows):
        win = windows_from_rows(rows, self.max_item_list_len)
        data = self._rows_interaction(table, win.user, win.seq, win.start, win.length,
                                      table.index(win.user, win.seq, win.start + win.length))
        shape = (len(win.user), self.max_item_list_len)
        targets = np.zeros(shape, np.int64)
        weights = np.zeros(shape, np.float32)
        targets[win.row_window, win.row_slot] = table.items[table.index(rows.user, rows.seq, rows.end)]
        weights[win.row_window, win.row_slot] = rows.weight
        data[TARGET_LIST_FIELD] = torch.from_numpy(targets)
        data[WEIGHT_LIST_FIELD] = torch.from_numpy(weights)
        data[CHANNEL_FIELD] = torch.from_numpy(win.seq.astype(np.int64))
        return Interaction(data)


# ----- the augmentation artifact ----------------------------------------------------------------------------
class Augmentation(NamedTuple):
    """What DCT takes from an augmentation artifact, in RecBole's internal ids."""

    pseudo: dict            # user id -> np.int64 array of pseudo item ids, in the order to prepend
    w_tilde: np.ndarray     # [n_users] float64, NaN for users without a record
    skipped: Counter        # problem kind -> number of records skipped (aug_bad_records: skip)
    n_records: int          # records read (valid or not)


class _BadRecord(Exception):
    def __init__(self, kind, message, user=None):
        super().__init__(message)
        self.kind, self.user = kind, user


def _token(value):
    """A raw token from JSON: a string, or an integer written without quotes."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _weight(record, key, required):
    if key not in record:
        if required:
            raise _BadRecord("missing or malformed field", f"no '{key}' field")
        return None
    value = record[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1
    if not ok:
        raise _BadRecord("bad weight", f"'{key}' = {value!r} is not a number in [0, 1]")
    return float(value)


def _parse_record(line, user_ids, item_ids):
    """(raw user token, user id, pseudo item ids, w̃) of one artifact line, or raise _BadRecord."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadRecord("invalid JSON", f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise _BadRecord("invalid JSON", f"expected a JSON object, got {type(record).__name__}")
    if "user_id" not in record:
        raise _BadRecord("missing or malformed field", "no 'user_id' field")
    raw_user = _token(record["user_id"])
    if raw_user is None:
        raise _BadRecord("unknown user", f"'user_id' = {record['user_id']!r} is not a user token")
    uid = user_ids.get(raw_user, 0)
    if uid == 0:  # 0 is RecBole's padding token
        raise _BadRecord("unknown user", "is not a user of the dataset", raw_user)
    try:
        items = record.get("pseudo_items")
        if not isinstance(items, list):
            problem = f"'pseudo_items' must be a list of item tokens, not {items!r}"
            raise _BadRecord("missing or malformed field", problem)
        ids = []
        for value in items:
            token = _token(value)
            iid = item_ids.get(token, 0) if token is not None else 0
            if iid == 0:
                raise _BadRecord("unknown item", f"pseudo item {value!r} is not an item of the dataset")
            ids.append(iid)
        if len(set(ids)) != len(ids):
            repeated = next(items[i] for i, x in enumerate(ids) if ids.index(x) != i)
            raise _BadRecord("repeated pseudo item", f"pseudo item {repeated!r} is listed twice")
        _weight(record, "w", required=False)
        w_tilde = _weight(record, "w_tilde", required=True)
    except _BadRecord as err:
        err.user = raw_user
        raise
    return raw_user, uid, np.asarray(ids, dtype=np.int64), w_tilde


def read_augmentation(path, user_ids: dict, item_ids: dict, n_users: int, on_bad: str = "error") -> Augmentation:
    """Stream an augmentation artifact (JSON lines, one record per user) into internal ids.

    A record needs ``user_id`` (raw token), ``pseudo_items`` (raw item tokens, prepend order) and ``w_tilde``
    (number in [0, 1]); ``w``, when present, must be a number in [0, 1] too; other fields are ignored; blank
    lines are skipped. ``user_ids`` / ``item_ids`` map raw tokens to RecBole's ids (``field2token_id``).

    A bad record (invalid JSON, missing field, unknown user or item, weight outside [0, 1] or not a number,
    a user listed twice, a pseudo item repeated within a record) raises a one-line ``LLMSeRError`` naming the
    file, line and user, or with ``on_bad='skip'`` is skipped and counted (the first record of a user wins).
    An artifact without any record, or whose every record was skipped, is an error too (training on it would be
    the plain backbone under the name llmser).
    """
    path = Path(path)
    if not path.is_file():
        raise LLMSeRError(f"aug_file {path}: file not found; run the augmentation stage or fix --aug_file")
    pseudo, skipped, n_records = {}, Counter(), 0
    w_tilde = np.full(n_users, np.nan)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            n_records += 1
            try:
                raw_user, uid, ids, weight = _parse_record(line, user_ids, item_ids)
                if uid in pseudo:
                    raise _BadRecord("duplicate user", "has a second record", raw_user)
            except _BadRecord as err:
                if on_bad == "skip":
                    skipped[err.kind] += 1
                    continue
                who = f"user {err.user!r}" if err.user is not None else "user unknown"
                raise LLMSeRError(
                    f"{path}:{line_no}: {who}: {err}; fix the artifact or set aug_bad_records: skip"
                ) from None
            pseudo[uid] = ids
            w_tilde[uid] = weight
    if not n_records:  # training on it would be the plain backbone, labelled llmser
        raise LLMSeRError(f"{path}: no augmentation records — the file is empty; make it with --stage=augment "
                          "(or --stage=all) or pass the right --aug_file")
    if not pseudo:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        raise LLMSeRError(f"{path}: no usable augmentation records — all {n_records} were skipped ({kinds}); make "
                          "the artifact again for this dataset or pass the right --aug_file")
    return Augmentation(pseudo, w_tilde, skipped, n_records)


# ----- dual-channel training data -------------------------------------------------------------------------
class _SequenceTable:
    """Every position of every user's original sequence (the raw interactions in time order) and augmented
    sequence (P_u, then the raw interactions) as one row of a table per field.

    Table row 0 is padding (zeros), rows 1..N the raw interactions sorted by (user, time), then one row per
    pseudo item (item field = the pseudo item, every other field 0)."""

    def __init__(self, raw, uid_field, iid_field, pseudo: dict, n_users: int):
        uid = raw[uid_field].numpy()
        self.count = np.bincount(uid, minlength=n_users)
        self.first = np.cumsum(self.count) - self.count
        self.n_raw = len(uid)
        self.n_pseudo = np.zeros(n_users, np.int64)
        for u, ids in pseudo.items():
            self.n_pseudo[u] = len(ids)
        self.pseudo_first = np.cumsum(self.n_pseudo) - self.n_pseudo
        pseudo_items = np.concatenate([pseudo[u] for u in sorted(pseudo)] + [np.empty(0, np.int64)])
        self.fields = {}
        for field, values in raw.interaction.items():
            if field == uid_field:
                continue
            pad = torch.zeros((1,) + tuple(values.shape[1:]), dtype=values.dtype)
            extra = torch.zeros((len(pseudo_items),) + tuple(values.shape[1:]), dtype=values.dtype)
            if field == iid_field:
                extra = torch.as_tensor(pseudo_items, dtype=values.dtype)
            self.fields[field] = torch.cat([pad, values, extra])
        self.items = self.fields[iid_field].numpy()

    def index(self, user, seq, pos):
        """Table row of position ``pos`` of (user, seq): seq 0 = original, 1 = augmented (numpy, broadcasts)."""
        m = np.where(seq == 1, self.n_pseudo[user], 0)
        q = pos - m
        return np.where(q >= 0, 1 + self.first[user] + q, 1 + self.n_raw + self.pseudo_first[user] + pos)

    def gather(self, user, seq, start, length, max_len):
        """Histories ``sequence[start:start+length]`` (right-padded with table row 0) -> [R, max_len] rows."""
        k = np.arange(max_len)
        pos = start[:, None] + k[None, :]
        hist = self.index(user[:, None], seq[:, None], pos)
        return torch.from_numpy(np.where(k[None, :] < length[:, None], hist, 0))


def _rank_within(keys, n_keys):
    """0-based rank of each entry among the entries with the same key, in order of appearance."""
    order = np.argsort(keys, kind="stable")
    count = np.bincount(keys, minlength=n_keys)
    rank = np.empty(len(keys), np.int64)
    rank[order] = np.arange(len(keys)) - (np.cumsum(count) - count)[keys[order]]
    return rank


class AugmentedSequentialDataset(SequentialDataset):
    """``SequentialDataset`` whose training split holds the dual-channel rows (``recbole_llmser.dct``).

    * ``config['aug_file']``: the augmentation artifact (:func:`read_augmentation`); ``None`` = every user on
      the original channel with weight 1 (plain training through the all-positions path).
    * Training split (``build()``): ``T_u`` = the user's training items (the history and targets of its RecBole
      training rows, s_1 .. s_{n-2} under leave-one-out). Rows layout (``dct_layout == 'rows'``): RecBole's row
      fields plus ``dct_weight`` (float) and ``dct_channel`` (ORIGINAL / AUGMENTED / SHARED). Windows layout
      (``'windows'``, the all-positions path): one row per window, ``item_id_list`` = its inputs, ``dct_target_list``
      / ``dct_weight_list`` = target item and weight per input position, ``dct_channel`` = the sequence
      (ORIGINAL / AUGMENTED); the row's scalar fields are those of its last target.
    * Validation / test rows: with ``aug_at_eval`` the history becomes (P_u ⊕ history) truncated from the left
      to ``MAX_ITEM_LIST_LENGTH`` (other list fields get 0 at pseudo positions) for the users whose ``w̃_u`` is at
      least ``aug_eval_min_weight``; targets never change.
    * ``user_train_len`` / ``user_items`` keep counting original interactions only.
    """

    def __init__(self, config):
        super().__init__(config)
        path = config["aug_file"] if uses_llmser(config) else None
        if path:
            self.augmentation = read_augmentation(
                path, self.field2token_id[self.uid_field], self.field2token_id[self.iid_field],
                self.user_num, config["aug_bad_records"],
            )
            self._log_artifact(path)
        else:
            self.augmentation = Augmentation({}, np.full(self.user_num, np.nan), Counter(), 0)
        self.dct_layout = "windows" if uses_all_positions(config) else "rows"

    def _log_artifact(self, path):
        aug = self.augmentation
        weights = aug.w_tilde[~np.isnan(aug.w_tilde)]
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(aug.skipped.items())) or "none"
        self.logger.info(
            f"DCT artifact {path}: {aug.n_records} records, {len(aug.pseudo)} users used "
            f"({len(aug.pseudo) / max(self.user_num - 1, 1):.1%} of users), skipped: {skipped}; "
            f"mean pseudo items {np.mean([len(p) for p in aug.pseudo.values()] or [0]):.2f}, "
            f"mean w_tilde {weights.mean() if len(weights) else float('nan'):.3f}"
        )
        if aug.skipped:
            self.logger.warning(f"DCT artifact {path}: skipped {sum(aug.skipped.values())} bad records ({skipped})")

    def build(self):
        datasets = super().build()
        if not hasattr(self, "_raw_inter"):
            raise LLMSeRError("dual-channel training needs RecBole's own sequence expansion; unset benchmark_filename")
        if len(datasets) != 3:
            raise LLMSeRError(f"dual-channel training needs a train/valid/test split, got {len(datasets)} parts")
        train, valid, test = datasets
        aug, L = self.augmentation, self.max_item_list_len
        table = _SequenceTable(self._raw_inter, self.uid_field, self.iid_field, aug.pseudo, self.user_num)

        n_rows = {}
        for name, part in (("train", train), ("valid", valid), ("test", test)):
            n_rows[name] = np.bincount(part.inter_feat[self.uid_field].numpy(), minlength=self.user_num)
        n_train = np.where(n_rows["train"] > 0, n_rows["train"] + 1, 0)  # |T_u|
        first_target = {"train": np.ones(self.user_num, np.int64), "valid": n_train,
                        "test": n_train + n_rows["valid"]}
        positions = {}
        for name, part in (("train", train), ("valid", valid), ("test", test)):
            user = part.inter_feat[self.uid_field].numpy()
            pos = first_target[name][user] + _rank_within(user, self.user_num)
            if not np.array_equal(table.items[table.index(user, 0, pos)], part.inter_feat[self.iid_field].numpy()):
                raise LLMSeRError(
                    "dual-channel training needs each user's training rows before its validation and test rows "
                    "(eval_args: split LS or RS grouped by user, order TO)"
                )
            positions[name] = pos

        rows = dual_channel_rows(n_train, table.n_pseudo, aug.w_tilde, L, self.config["aug_targets"])
        train.inter_feat = (self._window_rows if self.dct_layout == "windows" else self._training_rows)(table, rows)
        train.dct_user_weight = aug.w_tilde
        train.dct_n_rows = len(rows.user)
        if self.config["aug_at_eval"]:
            gated = eval_pseudo_users(table.n_pseudo, aug.w_tilde, self.config["aug_eval_min_weight"])
            for part, name in ((valid, "valid"), (test, "test")):
                self._prepend_pseudo(part, table, positions[name], gated)
            if aug.pseudo and self.config["aug_eval_min_weight"] > 0:
                self.logger.info(
                    f"DCT evaluation inputs: pseudo items prepended for {int(gated.sum())} of {len(aug.pseudo)} "
                    f"augmented users (w_tilde >= aug_eval_min_weight = {self.config['aug_eval_min_weight']})"
                )
        self._log_rows(rows, train, valid, test)
        return [train, valid, test]

    def _training_rows(self, table, rows):
        data = self._rows_interaction(table, rows.user, rows.seq, rows.start, rows.end - rows.start,
                                      table.index(rows.user, rows.seq, rows.end))
        data[WEIGHT_FIELD] = torch.from_numpy(rows.weight.astype(np.float32))
        data[CHANNEL_FIELD] = torch.from_numpy(rows.flag.astype(np.int64))
        return Interaction(data)

    def _prepend_pseudo(self, part, table, pos, users):
        """Rebuild the histories of a validation/test split from the augmented sequences of ``users`` (a mask over
        users; the others keep RecBole's history); targets kept."""
        inter = part.inter_feat
        user = inter[self.uid_field].numpy()
        seq = users[user].astype(np.int64)
        end = pos + np.where(seq == 1, table.n_pseudo[user], 0)
        start = np.maximum(end - self.max_item_list_len, 0)
        data = self._rows_interaction(table, user, seq, start, end - start, table.index(user, seq, end))
        inputs = {self.item_list_length_field, *(self._list_field(field) for field in table.fields)}
        inter.update(Interaction({k: v for k, v in data.items() if k in inputs}))

    def _log_rows(self, rows, train, valid, test):
        counts = np.bincount(rows.flag, minlength=3)
        msg = (f"DCT training rows: {counts[ORIGINAL]} original, {counts[AUGMENTED]} augmented, "
               f"{counts[SHARED]} shared (weight 1); layout {self.dct_layout}")
        if self.dct_layout == "windows":
            msg += f" ({len(train.inter_feat)} windows)"
        self.logger.info(msg)
        pseudo = self.augmentation.pseudo
        if pseudo:
            hits = sum(
                int(np.isin(item, pseudo[u]).any()) if u in pseudo else 0
                for part in (valid, test)
                for u, item in zip(part.inter_feat[self.uid_field].numpy(), part.inter_feat[self.iid_field].numpy())
            )
            self.logger.info(
                f"DCT diagnostic: {hits} validation/test targets are among their user's pseudo items "
                "(kept: pseudo items are never filtered by evaluation items)"
            )
