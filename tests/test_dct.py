"""Dual-channel training (DCT): row maths, the augmented dataset, the weighted losses, the all-positions path,
sample mode, leakage, artifact errors and end-to-end runs. Tiny hand-made data in tmp dirs, temp cwd."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from recbole_llmser.config import Config
from recbole_llmser.data import create_dataset, data_preparation
from recbole_llmser.data.dataset import AugmentedSequentialDataset
from recbole_llmser.dct import (
    AUGMENTED,
    CHANNEL_FIELD,
    ORIGINAL,
    SHARED,
    TARGET_LIST_FIELD,
    WEIGHT_FIELD,
    WEIGHT_LIST_FIELD,
    all_positions,
    all_positions_loss,
    dual_channel_rows,
    eval_pseudo_users,
    per_row_loss,
    row_weighted_loss_fct,
    sample_channels,
    sampled_rows,
    weighted_reduce,
    windows_from_rows,
)
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.evaluation import format_results
from recbole_llmser.quick_start import run
from recbole_llmser.trainer import DualChannelTrainer, SequentialTrainer
from recbole_llmser.registry import get_model, get_trainer
from tests.conftest import tiny_config_dict, write_tiny_dataset

NAN = float("nan")


# ----- pure row maths ---------------------------------------------------------------------------------------
def _rows_set(rows):
    return {(int(u), int(s), int(a), int(e), round(float(w), 6), int(f))
            for u, s, a, e, w, f in zip(rows.user, rows.seq, rows.start, rows.end, rows.weight, rows.flag)}


def test_rows_hand_case_with_truncation_collapse():
    # T = t0..t3, P = p1 p2, L = 3: original targets t1..t3; t3's augmented history (t0 t1 t2) equals its
    # original one -> one shared row of weight 1. Augmented sequence p1 p2 t0 t1 t2 t3.
    rows = dual_channel_rows([4], [2], [0.25], max_len=3, aug_targets="all")
    assert _rows_set(rows) == {
        (0, 0, 0, 1, 0.75, ORIGINAL), (0, 0, 0, 2, 0.75, ORIGINAL), (0, 0, 0, 3, 1.0, SHARED),
        (0, 1, 0, 1, 0.25, AUGMENTED),  # p1 -> p2
        (0, 1, 0, 2, 0.25, AUGMENTED),  # p1 p2 -> t0
        (0, 1, 0, 3, 0.25, AUGMENTED),  # p1 p2 t0 -> t1
        (0, 1, 1, 4, 0.25, AUGMENTED),  # p2 t0 t1 -> t2 (left-truncated)
    }
    real = dual_channel_rows([4], [2], [0.25], max_len=3, aug_targets="real")
    assert _rows_set(real) == _rows_set(rows) - {(0, 1, 0, 1, 0.25, AUGMENTED)}
    assert list(rows.end) == sorted(rows.end[rows.seq == 0]) + sorted(rows.end[rows.seq == 1])


def test_rows_weights_zero_one_missing_and_edge_users():
    rows = dual_channel_rows([3, 3, 3, 3, 0], [2, 2, 2, 0, 2], [0.0, 1.0, NAN, 0.5, 0.5], max_len=10)
    by_user = {u: _rows_set(rows) & {r for r in _rows_set(rows) if r[0] == u} for u in range(5)}
    assert by_user[0] == {(0, 0, 0, 1, 1.0, ORIGINAL), (0, 0, 0, 2, 1.0, ORIGINAL)}  # w=0: original only
    assert {r[1] for r in by_user[1]} == {1} and len(by_user[1]) == 4  # w=1: p2, t0, t1, t2 from P ⊕ T
    assert by_user[2] == {(2, 0, 0, 1, 1.0, ORIGINAL), (2, 0, 0, 2, 1.0, ORIGINAL)}  # no record
    assert by_user[3] == {(3, 0, 0, 1, 1.0, SHARED), (3, 0, 0, 2, 1.0, SHARED)}  # no pseudo items: all shared
    assert by_user[4] == set()  # no training items
    assert (rows.weight > 0).all()


def test_windows_group_untruncated_rows_and_keep_truncated_rows_alone():
    rows = dual_channel_rows([4], [2], [0.25], max_len=3)
    win = windows_from_rows(rows, max_len=3)
    assert len(win.user) == 3  # original prefix window, augmented prefix window, one truncated row
    for r in range(len(rows.user)):
        w = win.row_window[r]
        assert (win.user[w], win.seq[w], win.start[w]) == (rows.user[r], rows.seq[r], rows.start[r])
        assert win.row_slot[r] == rows.end[r] - rows.start[r] - 1 < win.length[w] <= 3
    assert sorted(win.length.tolist()) == [3, 3, 3]


def test_weighted_reduce():
    loss, weight = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 1.0, 0.25])
    assert weighted_reduce(loss, weight, "sum").item() == pytest.approx(3.5)
    assert weighted_reduce(loss, weight, "mean").item() == pytest.approx(3.5 / 1.75)


def test_sample_mode_frequency_approaches_weight():
    w = np.array([0.0, 0.1, 0.5, 0.9, 1.0, NAN])
    draws = np.stack([sample_channels(w, seed=42, epoch=e) for e in range(4000)])
    assert np.allclose(draws.mean(0), np.nan_to_num(w), atol=0.03)
    assert np.array_equal(sample_channels(w, 42, 7), sample_channels(w, 42, 7))  # same draw in every process
    user, flag = np.array([0, 0, 1, 1, 1]), np.array([ORIGINAL, AUGMENTED, ORIGINAL, AUGMENTED, SHARED])
    assert sampled_rows(user, flag, np.array([True, False])).tolist() == [False, True, True, False, True]


# ----- hand-made dataset ------------------------------------------------------------------------------------
HAND = {  # user -> items in time order; the last two are validation and test (u2: test only)
    "u1": "a b c d e f".split(),
    "u2": "x y z".split(),
    "u3": "g h i j k".split(),
    "u4": "k l m n".split(),
    "u5": "p q r s t u v w".split(),
}
HAND_AUG = [
    {"user_id": "u1", "pseudo_items": ["p", "q"], "w": 0.9, "w_tilde": 0.25, "extra": "ignored"},
    {"user_id": "u2", "pseudo_items": ["r"], "w": 1.0, "w_tilde": 1.0},
    {"user_id": "u4", "pseudo_items": ["s", "t", "u"], "w": 0.5, "w_tilde": 0.5},
]


def _write_dataset(root, name, sequences):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for n, (user, items) in enumerate(sequences.items()):
        lines += [f"{user}\t{item}\t{1000 * (n + 1) + t}" for t, item in enumerate(items)]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    return root


def _write_artifact(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _config(data, model="SASRec", dataset="tiny", **extra):
    cfg = tiny_config_dict(data, **extra)
    if dataset != "tiny":
        cfg.update(load_col={"inter": ["user_id", "item_id", "timestamp"]}, item_text_field=None)
    return Config(model, dataset, config_dict=cfg, cmd_args=[])


def _build(config):
    dataset = create_dataset(config)
    return dataset, data_preparation(config, dataset)


@pytest.fixture
def hand(tmp_path, tmp_cwd):
    data = _write_dataset(tmp_path / "data", "hand", HAND)
    return data, _write_artifact(tmp_path / "aug.jsonl", HAND_AUG)


def _tokens(dataset, ids):
    return tuple(dataset.id2token(dataset.iid_field, [int(i) for i in ids if i]))


def _row_view(dataset, inter):
    """{(user, history tokens, target token): (weight, channel)} of a rows-layout split."""
    users = dataset.id2token(dataset.uid_field, inter[dataset.uid_field].numpy())
    out = {}
    for r, user in enumerate(users):
        hist = inter[dataset.item_id_list_field][r][: inter[dataset.item_list_length_field][r]]
        key = (user, _tokens(dataset, hist), _tokens(dataset, [inter[dataset.iid_field][r]])[0])
        assert key not in out
        out[key] = (round(float(inter[WEIGHT_FIELD][r]), 6) if WEIGHT_FIELD in inter else 1.0,
                    int(inter[CHANNEL_FIELD][r]) if CHANNEL_FIELD in inter else ORIGINAL)
    return out


def _window_view(dataset, inter):
    """The same view from a windows-layout split: slot k of a window is the row (inputs[:k+1] -> target_k)."""
    users = dataset.id2token(dataset.uid_field, inter[dataset.uid_field].numpy())
    out = {}
    for r, user in enumerate(users):
        inputs = inter[dataset.item_id_list_field][r]
        for k in np.flatnonzero(inter[WEIGHT_LIST_FIELD][r].numpy() > 0):
            key = (user, _tokens(dataset, inputs[: k + 1]), _tokens(dataset, [inter[TARGET_LIST_FIELD][r][k]])[0])
            assert key not in out
            out[key] = round(float(inter[WEIGHT_LIST_FIELD][r][k]), 6)
    return out


EXPECTED_HAND_ROWS = {  # L = 3, aug_targets: all
    # u1: T = a b c d, P = p q, w = 0.25; d's augmented history (a b c) is its original one -> shared
    ("u1", ("a",), "b"): (0.75, ORIGINAL), ("u1", ("a", "b"), "c"): (0.75, ORIGINAL),
    ("u1", ("a", "b", "c"), "d"): (1.0, SHARED),
    ("u1", ("p",), "q"): (0.25, AUGMENTED), ("u1", ("p", "q"), "a"): (0.25, AUGMENTED),
    ("u1", ("p", "q", "a"), "b"): (0.25, AUGMENTED), ("u1", ("q", "a", "b"), "c"): (0.25, AUGMENTED),
    # u2: T = x y (test z, no validation), P = r, w = 1: no original row
    ("u2", ("r",), "x"): (1.0, AUGMENTED), ("u2", ("r", "x"), "y"): (1.0, AUGMENTED),
    # u3: no record
    ("u3", ("g",), "h"): (1.0, ORIGINAL), ("u3", ("g", "h"), "i"): (1.0, ORIGINAL),
    # u4: T = k l, P = s t u, w = 0.5
    ("u4", ("k",), "l"): (0.5, ORIGINAL), ("u4", ("s",), "t"): (0.5, AUGMENTED),
    ("u4", ("s", "t"), "u"): (0.5, AUGMENTED), ("u4", ("s", "t", "u"), "k"): (0.5, AUGMENTED),
    ("u4", ("t", "u", "k"), "l"): (0.5, AUGMENTED),
    # u5: no record, original rows truncated to 3
    ("u5", ("p",), "q"): (1.0, ORIGINAL), ("u5", ("p", "q"), "r"): (1.0, ORIGINAL),
    ("u5", ("p", "q", "r"), "s"): (1.0, ORIGINAL), ("u5", ("q", "r", "s"), "t"): (1.0, ORIGINAL),
    ("u5", ("r", "s", "t"), "u"): (1.0, ORIGINAL),
}


@pytest.mark.parametrize("aug_targets", ["all", "real"])
def test_training_rows_of_both_channels(hand, aug_targets):
    data, artifact = hand
    config = _config(data, dataset="hand", method="llmser", aug_file=str(artifact), MAX_ITEM_LIST_LENGTH=3,
                     dct_all_positions="off", aug_targets=aug_targets)
    dataset, (train, valid, test) = _build(config)
    assert isinstance(dataset, AugmentedSequentialDataset) and train._dataset.dct_layout == "rows"
    expected = dict(EXPECTED_HAND_ROWS)
    if aug_targets == "real":  # no row predicts a pseudo item
        for key in [("u1", ("p",), "q"), ("u4", ("s",), "t"), ("u4", ("s", "t"), "u")]:
            del expected[key]
    assert _row_view(dataset, train._dataset.inter_feat) == expected
    # the windows layout holds exactly the same rows and weights
    win_config = _config(data, dataset="hand", method="llmser", aug_file=str(artifact), MAX_ITEM_LIST_LENGTH=3,
                         aug_targets=aug_targets)
    win_dataset, (win_train, _, _) = _build(win_config)
    assert win_train._dataset.dct_layout == "windows"
    assert _window_view(win_dataset, win_train._dataset.inter_feat) == {k: w for k, (w, _) in expected.items()}


@pytest.mark.parametrize("aug_at_eval", [True, False])
def test_eval_inputs_get_pseudo_items_and_targets_never_change(hand, aug_at_eval):
    data, artifact = hand
    config = _config(data, dataset="hand", method="llmser", aug_file=str(artifact), MAX_ITEM_LIST_LENGTH=3,
                     aug_at_eval=aug_at_eval)
    dataset, (_, valid, test) = _build(config)
    views = {name: {k[0]: k[1:] for k in _row_view(dataset, part._dataset.inter_feat)}
             for name, part in (("valid", valid), ("test", test))}
    plain = {  # RecBole's own histories (truncated to 3)
        "valid": {"u1": (("b", "c", "d"), "e"), "u3": (("g", "h", "i"), "j"), "u4": (("k", "l"), "m"),
                  "u5": (("s", "t", "u"), "v")},
        "test": {"u1": (("c", "d", "e"), "f"), "u2": (("x", "y"), "z"), "u3": (("h", "i", "j"), "k"),
                 "u4": (("k", "l", "m"), "n"), "u5": (("t", "u", "v"), "w")},
    }
    expected = plain if not aug_at_eval else {
        "valid": {**plain["valid"], "u4": (("u", "k", "l"), "m")},  # P = s t u, truncated from the left
        "test": {**plain["test"], "u2": (("r", "x", "y"), "z")},   # u1, u4: pseudo items truncated away
    }
    assert views == expected


def test_eval_pseudo_items_gated_by_weight(hand):
    """aug_eval_min_weight: only users whose w_tilde reaches it get their pseudo items at evaluation (u4: 0.5 < 0.6
    keeps RecBole's history; u2: 1.0 keeps its pseudo item); training rows are unchanged."""
    data, artifact = hand
    common = dict(dataset="hand", method="llmser", aug_file=str(artifact), MAX_ITEM_LIST_LENGTH=3)
    dataset, (train, valid, test) = _build(_config(data, **common, aug_eval_min_weight=0.6))
    views = {name: {k[0]: k[1:] for k in _row_view(dataset, part._dataset.inter_feat)}
             for name, part in (("valid", valid), ("test", test))}
    assert views["valid"]["u4"] == (("k", "l"), "m")
    assert views["test"]["u2"] == (("r", "x", "y"), "z")
    _, (ungated_train, _, _) = _build(_config(data, **common))
    assert _window_view(dataset, train._dataset.inter_feat) == _window_view(dataset, ungated_train._dataset.inter_feat)
    with pytest.raises(LLMSeRError, match=r"aug_eval_min_weight \(0.6\) gates .* set aug_at_eval: true"):
        _config(data, **common, aug_eval_min_weight=0.6, aug_at_eval=False)


def test_eval_pseudo_users_mask():
    n_pseudo = np.array([0, 2, 2, 1, 3])
    w_tilde = np.array([np.nan, 0.2, 0.5, np.nan, 1.0])
    assert eval_pseudo_users(n_pseudo, w_tilde, 0.0).tolist() == [False, True, True, False, True]
    assert eval_pseudo_users(n_pseudo, w_tilde, 0.5).tolist() == [False, False, True, False, True]
    assert eval_pseudo_users(n_pseudo, w_tilde, 1.0).tolist() == [False, False, False, False, True]


def test_without_artifact_rows_equal_recbole_rows(tiny_data, tmp_cwd):
    data, _ = tiny_data
    extra = dict(MAX_ITEM_LIST_LENGTH=4)
    plain_ds, (plain_train, plain_valid, plain_test) = _build(_config(data, **extra))
    config = _config(data, **extra)
    ours = AugmentedSequentialDataset(config)
    train, valid, test = ours.build()
    for mine, theirs in ((train, plain_train), (valid, plain_valid), (test, plain_test)):
        a, b = mine.inter_feat, theirs._dataset.inter_feat
        assert set(b.columns) <= set(a.columns)
        key = lambda inter: sorted(zip(*(inter[f].tolist() for f in (  # noqa: E731
            "user_id", "item_id", "item_length", "timestamp", "item_id_list", "timestamp_list"))))
        assert key(a) == key(b)
    assert np.array_equal(ours.user_train_len, plain_ds.user_train_len)


# ----- artifacts --------------------------------------------------------------------------------------------
GOOD = {"user_id": "u1", "pseudo_items": ["p", "q"], "w": 0.5, "w_tilde": 0.5}
BAD_RECORDS = [
    ("{not json", "invalid JSON", "user unknown"),
    ("[1, 2]", "expected a JSON object", "user unknown"),
    ({"user_id": "nobody", "pseudo_items": [], "w_tilde": 0.5}, "not a user of the dataset", "'nobody'"),
    ({"user_id": "u3", "pseudo_items": ["zz"], "w_tilde": 0.5}, "pseudo item 'zz' is not an item", "'u3'"),
    ({"user_id": "u3", "pseudo_items": ["p"], "w_tilde": 1.5}, "'w_tilde' = 1.5 is not a number in [0, 1]", "'u3'"),
    ({"user_id": "u3", "pseudo_items": ["p"], "w_tilde": "high"}, "'w_tilde' = 'high'", "'u3'"),
    ({"user_id": "u3", "pseudo_items": ["p"], "w": -0.1, "w_tilde": 0.2}, "'w' = -0.1", "'u3'"),
    ({"user_id": "u3", "pseudo_items": ["p"]}, "no 'w_tilde' field", "'u3'"),
    ({"user_id": "u3", "pseudo_items": ["p", "q", "p"], "w_tilde": 0.2}, "pseudo item 'p' is listed twice", "'u3'"),
    (GOOD, "has a second record", "'u1'"),
]


@pytest.mark.parametrize("bad,needle,user", BAD_RECORDS, ids=[f"bad{i}" for i in range(len(BAD_RECORDS))])
def test_bad_artifact_records_are_one_line_errors(hand, bad, needle, user):
    data, artifact = hand
    _write_artifact(artifact, [GOOD, bad])
    config = _config(data, dataset="hand", method="llmser", aug_file=str(artifact))
    with pytest.raises(LLMSeRError) as err:
        create_dataset(config)
    message = str(err.value)
    assert "\n" not in message and f"{artifact}:2: " in message and user in message and needle in message


def test_bad_artifact_records_skipped_and_counted(hand, caplog):
    data, artifact = hand
    _write_artifact(artifact, [GOOD, "", *(b for b, _, _ in BAD_RECORDS), HAND_AUG[2]])
    config = _config(data, dataset="hand", method="llmser", aug_file=str(artifact), aug_bad_records="skip")
    with caplog.at_level("INFO"):
        dataset = create_dataset(config)
    aug = dataset.augmentation
    assert aug.n_records == len(BAD_RECORDS) + 2
    assert sorted(dataset.id2token("user_id", list(aug.pseudo))) == ["u1", "u4"]
    assert aug.skipped == {"invalid JSON": 2, "unknown user": 1, "unknown item": 1, "bad weight": 3,
                           "missing or malformed field": 1, "repeated pseudo item": 1, "duplicate user": 1}
    assert "skipped 10 bad records" in caplog.text


def test_missing_artifact_file(hand):
    data, artifact = hand
    config = _config(data, dataset="hand", method="llmser", aug_file=str(artifact) + ".missing")
    with pytest.raises(LLMSeRError, match="file not found"):
        create_dataset(config)


# ----- leakage ----------------------------------------------------------------------------------------------
def _random_artifact(path, sequences, seed=0, n_items=50, m=4, avoid_eval=True):
    rng = random.Random(seed)
    records = []
    for k, (user, items) in enumerate(sequences.items()):
        if k % 5 == 4:
            continue  # some users without a record
        banned = set(items if avoid_eval else items[:-2])
        pool = [f"i{i}" for i in range(1, n_items + 1) if f"i{i}" not in banned]
        w = [0.0, 1.0, round(rng.random(), 3)][k % 3]
        records.append({"user_id": user, "pseudo_items": rng.sample(pool, m), "w": w, "w_tilde": w})
    return _write_artifact(path, records)


@pytest.mark.parametrize("all_positions", ["auto", "off"])
def test_no_training_row_sees_a_validation_or_test_interaction(tiny_data, tmp_cwd, all_positions):
    data, sequences = tiny_data
    artifact = _random_artifact(tmp_cwd / "aug.jsonl", sequences)
    config = _config(data, method="llmser", aug_file=str(artifact), MAX_ITEM_LIST_LENGTH=4,
                     dct_all_positions=all_positions)
    dataset, (train, valid, test) = _build(config)
    held_out = {}  # user -> (items, timestamps) of its validation and test interactions
    for part in (valid, test):
        inter = part._dataset.inter_feat
        for u, i, t in zip(inter["user_id"].tolist(), inter["item_id"].tolist(), inter["timestamp"].tolist()):
            items, stamps = held_out.setdefault(u, (set(), set()))
            items.add(i)
            stamps.add(t)
    inter = train._dataset.inter_feat
    targets = inter[TARGET_LIST_FIELD] if all_positions == "auto" else inter["item_id"].unsqueeze(1)
    for r, u in enumerate(inter["user_id"].tolist()):
        items, stamps = held_out.get(u, (set(), set()))
        seen = set(inter["item_id_list"][r].tolist()) | set(targets[r].tolist())
        assert not seen & items
        assert not (set(inter["timestamp_list"][r].tolist()) | {inter["timestamp"][r].item()}) & stamps
    assert held_out and len(inter) > 0


def test_pseudo_items_equal_to_eval_items_are_kept_and_counted(tiny_data, tmp_cwd, caplog):
    data, sequences = tiny_data
    user, items = next(iter(sequences.items()))
    artifact = _write_artifact(tmp_cwd / "aug.jsonl", [
        {"user_id": user, "pseudo_items": [items[-1], items[-2]], "w": 1.0, "w_tilde": 1.0}])
    config = _config(data, method="llmser", aug_file=str(artifact), dct_all_positions="off")
    with caplog.at_level("INFO"):
        dataset, (train, _, _) = _build(config)
    assert "2 validation/test targets are among their user's pseudo items" in caplog.text
    uid = dataset.token2id("user_id", user)
    inter = train._dataset.inter_feat
    mine = inter["item_id_list"][inter["user_id"] == uid]
    assert dataset.token2id("item_id", items[-1]) in mine  # never filtered


# ----- losses -----------------------------------------------------------------------------------------------
def _dct_setup(data, sequences, tmp_cwd, model, **extra):
    artifact = _random_artifact(tmp_cwd / "aug.jsonl", sequences)
    cfg = {"method": "llmser", "aug_file": str(artifact), "MAX_ITEM_LIST_LENGTH": 5, "train_batch_size": 4096}
    cfg.update(extra)
    config = _config(data, model, **cfg)
    dataset, (train, valid, test) = _build(config)
    torch.manual_seed(0)
    net = get_model(model)(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], model, config)(config, net)
    return config, dataset, train, net, trainer


