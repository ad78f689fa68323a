"""The report's markdown tables: main (backbone x method), labelled (ablations and other groups), sweeps, cost
and the list of runs. Table entries are ``(record, group, label, x)``."""

from __future__ import annotations

import json

from recbole_llmser.experiments.plan import METHOD_CHOICES, format_overrides
from recbole_llmser.experiments.significance import missing_note, pvalue_cells
from recbole_llmser.experiments.stats import (
    _sort_x, aggregate, entry_records, fmt_gain, fmt_mean_std, group_info, group_rows, matched_seeds, mean_std,
    metric_value, overall_n, relative_gain, selection_protocol, validation_choice,
)

#: Metrics in the tables: (key in the result dict, column name).
METRICS = (("hit@10", "HR@10"), ("ndcg@10", "NDCG@10"))


def md_table(header, rows) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mixed_rows(rows: dict) -> list:
    """Keys of table rows whose runs differ in more than the seed (different overrides)."""
    return [k for k, group in rows.items()
            if len({json.dumps(r.get("overrides") or {}, sort_keys=True, default=str)
                    for r in entry_records(group)}) > 1]


def _mix_note(rows: dict) -> str:
    mixed = mixed_rows(rows)
    if not mixed:
        return ""
    names = "; ".join(" ".join(str(x) for x in k if x is not None) for k in mixed)
    return (f"\n\n**Warning**: row(s) {names} average runs with different overrides; give them distinct labels or "
            "groups in the plan.")


def _columns(records, protocol):
    """[(column title, group name or None, metric)] for overall + each group, with ranges and sizes."""
    cols = []
    n = overall_n(records, protocol)
    for key, name in METRICS:
        cols.append((f"{name} overall (n={n})", None, key))
    for gname, grange, gn in group_info(records, protocol):
        for key, name in METRICS:
            cols.append((f"{name} {gname} {grange} (n={gn})", gname, key))
    return cols


def _choice_cells(row_records, protocol):
    chosen = validation_choice(row_records, protocol)
    return ["✓" if i == chosen else "" for i in range(len(row_records))]


def _row_cells(rs, protocol, cols) -> list:
    """Valid NDCG@10 then the test cells of one row's records (mean ± std over its seeds)."""
    v = aggregate(rs, "valid", protocol, "ndcg@10")
    return [fmt_mean_std(v[0], v[1])] + [fmt_mean_std(*aggregate(rs, "test", protocol, key, g)[:2])
                                         for _, g, key in cols]


def main_table(entries, protocol):
    """Markdown table of the ``main`` group for ``protocol``: rows backbone × method (mean ± std over seeds),
    per backbone and method a gain row (over none, on the means over the seeds both rows have) and a p-value row
    (:func:`_comparison_rows`), validation NDCG@10 beside test; a footnote when runs lack per-user ranks."""
    rows_by_key = group_rows(entries, lambda e: (e[0]["model"], e[0]["method"]))
    cols = _columns(entry_records(entries), protocol)
    header = ["backbone", "method", "seeds", "valid NDCG@10"] + [c[0] for c in cols]
    rows, compared = [], {}  # compared: the runs of the gain rows, by id
    for model in list(dict.fromkeys(k[0] for k in rows_by_key)):
        for method in METHOD_CHOICES:
            group = rows_by_key.get((model, method))
            if group:
                rs = entry_records(group)
                rows.append([model, method, len(rs)] + _row_cells(rs, protocol, cols))
        for method in METHOD_CHOICES[1:]:
            if (model, "none") in rows_by_key and (model, method) in rows_by_key:
                base, new = (entry_records(rows_by_key[(model, m)]) for m in ("none", method))
                rows += _comparison_rows(model, method, base, new, protocol, cols)
                compared.update({r["id"]: r for r in base + new})
    return md_table(header, rows) + _mix_note(rows_by_key) + missing_note(list(compared.values()))


def _comparison_rows(model, method, base, new, protocol, cols) -> list:
    """The gain row of ``method`` over ``none`` (relative change of the means over the seeds both rows have) and
    its p-value row (paired t-test over users, runs paired by seed: :func:`~recbole_llmser.experiments.significance.
    pvalue_cells`)."""
    label, base_m, new_m = matched_seeds(base, new)
    gains = [fmt_gain(relative_gain(aggregate(base_m, "test", protocol, k, g)[0],
                                    aggregate(new_m, "test", protocol, k, g)[0])) for _, g, k in cols]
    p_label, p_cells = pvalue_cells(base_m, new_m, protocol, cols)
    return [[model, f"gain {method} vs none{label}", "", ""] + gains,
            [model, f"p-value {method} vs none{p_label}", "", ""] + p_cells]


