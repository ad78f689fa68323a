"""The report's PNG plots (matplotlib, Agg backend): grouped bars of the main table, one line chart per sweep."""

from __future__ import annotations

import importlib.util
import io
import re

from recbole_llmser.experiments.stats import aggregate, entry_records, group_info, group_rows
from recbole_llmser.experiments.tables import sweep_series
from recbole_llmser.utils import atomic_file

PLOT_METRIC = ("ndcg@10", "NDCG@10")


def _slug(text) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def main_png(protocol) -> str:
    """File name of the main table's plot for ``protocol``."""
    return f"main_ndcg10_{_slug(protocol)}.png"


def sweep_png(prop, protocol) -> str:
    """File name of the sweep plot of property ``prop`` for ``protocol``."""
    return f"sweep_{_slug(prop)}_ndcg10_{_slug(protocol)}.png"


def _savefig(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    with atomic_file(path, "wb") as f:
        f.write(buf.getvalue())


def _seeds(n) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def _yerr(stds):
    return None if all(s is None for s in stds) else [s or 0.0 for s in stds]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_main(entries, protocol, path) -> None:
    """Grouped bars: x = overall + user-length groups, one bar per (backbone, method), NDCG@10 mean ± std."""
    plt = _pyplot()
    recs = entry_records(entries)
    groups = [None] + [g[0] for g in group_info(recs, protocol)]
    labels = ["overall"] + [f"{n} {r}\n(n={c})" for n, r, c in group_info(recs, protocol)]
    series = group_rows(entries, lambda e: (e[0]["model"], e[0]["method"]))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 0.3 * len(series)), 4))
    for i, ((model, method), group) in enumerate(series.items()):
        rs = entry_records(group)
        stats = [aggregate(rs, "test", protocol, PLOT_METRIC[0], g) for g in groups]
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [s[0] or 0 for s in stats], width, yerr=_yerr([s[1] for s in stats]), capsize=2,
               label=f"{model} {method} ({_seeds(len(rs))})", hatch=None if method == "none" else "//",
               edgecolor="black", lw=0.4)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(labels)
    ax.set_ylabel(f"test {PLOT_METRIC[1]} ({protocol})")
    ax.set_title(f"{PLOT_METRIC[1]} per user-length group ({protocol}; mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=2)
    _savefig(fig, path)
    plt.close(fig)


def plot_sweep(entries, protocol, prop, path) -> None:
    """One line per user-length group (and overall): NDCG@10 mean ± std against the swept value."""
    plt = _pyplot()
    series = sweep_series(entries, protocol, PLOT_METRIC[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for pts in series.values() for x, _ in pts)
    for (model, method), points in series.items():
        names = list(points[0][1]) if points else []
        for name in names:
            xs = [x if numeric else str(x) for x, _ in points]
            ys = [p[name][0] for _, p in points]
            es = _yerr([p[name][1] for _, p in points])
            prefix = f"{model} {method}: " if len(series) > 1 else ""
            ax.errorbar(xs, [y if y is not None else float("nan") for y in ys], yerr=es, marker="o", capsize=2,
                        label=prefix + name, lw=2 if name == "overall" else 1)
            if name == "overall":  # how many seeds each point averages (a sweep may mix 3-seed and 1-seed points)
                for x, y, (_, p) in zip(xs, ys, points):
                    if y is not None:
                        ax.annotate(_seeds(p[name][2]), (x, y), textcoords="offset points", xytext=(0, 6),
                                    ha="center", fontsize=7)
    ax.set_xlabel(prop)
    ax.set_ylabel(f"test {PLOT_METRIC[1]} ({protocol})")
    ax.set_title(f"sweep of {prop} ({protocol}; mean ± std over seeds)")
    ax.legend(fontsize=8)
    _savefig(fig, path)
    plt.close(fig)


def write_figures(results_dir, figures, by_group):
    """Draw ``figures`` (``(kind, protocol, png, extra)``) into ``results_dir``; returns a note for the report
    when matplotlib is missing, else None."""
    if importlib.util.find_spec("matplotlib") is None:
        return "Plots were not written: matplotlib is not installed (`pip install matplotlib`)."
    for kind, protocol, png, extra in figures:
        if kind == "main":
            plot_main(by_group["main"], protocol, results_dir / png)
        else:
            plot_sweep(extra[0], protocol, extra[1], results_dir / png)
    return None