def _one_batch(train):
    """The whole training split as one batch, through RecBole's loader (negatives, BERT4Rec masks)."""
    (batch,) = list(train)
    return batch


@pytest.mark.parametrize("model,loss_type,aug_targets", [
    ("SASRec", "CE", "all"), ("SASRec", "BPR", "real"), ("GRU4Rec", "CE", "real"), ("GRU4Rec", "BPR", "all"),
])
def test_row_loss_is_the_weighted_sum_of_row_losses(tiny_data, tmp_cwd, model, loss_type, aug_targets):
    data, sequences = tiny_data
    config, _, train, net, trainer = _dct_setup(data, sequences, tmp_cwd, model, loss_type=loss_type,
                                                aug_targets=aug_targets, dct_all_positions="off")
    assert isinstance(trainer, DualChannelTrainer)
    net.eval()
    batch = _one_batch(train)
    w = batch[WEIGHT_FIELD].double()
    assert {0.0 < x < 1.0 for x in w.tolist()} == {True, False}  # fractional weights and weight-1 rows
    assert (batch[CHANNEL_FIELD] == SHARED).any()  # a truncation collapse
    with torch.no_grad():
        per_row = torch.tensor([net.calculate_loss(batch[r:r + 1]).item() for r in range(len(batch))]).double()
        for reduction, expected in (("sum", (w * per_row).sum()), ("mean", (w * per_row).sum() / w.sum())):
            trainer.reduction = reduction
            assert trainer._row_loss(batch).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("loss_type", ["CE", "BPR"])
