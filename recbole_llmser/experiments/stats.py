"""The report's arithmetic: means and sample standard deviations over seeds, relative gains on the seeds two rows
share, metric look-up in a run record, the row that validation chooses, the paired test of two rows' per-user
values, and number formatting."""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple, Optional

import numpy as np


def mean_std(values):
    """(mean, sample standard deviation (ddof=1; None for one value), n) of the non-missing values;
    (None, None, 0) when there is none."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(vals)
    if n == 0:
        return None, None, 0
    mean = sum(vals) / n
    if n == 1:
        return mean, None, 1
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)), n


def relative_gain(base, new):
    """Relative change of ``new`` over ``base`` in percent, ``(new - base) / base * 100``; None when either is
    missing or ``base`` is 0."""
    if base is None or new is None or base == 0:
        return None
    return (new - base) / base * 100.0


def fmt_mean_std(mean, std, digits: int = 4) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def fmt_gain(gain) -> str:
    return "—" if gain is None else f"{gain:+.1f}%"


def metric_value(record: dict, split: str, protocol: str, metric: str, group=None):
    """``record[split][protocol]`` overall (``group=None``) or the named group's ``metric``; None if absent."""
    res = (record.get(split) or {}).get(protocol)
    if not res:
        return None
    if group is None:
        return (res.get("overall") or {}).get(metric)
    for g in res.get("groups") or []:
        if g.get("name") == group:
            return g.get(metric)
    return None


def aggregate(records, split, protocol, metric, group=None):
    """(mean, std, n) of one metric over ``records`` (typically the seeds of one table row)."""
    return mean_std(metric_value(r, split, protocol, metric, group) for r in records)


def matched_seeds(base, new):
    """``(label, base, new)``: both lists of run records kept to the seeds both have, so a gain compares like with
    like; ``label`` is empty when their seeds already agree, else names the shared seeds (``"none"`` if none)."""
    base_seeds, new_seeds = {r["seed"] for r in base}, {r["seed"] for r in new}
    if base_seeds == new_seeds:
        return "", base, new
    common = base_seeds & new_seeds
    names = ", ".join(str(s) for s in sorted(common)) or "none"
    return (f" (seeds both have: {names})", [r for r in base if r["seed"] in common],
            [r for r in new if r["seed"] in common])


def group_rows(items, key):
    """Ordered ``{key(item): [items]}`` in order of first appearance."""
    rows = {}
    for item in items:
        rows.setdefault(key(item), []).append(item)
    return rows


def entry_records(entries) -> list:
    """The distinct run records of table entries ``(record, group, label, x)`` (by id, first-seen order): a run
    listed twice counts once."""
    return list({e[0]["id"]: e[0] for e in entries}.values())


def protocols_of(records) -> list:
    """Protocols present in the records' test results, in first-seen order."""
    out = []
    for r in records:
        for p in r.get("test") or {}:
            if p not in out:
                out.append(p)
    return out


def group_info(records, protocol) -> list:
    """[(name, range, n)] of the user-length groups, n = the most common test size across the records."""
    names, ranges, sizes = [], {}, {}
    for r in records:
        res = (r.get("test") or {}).get(protocol) or {}
        for g in res.get("groups") or []:
            if g["name"] not in names:
                names.append(g["name"])
            ranges.setdefault(g["name"], g.get("range", ""))
            sizes.setdefault(g["name"], Counter())[g.get("n")] += 1
    return [(n, ranges[n], sizes[n].most_common(1)[0][0]) for n in names]


def overall_n(records, protocol):
    c = Counter(((r.get("test") or {}).get(protocol) or {}).get("overall", {}).get("n") for r in records)
    return c.most_common(1)[0][0] if c else None


def _sort_x(x):
    return (0, float(x), "") if isinstance(x, (int, float)) and not isinstance(x, bool) else (1, 0.0, str(x))


def selection_protocol(records) -> str:
    """The protocol whose validation NDCG@10 chooses between table rows: ``full`` (the trainer's model-selection
    protocol) when present, else the first protocol of the records."""
    valid = [p for r in records for p in (r.get("valid") or {})]
    return "full" if "full" in valid else (valid[0] if valid else "full")


def validation_choice(row_records, protocol):
    """Index of the row (a list of run records, one per seed) with the highest mean overall validation NDCG@10
    under ``protocol``; the first such row on a tie, None when no row has a validation value."""
    best, best_value = None, None
    for i, rs in enumerate(row_records):
        value = aggregate(rs, "valid", protocol, "ndcg@10")[0]
        if value is not None and (best_value is None or value > best_value):
            best, best_value = i, value
    return best


def stopped_at_cap(record) -> bool:
    """Whether the run trained up to its ``epochs`` cap and kept the checkpoint of its last epoch."""
    cap = (record.get("settings") or {}).get("epochs")
    trained, kept = record.get("epochs_trained"), record.get("best_epoch")
    return None not in (cap, trained, kept) and trained >= cap and kept == trained


class PairedTest(NamedTuple):
    """What :func:`paired_test` returns: the mean per-user difference ``new - base``, its two-sided p-value (None
    with fewer than two users) and the number of users."""

    diff: float
    p: Optional[float]
    n: int


def paired_test(base, new) -> PairedTest:
    """Two-sided paired t-test over users of ``new`` against ``base``.

    ``base`` and ``new`` are per-user metric values (e.g. NDCG@10): one 1-D array, or a list of them, one per seed,
    each holding the same users in the same order; seed i of ``base`` is paired with seed i of ``new``. Each user's
    value is averaged over the seeds on each side, and ``scipy.stats.ttest_rel`` tests whether the mean of the
    per-user differences is 0.

    Why a paired t-test over users: the users are the sample the test metric is a mean over, and pairing each user
    with itself removes what the two runs share (how hard the user's target is); with the thousands of test users
    of a real dataset the mean difference is close to normal, so the t-test agrees with a paired bootstrap while
    being exact arithmetic (a report regenerates the same p-values) and instant. It does not include the spread
    between training seeds beyond averaging over them: it tells whether these trained models differ on these
    users, the ± over seeds tells how much training randomness moves the mean.

    Degenerate differences, where the t statistic is undefined: all 0 gives p = 1, one and the same nonzero value
    for every user (up to rounding) gives p = 0."""
    base = np.atleast_2d(np.asarray(base, dtype=np.float64))
    new = np.atleast_2d(np.asarray(new, dtype=np.float64))
    if base.shape != new.shape:
        raise ValueError(f"paired_test: base {base.shape} and new {new.shape} differ in seeds or users")
    b, a = base.mean(axis=0), new.mean(axis=0)
    d = a - b
    n = int(d.size)
    if n == 0:
        return PairedTest(float("nan"), None, 0)
    diff = float(d.mean())
    if n < 2:
        return PairedTest(diff, None, n)
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))  # rounding: (x + 0.1) - x is not 0.1 for every x
    if float(np.ptp(d)) <= tolerance:
        return PairedTest(diff, 1.0 if abs(diff) <= tolerance else 0.0, n)
    from scipy.stats import ttest_rel

    return PairedTest(diff, float(ttest_rel(a, b).pvalue), n)


def fmt_p(p) -> str:
    """A p-value cell: ``—`` when there is none, ``<0.001`` below 0.001, else three decimals."""
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