def labelled_table(entries, protocol):
    """Rows = (label, backbone, method) in plan order; columns = valid NDCG@10, test metrics overall and per
    group; plus the relative change of overall NDCG@10 against the first row (over the seeds both rows have), the
    p-values of the NDCG@10 differences against the first row (overall and per group, :func:`~recbole_llmser.
    experiments.significance.pvalue_cells`) and the row validation chooses."""
    recs = entry_records(entries)
    rows_by_key = group_rows(entries, lambda e: (e[2] or f"{e[0]['model']} {e[0]['method']}", e[0]["model"],
                                                 e[0]["method"]))
    cols = _columns(recs, protocol)
    p_cols = [c for c in cols if c[2] == "ndcg@10"]  # overall, then each group
    p_title = "p NDCG@10 vs first row (" + " / ".join(g or "overall" for _, g, _ in p_cols) + ")"
    header = (["variant", "backbone", "method", "seeds", "valid NDCG@10"] + [c[0] for c in cols]
              + ["Δ NDCG@10 vs first row", p_title, "chosen on validation"])
    rows, ref, compared = [], None, {}
    chosen = _choice_cells([entry_records(g) for g in rows_by_key.values()], selection_protocol(recs))
    for ((label, model, method), group), choice in zip(rows_by_key.items(), chosen):
        rs = entry_records(group)
        if ref is None:
            ref, delta, p_cell = rs, "reference", ""
        else:
            seeds, base, new = matched_seeds(ref, rs)
            delta = fmt_gain(relative_gain(aggregate(base, "test", protocol, "ndcg@10")[0],
                                           aggregate(new, "test", protocol, "ndcg@10")[0])) + seeds
            p_label, p_cells = pvalue_cells(base, new, protocol, p_cols)
            p_cell = " / ".join(p_cells) + p_label
            compared.update({r["id"]: r for r in base + new})
        rows.append([label, model, method, len(rs)] + _row_cells(rs, protocol, cols) + [delta, p_cell, choice])
    return md_table(header, rows) + _mix_note(rows_by_key) + missing_note(list(compared.values()))


def sweep_series(entries, protocol, metric="ndcg@10"):
    """``{(model, method): [(x, {group or 'overall': (mean, std, n)})]}`` sorted by x."""
    out = {}
    by_key = group_rows(entries, lambda e: (e[0]["model"], e[0]["method"], json.dumps(e[3])))
    recs = entry_records(entries)
    names = [None] + [g[0] for g in group_info(recs, protocol)]
    for (model, method, xj), group in by_key.items():
        rs = entry_records(group)
        point = {(n or "overall"): aggregate(rs, "test", protocol, metric, n) for n in names}
        out.setdefault((model, method), []).append((json.loads(xj), point))
    for k in out:
        out[k].sort(key=lambda p: _sort_x(p[0]))
    return out


def sweep_table(entries, protocol, prop):
    recs = entry_records(entries)
    by_key = group_rows(entries, lambda e: (e[0]["model"], e[0]["method"], json.dumps(e[3])))
    cols = _columns(recs, protocol)
    header = ["backbone", "method", prop, "seeds", "valid NDCG@10"] + [c[0] for c in cols] + ["chosen on validation"]
    ordered = sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1], _sort_x(json.loads(kv[0][2]))))
    series = group_rows(ordered, lambda kv: kv[0][:2])  # one choice per (backbone, method) curve
    chosen = [c for items in series.values()
              for c in _choice_cells([entry_records(g) for _, g in items], selection_protocol(recs))]
    rows = []
    for ((model, method, xj), group), choice in zip(ordered, chosen):  # ordered lists the curves one after another
        rs = entry_records(group)
        rows.append([model, method, json.loads(xj), len(rs)] + _row_cells(rs, protocol, cols) + [choice])
    return md_table(header, rows) + _mix_note(by_key)


def _num(values, digits=1):
    m = mean_std(values)[0]
    return "—" if m is None else f"{m:,.{digits}f}"