def test_bert4rec_row_loss_weights_masked_positions(tiny_data, tmp_cwd, loss_type):
    data, sequences = tiny_data
    config, _, train, net, trainer = _dct_setup(data, sequences, tmp_cwd, "BERT4Rec", loss_type=loss_type)
    net.eval()
    random.seed(3)
    batch = _one_batch(train)
    w = batch[WEIGHT_FIELD].double()
    n_masked = (batch[net.MASK_INDEX] > 0).sum(1).double()
    with torch.no_grad():
        # RecBole's loss of one row = the mean over its masked positions (NaN when it has none)
        mean_row = torch.tensor([net.calculate_loss(batch[r:r + 1]).item() for r in range(len(batch))]).double()
        per_row = torch.nan_to_num(mean_row) * n_masked
        trainer.reduction = "sum"
        assert trainer._row_loss(batch).item() == pytest.approx((w * per_row).sum().item(), rel=1e-5)
        trainer.reduction = "mean"
        expected = (w * per_row).sum() / (w * n_masked).sum()
        assert trainer._row_loss(batch).item() == pytest.approx(expected.item(), rel=1e-5)
        batch[WEIGHT_FIELD] = torch.ones(len(batch))  # weights 1: exactly RecBole's loss
        assert trainer._row_loss(batch).item() == pytest.approx(net.calculate_loss(batch).item(), rel=1e-5)


