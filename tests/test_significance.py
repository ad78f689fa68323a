"""Significance (issue #33 item 4): the paired test on hand-made data, the per-user ranks file, and the main
table's p-value rows read from per-user files (users paired by token, runs by seed)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from recbole_llmser import experiments as ex
from recbole_llmser.evaluation import (SplitRows, keep_per_user, read_per_user, row_metrics, users_file_of,
                                       write_per_user)
from recbole_llmser.experiments.significance import per_user_file
from tests.test_experiments import AUG, _record

BOUNDS, NAMES = [3, 6], ["tail", "medium", "head"]  # the groups of test_experiments._record


# ------------------------------------------------------------------------------------------- the test itself --
def test_identical_values_give_p_one_and_no_difference():
    x = np.array([0.0, 1.0, 0.5, 0.0, 0.3])
    assert ex.paired_test(x, x.copy()) == (0.0, 1.0, 5)
    assert ex.paired_test([x, x[::-1]], [x, x[::-1]]) == (0.0, 1.0, 5)  # several seeds, each identical


def test_a_constant_shift_gives_a_tiny_p():
    rng = np.random.default_rng(0)
    x = rng.random(200)
    exact = ex.paired_test(np.zeros(50), np.full(50, 0.1))  # the same nonzero difference for every user
    assert exact.p == 0.0 and exact.diff == pytest.approx(0.1) and exact.n == 50
    shifted = ex.paired_test(x, x + 0.1)  # rounding leaves the differences a hair apart: still one value
    assert shifted.p == 0.0 and shifted.diff == pytest.approx(0.1)
    noisy = ex.paired_test(x, x + 0.1 + rng.normal(0, 0.05, 200))
    assert noisy.p < 1e-12 and noisy.diff == pytest.approx(0.1, abs=0.01)


def test_p_value_of_a_hand_computed_t():
    # differences 1..5: mean 3, sd sqrt(2.5), t = 3 / (sqrt(2.5) / sqrt(5)) = 3 sqrt(2), 4 degrees of freedom;
    # Student's t with 4 df: F(t) = 1/2 + 3/8 · t / sqrt(1 + t²/4) · (1 − t² / (12 (1 + t²/4)))
    t = 3 * math.sqrt(2)
    p = 2 * (1 - (0.5 + 3 / 8 * t / math.sqrt(1 + t * t / 4) * (1 - t * t / (12 * (1 + t * t / 4)))))
    res = ex.paired_test(np.zeros(5), np.arange(1.0, 6.0))
    assert res.diff == 3.0 and res.p == pytest.approx(p, rel=1e-9) and res.p == pytest.approx(0.013236, abs=1e-6)
    assert ex.paired_test(np.arange(1.0, 6.0), np.zeros(5)).p == pytest.approx(p, rel=1e-9)  # two-sided


def test_seeds_are_averaged_per_user_before_the_test():
    a, b = np.array([0.0, 1.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0, 1.0])
    # seed 1: new beats base on users 0 and 3, seed 2 the other way round: per user the averages are equal
    assert ex.paired_test([a, b], [b, a]) == (0.0, 1.0, 4)
    # one seed of two moves by 0.2 for every user: the per-user difference is 0.1
    res = ex.paired_test([a, b], [a + 0.2, b])
    assert res.diff == pytest.approx(0.1) and res.n == 4
    with pytest.raises(ValueError, match="differ in seeds or users"):
        ex.paired_test([a, b], [a])
    assert ex.paired_test([0.5], [0.7]).p is None  # one user: no test
    assert ex.fmt_p(None) == "—" and ex.fmt_p(0.0004) == "<0.001" and ex.fmt_p(0.04567) == "0.046"
    assert ex.fmt_p(1.0) == "1.000"


# --------------------------------------------------------------------------------------- the per-user file --
def _write(path, users, lengths, ranks, split="test"):
    """A per-user file of ``users`` (tokens) with training ``lengths`` and ``{protocol: ranks}``."""
    dataset = SimpleNamespace(uid_field="user_id",
                              field2id_token={"user_id": np.array(["[PAD]", *users], dtype=object)})
    rows = SplitRows(users=np.arange(1, len(users) + 1), lengths=np.asarray(lengths),
                     targets=np.ones(len(users), dtype=np.int64),
                     ranks={p: np.asarray(r, dtype=np.int64) for p, r in ranks.items()})
    write_per_user(path, {split: rows}, dataset, {"group_bounds": BOUNDS, "group_names": NAMES})
    return path


def test_kept_copies_share_one_users_file_and_read_back_the_same(tmp_path):
    """The runner's copy of a per-user file moves the user tokens into a file shared by the runs of a dataset; it
    reads back as the original (rows in user order), its users file is written once, and a users_file entry that
    is not a plain users-file name is refused."""
    users = ["zé", "a", "m", "b"]
    a = _write(tmp_path / "a.npz", users, [2, 5, 9, 3], {"full": [4, 0, 30, 2], "uni9": [1, 0, 9, 2]})
    b = _write(tmp_path / "b.npz", users[::-1], [3, 9, 5, 2], {"full": [1, 1, 1, 1], "uni9": [0, 0, 0, 0]})
    out = tmp_path / "kept"
    ka, kb = keep_per_user(a, out, "run-a"), keep_per_user(b, out, "run-b")
    assert ka == out / "run-a.npz" and sorted(p.name for p in out.iterdir())[:2] == ["run-a.npz", "run-b.npz"]
    assert len(list(out.glob("users-*.npz"))) == 1
    for original, kept in ((a, ka), (b, kb)):
        x, y = read_per_user(original), read_per_user(kept)
        assert x["group_names"] == y["group_names"] and x["group_bounds"] == y["group_bounds"]
        sx, sy = x["splits"]["test"], y["splits"]["test"]
        assert sy["user"].tolist() == sorted(users)  # rows in user order
        ox, oy = np.argsort(sx["user"]), np.argsort(sy["user"])
        for key in ("user", "train_len", "group"):
            assert sx[key][ox].tolist() == sy[key][oy].tolist()
        for p in ("full", "uni9"):
            assert sx["ranks"][p][ox].tolist() == sy["ranks"][p][oy].tolist()
    with np.load(ka) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(tmp_path / "evil.npz", **{**arrays, "users_file": np.array("../a.npz")})
    with pytest.raises(ValueError, match="is not a users file name"):
        read_per_user(tmp_path / "evil.npz")
    assert per_user_file({"per_user": str(tmp_path / "evil.npz")}) is None
    assert users_file_of(a) is None and users_file_of(ka) == next(out.glob("users-*.npz"))
    assert per_user_file({"per_user": str(a)}) == a  # a full file needs no users file
    # a copy whose users file is gone reads as no file: its p-values become '—' with the footnote
    assert per_user_file({"per_user": str(ka)}) == ka
    next(out.glob("users-*.npz")).unlink()
    with pytest.raises(ValueError, match="users file users-.* is missing"):
        read_per_user(ka)
    assert per_user_file({"per_user": str(ka)}) is None


def test_per_user_file_round_trip_without_pickle(tmp_path):
    path = _write(tmp_path / "per_user.npz", ["a", "bé", "c"], [2, 5, 9], {"full": [0, 30, 2**20], "uni9": [0, 1, 9]})
    data = read_per_user(path)
    assert data["group_names"] == NAMES and data["group_bounds"] == BOUNDS
    test = data["splits"]["test"]
    assert test["user"].tolist() == ["a", "bé", "c"] and test["user"].dtype.kind == "U"
    assert test["group"].tolist() == [0, 1, 2] and test["train_len"].tolist() == [2, 5, 9]
    assert {p: r.dtype for p, r in test["ranks"].items()} == {"full": np.int32, "uni9": np.int32}
    assert test["ranks"]["full"].tolist() == [0, 30, 2**20]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
    np.savez_compressed(tmp_path / "other.npz", x=np.arange(3))
    with pytest.raises(ValueError, match="not a per-user ranks file"):
        read_per_user(tmp_path / "other.npz")
    with np.load(path, allow_pickle=False) as z:  # a well-formed file with a pickled array in place of the ranks
        arrays = {**dict(z), "test.rank.full": np.array([{"a": 1}, 2, 3], dtype=object)}
    np.savez(tmp_path / "pickled.npz", **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):  # never unpickled
        read_per_user(tmp_path / "pickled.npz")


# ----------------------------------------------------------------------------------------------- the report --
USERS = [f"u{i}" for i in range(12)]
LENGTHS = [2, 3, 1, 3, 5, 4, 6, 5, 8, 9, 7, 12]  # tail: u0-u3, medium: u4-u7, head: u8-u11


def _runs(tmp_path, base_ranks, new_ranks, seeds=(42, 43), files=True):
    """none and llmser records of SASRec, one per seed, each with its per-user file (new runs list the users in
    reverse order: they are paired by token, not by position)."""
    recs = []
    for method, ranks in (("none", base_ranks), ("llmser", new_ranks)):
        for seed, r in zip(seeds, ranks):
            rec = _record("SASRec", method, seed, 0.2, aug=AUG)
            if files:
                order = slice(None, None, -1) if method == "llmser" else slice(None)
                path = _write(tmp_path / f"{method}-{seed}.npz", USERS[order], LENGTHS[order],
                              {"uni100": np.asarray(r)[order], "full": np.asarray(r)[order] * 10})
                rec["per_user"] = str(path)
            recs.append(rec)
    return recs


def _p_row(text, protocol):
    table = text.split(f"### Test, protocol `{protocol}`")[1].split("![")[0]
    row = next(ln for ln in table.splitlines() if ln.startswith("| SASRec | p-value llmser vs none"))
    return [c.strip() for c in row.strip("|").split("|")]


def _expected(base_ranks, new_ranks, metric, members):
    k, idx = 10, np.asarray(members)
    values = lambda rs: [row_metrics(np.asarray(r), k)[metric == "ndcg"][idx] for r in rs]  # noqa: E731
    return ex.fmt_p(ex.paired_test(values(base_ranks), values(new_ranks)).p)


def test_main_table_p_values_pair_runs_by_seed_and_users_by_token(tmp_path):
    rng = np.random.default_rng(3)
    base = [rng.integers(0, 15, 12) for _ in range(2)]
    new = [np.maximum(r - rng.integers(0, 6, 12), 0) for r in base]  # llmser ranks targets higher
    for r in _runs(tmp_path, base, new):
        ex.append_jsonl(tmp_path / "runs.jsonl", r)
    text = ex.write_report(tmp_path, "cmd").read_text()
    cells = _p_row(text, "uni100")
    groups = {"overall": range(12), "tail": range(4), "medium": range(4, 8), "head": range(8, 12)}
    expected = [_expected(base, new, m, members) for members in groups.values() for m in ("hit", "ndcg")]
    assert cells[1] == "p-value llmser vs none" and cells[4:] == expected
    assert all(c != "—" for c in cells[4:]) and expected[1] != "1.000"
    # pairing users by position instead of by token would give other values
    shuffled = [r[::-1] for r in new]
    assert _expected(base, shuffled, "ndcg", range(12)) != expected[1]
    assert ex.write_report(tmp_path, "cmd").read_text().count("p-values need runs") == 0  # no footnote
    full = _p_row(text, "full")[4:]  # the files' full ranks are 10x the uni100 ones: the same pairing, other values
    assert full[1] == _expected([r * 10 for r in base], [r * 10 for r in new], "ndcg", range(12))


def test_runs_without_per_user_files_show_a_dash_and_a_footnote(tmp_path):
    rng = np.random.default_rng(4)
    base = [rng.integers(0, 15, 12) for _ in range(2)]
    old = _runs(tmp_path / "old", base, base, files=False)  # recorded before runs kept per-user ranks
    for r in old:
        ex.append_jsonl(tmp_path / "old" / "runs.jsonl", r)
    text = ex.write_report(tmp_path / "old", "cmd").read_text()
    assert set(_p_row(text, "uni100")[4:]) == {"—"}
    assert text.count("`—` in a `p-value` row: p-values need runs that keep per-user ranks") == 2  # per protocol
    assert "all 4 runs compared here were recorded without them. `--rerun_missing_ranks` runs them again." in text

    # one seed's base run has no file: the other seed alone is tested, and the row says so
    mixed = _runs(tmp_path / "mixed", base, [r + 1 for r in base])
    del mixed[1]["per_user"]  # none, seed 43
    for r in mixed:
        ex.append_jsonl(tmp_path / "mixed" / "runs.jsonl", r)
    text = ex.write_report(tmp_path / "mixed", "cmd").read_text()
    cells = _p_row(text, "uni100")
    assert cells[1] == "p-value llmser vs none (seeds with per-user ranks: 42)"
    assert cells[5] == _expected(base[:1], [base[0] + 1], "ndcg", range(12))
    assert "1 of the 4 runs compared here were recorded without them" in text

    # a file named by its record but gone: no p-value, and the footnote says where it was looked for
    gone = _runs(tmp_path / "gone", base, [r + 1 for r in base], seeds=(42,))
    for r in gone:
        ex.append_jsonl(tmp_path / "gone" / "runs.jsonl", r)
    (tmp_path / "gone" / "none-42.npz").unlink()
    text = ex.write_report(tmp_path / "gone", "cmd").read_text()
    assert set(_p_row(text, "full")[4:]) == {"—"}
    assert "the per-user file of 1 of them is no longer where their record says" in text
    assert "none-42.npz" in text


def test_labelled_tables_give_p_values_against_their_first_row(tmp_path):
    """A group table (baselines, preset search, ablations) has one p-value cell per row against its first row:
    NDCG@10 overall / per group, the same paired test as the main table's, '—' with a footnote where a run has no
    per-user file."""
    rng = np.random.default_rng(5)
    base = [rng.integers(0, 15, 12) for _ in range(2)]
    new = [np.maximum(r - rng.integers(0, 6, 12), 0) for r in base]
    recs = _runs(tmp_path, base, new)
    for r in recs:
        r.update(group="baselines", label="plain" if r["method"] == "none" else "augmented")
        ex.append_jsonl(tmp_path / "runs.jsonl", r)
    text = ex.write_report(tmp_path, "cmd").read_text()
    table = text.split("### Test, protocol `uni100`")[1].split("\n\n")[1]
    header, _, first, second = table.splitlines()[:4]
    assert "p NDCG@10 vs first row (overall / tail / medium / head)" in header
    p_col = [c.strip() for c in header.strip("|").split("|")].index(
        "p NDCG@10 vs first row (overall / tail / medium / head)")
    cell = lambda row: [c.strip() for c in row.strip("|").split("|")][p_col]  # noqa: E731
    groups = (range(12), range(4), range(4, 8), range(8, 12))
    assert first.startswith("| plain |") and cell(first) == ""
    assert cell(second) == " / ".join(_expected(base, new, "ndcg", g) for g in groups)
    assert "—" not in cell(second) and "p-values need runs" not in text

    del recs[1]["per_user"]  # plain, seed 43
    (tmp_path / "runs.jsonl").unlink()
    for r in recs:
        ex.append_jsonl(tmp_path / "runs.jsonl", r)
    text = ex.write_report(tmp_path, "cmd").read_text()
    second = text.split("### Test, protocol `uni100`")[1].split("\n\n")[1].splitlines()[3]
    assert cell(second).endswith("(seeds with per-user ranks: 42)")
    assert "1 of the 4 runs compared here were recorded without them" in text