def cost_table(entries):
    """Per distinct configuration (backbone, method, overrides; seeds averaged): stage times, LLM use, memory."""
    recs = list({e[0]["id"]: e for e in entries}.values())
    by_key = group_rows(recs, lambda e: (e[0]["model"], e[0]["method"],
                                         json.dumps(e[0].get("overrides") or {}, sort_keys=True, default=str)))
    header = ["variant", "backbone", "method", "runs", "backend", "CCG s", "SNF s", "ARV s", "train+eval s",
              "wall s", "CPU s", "LLM calls", "prompt tokens", "completion tokens", "peak RSS GiB", "peak GPU GiB",
              "artifact reused"]
    rows = []
    for (model, method, _), group in by_key.items():
        rs = entry_records(group)
        label = next((e[2] for e in group if e[2]), f"{model} {method}")
        rows.append([label, model, method, len(rs)] + _cost_cells(rs))
    return md_table(header, rows)


def _cost_cells(rs) -> list:
    """The cost table's cells from ``backend`` on, for the records of one configuration."""
    # a resumed run's times cover only its last attempt; a run recorded from its finished folder trained nothing
    whole = [r for r in rs if not (r.get("resumed_at_epoch") or r.get("finished_earlier"))]
    augs = [r.get("aug") or {} for r in rs]
    t = lambda k: [a.get("timings_s", {}).get(k) for a in augs]  # noqa: E731
    # "SNF s" keeps its meaning across records: summaries since the split time item vectors apart from SNF
    snf = [s + (a.get("timings_s", {}).get("item_vectors") or 0) if s is not None else None
           for s, a in zip(t("snf"), augs)]
    llm = [a.get("llm") or {} for a in augs]
    backends = sorted({a.get("backend") for a in augs if a.get("backend")})
    gpu = [r.get("peak_gpu_mb") for r in rs]
    return [
        ", ".join(backends) or "—",
        _num(t("ccg")), _num(snf), _num(t("arv")), _num([r.get("train_eval_s") for r in whole]),
        _num([r.get("wall_s") for r in whole]), _num([r.get("cpu_s") for r in whole]),
        _num([x.get("calls") for x in llm], 0) if any(llm) else "—",
        _num([x.get("prompt_tokens") for x in llm], 0) if any(llm) else "—",
        _num([x.get("completion_tokens") for x in llm], 0) if any(llm) else "—",
        _num([(r.get("peak_rss_mb") or 0) / 1024 for r in rs], 2),
        _num([g / 1024 for g in gpu if g is not None], 2) if any(g is not None for g in gpu) else "—",
        f"{sum(1 for a in augs if a.get('reused'))}/{sum(1 for a in augs if a)}" if any(augs) else "—",
    ]


def _epochs_cell(record) -> str:
    """``kept / trained / cap`` epochs of a run (1-based; the kept checkpoint is the one evaluated on test)."""
    if record.get("epochs_trained") is None:
        return "—"  # recorded before this field existed
    cap = (record.get("settings") or {}).get("epochs")
    kept = record.get("best_epoch")
    return f"{'—' if kept is None else kept} / {record['epochs_trained']} / {'—' if cap is None else cap}"


def runs_table(records, entries, protocols, valid_metric) -> str:
    """Every finished run: id, axes, the tables that list it, overrides, kept epochs, test NDCG@10, cost."""
    tables = {}
    for rec, group, label, _x in entries:
        tables.setdefault(rec["id"], []).append(group + (f" [{label}]" if label else ""))
    header = ["id", "backbone", "method", "seed", "tables", "overrides", f"best valid {valid_metric} (trainer)",
              "kept epoch / trained / cap"] + \
             [f"test NDCG@10 {p}" for p in protocols] + ["wall s", "peak RSS MiB", "finished"]
    rows = [[r["id"], r["model"], r["method"], r["seed"],
             "; ".join(dict.fromkeys(tables.get(r["id"], []))) or "— (in no plan)",
             format_overrides(r.get("overrides") or {}),
             "—" if r.get("best_valid_score") is None else f"{r['best_valid_score']:.4f}", _epochs_cell(r)]
            + [fmt_mean_std(metric_value(r, "test", p, "ndcg@10"), None) for p in protocols]
            + [f"{r.get('wall_s', 0):.1f}", f"{r.get('peak_rss_mb') or 0:.0f}", r.get("finished", "")]
            for r in records]
    return md_table(header, rows)