def _grads(net, loss):
    net.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["CE", "BPR"])
def test_plain_bert4rec_trains_on_recboles_loss_over_real_mask_slots(tiny_data, tmp_cwd, loss_type):
    data, _ = tiny_data
    config = _config(data, "BERT4Rec", MAX_ITEM_LIST_LENGTH=10, mask_ratio=0.5, loss_type=loss_type,
                     train_batch_size=4096)
    _, (train, _, _) = _build(config)
    torch.manual_seed(0)
    net = get_model("BERT4Rec")(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], "BERT4Rec", config)(config, net)
    assert isinstance(trainer, SequentialTrainer) and not isinstance(trainer, DualChannelTrainer)
    net.eval()
    random.seed(5)
    batch = _one_batch(train)
    assert ((batch[net.MASK_INDEX] == 0).sum(1) > 0).any()  # padding mask slots, which RecBole scores too
    ours, theirs = trainer._bert4rec_loss(batch), net.calculate_loss(batch)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    grads_ours, grads_theirs = _grads(net, ours), _grads(net, theirs)
    assert grads_ours.keys() == grads_theirs.keys()
    for k in grads_ours:
        assert torch.allclose(grads_ours[k], grads_theirs[k], atol=1e-6, rtol=1e-4), k
    # an epoch trains through it, never through RecBole's calculate_loss
    net.train()
    net.calculate_loss = lambda interaction: pytest.fail("RecBole's calculate_loss was called")
    loss = trainer._train_epoch(train, 0)
    assert np.isfinite(loss)


