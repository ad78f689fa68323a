"""P-values of the main table's gains: each run's per-user test ranks (its ``per_user.npz``, named by the ``per_user``
path of its record in ``runs.jsonl``), the runs of two table rows paired by seed, their users by token, and
:func:`~recbole_llmser.experiments.stats.paired_test` over the users.

A record without ``per_user`` (recorded before runs kept per-user ranks) or whose file is gone gives no p-value:
its cells read ``—`` and :func:`missing_note` says why under the table."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from recbole_llmser.evaluation import read_per_user, row_metrics, users_file_of
from recbole_llmser.experiments.stats import PairedTest, fmt_p, paired_test

#: The split the p-values are about (the tables show test metrics).
SPLIT = "test"


def per_user_file(record):
    """The record's per-user file when it exists and reads (a relative path is read from the current directory;
    a compact copy needs its users file too), else None."""
    path = record.get("per_user")
    if not path or not Path(path).is_file():
        return None
    try:
        users_file = users_file_of(path)
    except (OSError, ValueError):
        return None
    if users_file is not None and not users_file.is_file():
        return None
    return Path(path)


@functools.lru_cache(maxsize=32)  # a Beauty-sized file is ~1 MB in memory
def _read(path: str, mtime_ns: int, size: int) -> dict:
    return read_per_user(path)


def load_per_user(path) -> dict:
    """:func:`~recbole_llmser.evaluation.read_per_user`, read once per file version within a process."""
    st = os.stat(path)
    return _read(str(path), st.st_mtime_ns, st.st_size)


def user_values(data: dict, protocol: str, metric: str):
    """(user tokens, group indices, per-user ``metric`` (``hit@k`` / ``ndcg@k``)) of the test split under
    ``protocol``; None when the file has no such protocol."""
    split = data["splits"].get(SPLIT) or {}
    ranks = split.get("ranks", {}).get(protocol)
    if ranks is None:
        return None
    name, _, k = metric.partition("@")
    hit, ndcg = row_metrics(ranks, int(k))
    return split["user"], split["group"], {"hit": hit, "ndcg": ndcg}[name]


def _aligned(columns, common):
    """Each ``(users, values)`` of ``columns`` reordered to the users ``common`` (all of which it holds)."""
    out = []
    for users, values in columns:
        order = np.argsort(users, kind="stable")
        out.append(values[order][np.searchsorted(users[order], common)])
    return out


def pair_values(pairs, protocol: str, metric: str, group=None):
    """``(base arrays, new arrays)``: per seed, the per-user ``metric`` of the base and the new run of a pair of
    per-user files, on the users all of them hold (in one order), kept to ``group`` (a group name; None: all)."""
    loaded = [(load_per_user(b), load_per_user(n)) for b, n in pairs]
    cols = [user_values(d, protocol, metric) for pair in loaded for d in pair]
    if not cols or any(c is None for c in cols):
        return None
    common = functools.reduce(np.intersect1d, [c[0] for c in cols])
    first_users, first_groups, _ = cols[0]
    values = _aligned([(c[0], c[2]) for c in cols], common)
    if group is not None:
        names = loaded[0][0]["group_names"]
        if group not in names:
            return None
        groups = _aligned([(first_users, first_groups)], common)[0]
        values = [v[groups == names.index(group)] for v in values]
    return values[0::2], values[1::2]


def gain_test(pairs, protocol: str, metric: str, group=None):
    """:class:`~recbole_llmser.experiments.stats.PairedTest` of the new runs against the base runs (``pairs`` of
    per-user files, one per seed); None without pairs or values."""
    if not pairs:
        return None
    values = pair_values(pairs, protocol, metric, group)
    return None if values is None else paired_test(*values)


def seed_pairs(base, new):
    """``(pairs of per-user files, seeds)`` of the records of two rows: one pair per seed both rows have and both
    runs of which kept a per-user file (sorted by seed)."""
    by_seed = {r["seed"]: r for r in base}
    pairs, seeds = [], []
    for r in sorted(new, key=lambda r: r["seed"]):
        b = by_seed.get(r["seed"])
        if b is None:
            continue
        files = (per_user_file(b), per_user_file(r))
        if None not in files:
            pairs.append(files)
            seeds.append(r["seed"])
    return pairs, seeds


def pvalue_cells(base, new, protocol: str, cols) -> tuple:
    """(row label suffix, cells) of a p-value row: one cell per table column ``(title, group, metric)``; the
    suffix names the seeds used when some of the seeds both rows have lack a per-user file on either side."""
    pairs, seeds = seed_pairs(base, new)
    shared = {r["seed"] for r in base} & {r["seed"] for r in new}
    label = f" (seeds with per-user ranks: {', '.join(map(str, seeds))})" if pairs and set(seeds) != shared else ""
    cells = []
    for _, group, metric in cols:
        test = gain_test(pairs, protocol, metric, group)
        cells.append(fmt_p(test.p if isinstance(test, PairedTest) else None))
    return label, cells


def missing_note(records) -> str:
    """The footnote under a table with p-value rows when some of its runs kept no per-user file ('' when all
    did)."""
    before = [r for r in records if not r.get("per_user")]
    gone = [r for r in records if r.get("per_user") and per_user_file(r) is None]
    if not before and not gone:
        return ""
    how_many = lambda rs: "all" if len(rs) == len(records) else f"{len(rs)} of the"  # noqa: E731
    why = []
    if before:
        why.append(f"{how_many(before)} {len(records)} runs compared here were recorded without them")
    if gone:
        why.append(f"the per-user file of {len(gone)} of them is no longer where their record says (e.g. "
                   f"`{gone[0]['per_user']}`)")
    return ("\n\n`—` in a `p-value` row: p-values need runs that keep per-user ranks (`per_user/<run id>.npz` "
            "beside `runs.jsonl`); " + "; ".join(why) + ". `--rerun_missing_ranks` runs them again.")