@pytest.mark.parametrize("all_positions", ["off", "auto"])
def test_zero_weights_give_plain_training_gradients(tiny_data, tmp_cwd, all_positions):
    data, sequences = tiny_data
    artifact = _write_artifact(tmp_cwd / "aug.jsonl", [
        {"user_id": u, "pseudo_items": ["i1", "i2", "i3"], "w": 0.7, "w_tilde": 0.0} for u in sequences])
    extra = dict(MAX_ITEM_LIST_LENGTH=5, hidden_dropout_prob=0.0, attn_dropout_prob=0.0)
    plain_config = _config(data, **extra)
    _, (plain_train, _, _) = _build(plain_config)
    config = _config(data, method="llmser", aug_file=str(artifact), dct_all_positions=all_positions, **extra)
    _, (train, _, _) = _build(config)
    torch.manual_seed(0)
    net = get_model("SASRec")(config, train._dataset)
    trainer = DualChannelTrainer(config, net)
    everything = train._dataset.inter_feat
    ours = _grads(net, trainer._all_positions_loss(everything) if all_positions == "auto"
                  else trainer._row_loss(everything))
    theirs = _grads(net, net.calculate_loss(plain_train._dataset.inter_feat))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=1e-4), k


@pytest.mark.parametrize("model", ["SASRec", "GRU4Rec"])
def test_all_positions_equal_row_expansion(tiny_data, tmp_cwd, model):
    data, sequences = tiny_data
    config, dataset, train, net, _ = _dct_setup(data, sequences, tmp_cwd, model, MAX_ITEM_LIST_LENGTH=4,
                                                dct_all_positions="off")
    rows = train._dataset.inter_feat
    win_config = _config(data, model, method="llmser", aug_file=config["aug_file"], MAX_ITEM_LIST_LENGTH=4)
    _, (win_train, _, _) = _build(win_config)
    windows = win_train._dataset.inter_feat
    assert (windows["item_length"] == 4).any() and len(windows) < len(rows)  # truncated rows, shared windows
    net.eval()
    with torch.no_grad():
        reference = {}  # (user, history, target) -> (weight, stock RecBole loss of that single row)
        for r in range(len(rows)):
            hist = tuple(rows["item_id_list"][r][: rows["item_length"][r]].tolist())
            reference[(rows["user_id"][r].item(), hist, rows["item_id"][r].item())] = (
                rows[WEIGHT_FIELD][r].item(), net.calculate_loss(rows[r:r + 1]).item())
        with all_positions(net):
            hidden = net.forward(windows["item_id_list"], windows["item_length"])
        ours = {}
        for r in range(len(windows)):
            for k in np.flatnonzero(windows[WEIGHT_LIST_FIELD][r].numpy() > 0):
                target = windows[TARGET_LIST_FIELD][r][k]
                loss = per_row_loss(net.loss_fct, hidden[r, k][None] @ net.item_embedding.weight.T, target[None])
                key = (windows["user_id"][r].item(), tuple(windows["item_id_list"][r][: k + 1].tolist()), target.item())
                ours[key] = (windows[WEIGHT_LIST_FIELD][r][k].item(), loss.item())
        assert ours.keys() == reference.keys()
        for key, (w, loss) in reference.items():
            assert ours[key][0] == pytest.approx(w) and ours[key][1] == pytest.approx(loss, rel=1e-4, abs=1e-5)
        total = sum(w * loss for w, loss in reference.values())
        assert all_positions_loss(net, windows, "sum").item() == pytest.approx(total, rel=1e-4)


def test_all_positions_bpr_equals_rows_with_the_same_negatives(tiny_data, tmp_cwd):
    data, sequences = tiny_data
    config, dataset, train, net, trainer = _dct_setup(data, sequences, tmp_cwd, "SASRec", loss_type="BPR",
                                                      MAX_ITEM_LIST_LENGTH=4, dct_all_positions="off")
    _, (win_train, _, _) = _build(_config(data, method="llmser", aug_file=config["aug_file"], loss_type="BPR",
                                          MAX_ITEM_LIST_LENGTH=4))
    negative = lambda users, items: (items * 7 + users * 3) % (dataset.item_num - 1) + 1  # noqa: E731
    rows = train._dataset.inter_feat
    rows["neg_item_id"] = negative(rows["user_id"], rows["item_id"])
    net.eval()
    with torch.no_grad():
        trainer.reduction = "sum"
        expected = trainer._row_loss(rows).item()
        got = all_positions_loss(net, win_train._dataset.inter_feat, "sum", negative).item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_row_weighted_loss_fct_refuses_models_it_cannot_weight():
    class TwoCalls(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss_fct = torch.nn.CrossEntropyLoss()

        def calculate_loss(self):
            logits, target = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
            return self.loss_fct(logits, target) + self.loss_fct(logits, target)

    model = TwoCalls()
    with pytest.raises(LLMSeRError, match="called loss_fct 2 times"):
        with row_weighted_loss_fct(model, torch.ones(2), "mean"):
            model.calculate_loss()
    with pytest.raises(LLMSeRError, match="use dct_mode: sample"):
        with row_weighted_loss_fct(model, torch.ones(3), "mean"):
            model.calculate_loss()
    assert isinstance(model.loss_fct, torch.nn.CrossEntropyLoss)  # restored


def test_sample_mode_trains_one_channel_per_user_and_epoch(tiny_data, tmp_cwd):
    data, sequences = tiny_data
    config, dataset, train, net, trainer = _dct_setup(data, sequences, tmp_cwd, "SASRec", dct_mode="sample")
    inter = train._dataset.inter_feat
    assert train._dataset.dct_layout == "rows"
    w = train._dataset.dct_user_weight
    epochs = 200
    frequency = np.zeros(dataset.user_num)
    for epoch in range(epochs):
        loader = trainer._sampled(train, epoch)
        sub = loader._dataset.inter_feat
        assert len(loader) == -(-len(sub) // config["train_batch_size"])
        chosen = sample_channels(w, config["seed"], epoch)
        for u in np.unique(inter["user_id"].numpy()):
            flags = set(sub[CHANNEL_FIELD][sub["user_id"] == u].tolist())
            assert flags <= {SHARED, AUGMENTED if chosen[u] else ORIGINAL}
            frequency[u] += chosen[u]
    has = ~np.isnan(w)
    assert np.abs(frequency[has] / epochs - w[has]).max() < 0.15
    assert frequency[~has].sum() == 0


def test_exact_mode_refuses_a_model_without_per_row_losses(tiny_data, tmp_cwd):
    data, sequences = tiny_data
    config, _, train, net, _ = _dct_setup(data, sequences, tmp_cwd, "NARM")
    net.loss_fct = torch.nn.MSELoss()
    with pytest.raises(LLMSeRError, match="use dct_mode: sample"):
        DualChannelTrainer(config, net)


# ----- end to end -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,extra,layout", [
    ("SASRec", {}, "windows"),
    ("BERT4Rec", {}, "rows"),
    ("NARM", {"dct_mode": "sample"}, "rows"),
])
def test_run_end_to_end(tiny_data, tmp_cwd, model, extra, layout, monkeypatch):
    data, sequences = tiny_data
    artifact = _random_artifact(tmp_cwd / "aug.jsonl", sequences, avoid_eval=False)
    used = {}
    original = DualChannelTrainer._train_epoch

    def spy(self, train_data, *args, **kwargs):
        used["layout"] = train_data._dataset.dct_layout
        return original(self, train_data, *args, **kwargs)

    monkeypatch.setattr(DualChannelTrainer, "_train_epoch", spy)
    cfg = tiny_config_dict(data, method="llmser", aug_file=str(artifact), **extra)
    result = run(model, "tiny", config_dict=cfg, cmd_args=[])
    assert used["layout"] == layout
    print(f"\n{model} {extra or 'exact'}\n" + format_results(result["test"], "test"))
    lengths = [len(s) - 2 for s in sequences.values()]
    for res in result["test"].values():
        assert res["overall"]["n"] == len(sequences)
        sizes = [g["n"] for g in res["groups"]]
        assert sizes == [sum(x <= 4 for x in lengths), sum(4 < x <= 7 for x in lengths), sum(x > 7 for x in lengths)]
        assert 0.0 <= res["overall"]["ndcg@10"] <= 1.0


def test_plain_training_through_all_positions(tiny_data, tmp_cwd):
    data, sequences = tiny_data
    cfg = tiny_config_dict(data, train_all_positions=True)
    config = Config("GRU4Rec", "tiny", config_dict=cfg, cmd_args=[])
    assert get_trainer(config["MODEL_TYPE"], "GRU4Rec", config) is DualChannelTrainer
    result = run("GRU4Rec", "tiny", config_dict=cfg, cmd_args=[])
    assert result["test"]["full"]["overall"]["n"] == len(sequences)
    bert = Config("BERT4Rec", "tiny", config_dict=cfg, cmd_args=[])  # no adapter: RecBole's rows
    assert get_trainer(bert["MODEL_TYPE"], "BERT4Rec", bert) is SequentialTrainer


def test_train_lengths_follow_recboles_leave_one_out(tmp_cwd):
    """T_u of users with 2..6 interactions: a 3-item user has no validation row and trains on s_1 -> s_2."""
    from recbole_llmser.sequences import training_prefixes
    from recbole_llmser.data.dataset import train_lengths

    assert train_lengths([0, 1, 2, 3, 4, 7]).tolist() == [0, 0, 2, 2, 2, 5]
    assert train_lengths([2, 3, 4], leave_one_num=1).tolist() == [2, 2, 3]
    sequences = write_tiny_dataset(tmp_cwd / "data", lengths=(2, 6), n_users=60)
    assert {len(s) for s in sequences.values()} == {2, 3, 4, 5, 6}
    for split, k in (("valid_and_test", 2), ("test_only", 1)):
        config = _config(tmp_cwd / "data", eval_args={"split": {"LS": split}, "order": "TO", "group_by": "user",
                                                       "mode": "full"})
        dataset, parts = _build(config)
        uid = dataset.uid_field
        rows = np.bincount(parts[0]._dataset.inter_feat[uid].numpy(), minlength=dataset.user_num)
        # T_u = the items of the user's training rows: histories and targets (rows + 1)
        want = np.where(rows > 0, rows + 1, 0)
        assert np.array_equal(dataset.user_train_len, want), split
        tokens = dataset.field2id_token[uid]
        prefixes = training_prefixes(config, [np.array(sequences[tokens[u]]) for u in range(1, dataset.user_num)])
        assert [len(p) for p in prefixes] == want[1:].tolist()
        if k == 2:  # no training prefix ever holds a validation or test target
            held_out = {(int(u), int(i)) for part in parts[1:] for u, i in
                        zip(part._dataset.inter_feat[uid].numpy(), part._dataset.inter_feat[dataset.iid_field].numpy())}
            iid = dataset.field2token_id[dataset.iid_field]
            assert not {(u, iid[i]) for u, p in zip(range(1, dataset.user_num), prefixes) for i in p} & held_out
    with pytest.raises(LLMSeRError, match="eval_args split.*leave-one-out"):
        training_prefixes(_config(tmp_cwd / "data", eval_args={"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO",
                                                               "group_by": "user", "mode": "full"}), [])
