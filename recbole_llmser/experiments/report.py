"""``report.md`` of a results folder, regenerated from its ``runs.jsonl`` (and its recorded plans): one small
function per section, :func:`write_report` puts them together and draws the plots."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from recbole_llmser.evaluation import shared_rows_line
from recbole_llmser.experiments.plots import main_png, sweep_png, write_figures
from recbole_llmser.experiments.stats import (
    entry_records, group_rows, protocols_of, selection_protocol, stopped_at_cap,
)
from recbole_llmser.experiments.store import FAILURES, REPORT, RUNS, load_runs, read_jsonl, recorded_plans
from recbole_llmser.experiments.tables import cost_table, labelled_table, main_table, runs_table, sweep_table
from recbole_llmser.utils import atomic_write_text

BACKEND_NOTES = {
    "llm": "an OpenAI-compatible LLM endpoint answered SNF and ARV",
    "offline": "no LLM endpoint: the offline stand-in (candidates ranked by title-embedding similarity to the "
               "user's history, `OfflineRanker`) replaced the LLM in SNF and ARV",
    "model": "the dataset has no item text: the forward helper model's scores replaced the LLM in SNF and ARV",
    "lm_score": "a local causal LM ranked SNF's and ARV's candidates by the length-normalised log-likelihood of their "
                "titles after the user's history (no generation)",
}


def membership(results_dir, records):
    """(table entries ``(record, group, label, x)``, recorded plans, orphan records).

    With recorded plans (``plans/*.json``), the tables hold exactly the runs those plans list, in plan order (a
    run may be listed in several groups); a record no plan lists any more (its plan entry changed, so the changed
    spec ran under a new id) is an orphan: listed under Runs, never averaged into a table. Without any recorded
    plan every record goes to the group and label it was run under."""
    by_id = {r["id"]: r for r in records}
    plans = recorded_plans(results_dir)
    if not plans:
        return [(r, r.get("group") or "main", r.get("label"), r.get("x")) for r in records], [], []
    entries, seen, listed = [], set(), set()
    for plan in plans:
        for s in plan.get("specs", []):
            listed.add(s["id"])
            rec = by_id.get(s["id"])
            key = (s["id"], s.get("group"), s.get("label"), json.dumps(s.get("x")))
            if rec is None or key in seen:
                continue
            seen.add(key)
            entries.append((rec, s.get("group") or "main", s.get("label"), s.get("x")))
    return entries, plans, [r for r in records if r["id"] not in listed]


def _valid_metric(records) -> str:
    c = Counter((r.get("settings") or {}).get("valid_metric") or "NDCG@10" for r in records)
    return c.most_common(1)[0][0]


def _intro(results_dir, records, bad, n_open_failures, command) -> list:
    datasets = sorted({r.get("dataset") for r in records if r.get("dataset")})
    title = ", ".join(datasets) or results_dir.name
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = [f"# Experiment report: {title}", ""]
    out.append(f"Generated {now} from `{RUNS}` in this folder ({len(records)} finished runs"
               + (f"; {bad} unreadable line(s) skipped" if bad else "")
               + f"; {n_open_failures} run(s) with failed attempts and no success yet, see `{FAILURES}`). "
               "Every number below is read from `runs.jsonl`.")
    out.append("")
    if command:
        out += [f"Report written by: `{command}`", ""]
    out += _shared_rows_note(records)
    return out


def _shared_rows_note(records) -> list:
    """A paragraph when the latest run that checked says the dataset's validation rows largely repeat a few
    (history, target) pairs (:func:`~recbole_llmser.evaluation.shared_rows`); [] otherwise."""
    checked = [r for r in records if isinstance(r.get("shared_rows"), dict)]
    if not checked:
        return []
    latest = max(checked, key=lambda r: r.get("finished") or "")
    valid = latest["shared_rows"].get("valid") or {}
    if not valid.get("pairs"):
        return []
    return [f"**Validation rows repeat a few (history, target) pairs** ({latest['dataset']}, run "
            f"`{latest['id']}`) — {shared_rows_line('validation', valid['pairs'], valid['n_rows'])}. Read "
            "`valid NDCG@10` and `chosen on validation` with that in mind.", ""]


def _plans_section(plans, orphans, done) -> list:
    out = []
    for p in plans:
        n_specs = len({s["id"] for s in p.get("specs", [])})
        n_done = len({s["id"] for s in p.get("specs", [])} & done)
        out.append(f"* plan `{p.get('name')}`: runs produced by `{p.get('command')}` ({n_done} of {n_specs} runs "
                   f"done); common overrides: `{json.dumps(p.get('common') or {}, default=str)}`")
    if plans:
        out.append("")
    if orphans:
        out += [f"{len(orphans)} run(s) in `runs.jsonl` are listed by no recorded plan (their plan entry changed, so "
                "the changed spec ran under a new id, or the plan's `plans/*.json` was removed); they are under Runs "
                "and left out of every table.", ""]
    return out


def _reading_guide(records, valid_metric) -> list:
    return ["## How to read this report", "",
            "* Split: leave-one-out by time (last item = test, the one before = validation). Metrics at cut-off 10: "
            "HR@10 and NDCG@10, for each test protocol present: `uni<N>` = the target ranked against N negatives "
            "sampled uniformly from items the user never interacted with (the LLMSeR paper's protocol), `full` = "
            "against all items.",
            f"* **Model selection uses validation metrics only**: early stopping and the checkpoint kept use "
            f"validation {valid_metric} (RecBole's trainer, full ranking); the test split is evaluated once, on that "
            "checkpoint. The `valid NDCG@10` column (same protocol as the test columns) is shown beside test. "
            "`kept epoch / trained / cap` (runs table, 1-based): the epoch of that checkpoint, the epochs trained and "
            "the `epochs` cap; a run that kept its last epoch at the cap was still improving when it stopped.",
            f"* `chosen on validation` marks, in each ablation table and each sweep curve, the row with the highest "
            f"mean overall validation NDCG@10 under `{selection_protocol(records)}` ranking: the setting a user "
            "choosing on validation only would keep (the same row in every protocol's table; each row's mean is over "
            "its own seeds, see `seeds`).",
            "* Cells are mean ± sample standard deviation (n − 1) over the seeds in the `seeds` column; one seed "
            "shows the value only.",
            "* `gain <method> vs none` = (mean method − mean none) / mean none × 100, same backbone, protocol and "
            "column; `Δ NDCG@10 vs first row` likewise against a table's first row. Both means are over the seeds the "
            "two rows share (named in the cell when one row has seeds the other lacks).",
            "* `p-value <method> vs none` (main tables) and `p NDCG@10 vs first row` (the other tables, overall / "
            "each group): two-sided paired t-test (`scipy.stats.ttest_rel`) over the "
            "test users of the column's group, of each user's HR@10 or NDCG@10 under that protocol, averaged over the "
            "seeds both rows have (runs paired by seed, so `uni<N>` compares the same sampled negatives; users paired "
            "with themselves). It asks whether the difference is larger than the spread between users explains for "
            "these trained models; the spread between seeds (the ± above) is not part of it, and the many cells are "
            "not corrected for multiple comparisons. It needs the runs' per-user ranks (`per_user/<run id>.npz` in "
            "this folder); `—` where a run has none.",
            "* User-length groups count training items (sequence minus validation and test items), never pseudo "
            "items; each column names the group's range and its number of test users.",
            ""]


def _backend_section(in_tables) -> list:
    out = ["## Pseudo items: backend", ""]
    aug_recs = [r for r in in_tables if r.get("aug")]
    if not aug_recs:
        return out + ["No LLMSeR run (method `llmser`) is in `runs.jsonl`.", ""]
    by_backend = group_rows(aug_recs, lambda r: (r["aug"].get("backend"), r["aug"].get("llm_model")))
    for (backend, llm_model), rs in by_backend.items():
        note = BACKEND_NOTES.get(backend, "unknown backend")
        model_note = f" (LLM `{llm_model}`)" if llm_model else ""
        out.append(f"* `{backend}`{model_note}: {len(rs)} run(s) — {note}.")
    return out + [""]


def _main_section(by_group, protocols, figures) -> list:
    if "main" not in by_group:
        return []
    out = ["## Main results", ""]
    for p in protocols:
        png = main_png(p)
        figures.append(("main", p, png, None))
        out += [f"### Test, protocol `{p}`", "", main_table(by_group["main"], p), "",
                f"![NDCG@10 per group, {p}]({png})", ""]
    return out


def _group_sections(by_group, protocols) -> list:
    """Ablations and every other labelled group (not main, not a sweep)."""
    out = []
    for gname, group_entries in by_group.items():
        if gname == "main" or gname.startswith("sweep:"):
            continue
        heading = "Ablations" if gname == "ablation" else f"Group `{gname}`"
        models = sorted({e[0]["model"] for e in group_entries})
        out += [f"## {heading} ({', '.join(models)})", ""]
        for p in protocols:
            out += [f"### Test, protocol `{p}`", "", labelled_table(group_entries, p), ""]
    return out


def _sweep_sections(by_group, protocols, figures) -> list:
    out = []
    for gname, group_entries in by_group.items():
        if not gname.startswith("sweep:"):
            continue
        prop = gname[len("sweep:"):]
        out += [f"## Sweep of `{prop}`", ""]
        for p in protocols:
            png = sweep_png(prop, p)
            figures.append(("sweep", p, png, (group_entries, prop)))
            out += [f"### Test, protocol `{p}`", "", sweep_table(group_entries, p, prop), "",
                    f"![NDCG@10 vs {prop}, {p}]({png})", ""]
    return out


def _cost_section(entries, in_tables) -> list:
    if not in_tables:
        return []
    devices = Counter((r.get("env") or {}).get("device_name") or "?" for r in in_tables)
    return ["## Cost", "",
            "Means over seeds. CCG/SNF/ARV: stage times from the augmentation's `summary.json` (when the "
            "artifact was reused from an earlier run with the same augmentation settings, the times are those of "
            "the run that made it, and that run's wall time includes them; `artifact reused` counts such runs). "
            "`train+eval s`: the run minus the augmentation it computed (data loading, training, evaluation). "
            "`wall s`: the whole process. `CPU s`: its user + system CPU time (with its children; unlike wall "
            "time it does not grow while the machine runs other jobs); a run resumed after a stop is left out "
            "of these three (its times cover only its last attempt). Peak RSS: `ru_maxrss` of the run's process "
            "(with its children); peak GPU: `torch.cuda.max_memory_allocated`.", "", cost_table(entries), "",
            "Devices: " + ", ".join(f"{d} ({n} runs)" for d, n in devices.items()) + ".", ""]


def _runs_section(records, entries, valid_metric) -> list:
    if not records:
        return []
    out = ["## Runs", "", runs_table(records, entries, protocols_of(records), valid_metric), ""]
    capped = [r["id"] for r in records if stopped_at_cap(r)]
    if capped:
        out += [f"{len(capped)} of {sum(r.get('best_epoch') is not None for r in records)} runs with a recorded "
                "kept epoch kept their last epoch at the `epochs` cap, i.e. validation was still improving when "
                f"training stopped (more epochs may change them): {', '.join(capped)}.", ""]
    return out


def write_report(results_dir, command=None) -> Path:
    """Regenerate ``report.md`` and the PNGs of ``results_dir`` from its ``runs.jsonl``; returns the report path."""
    results_dir = Path(results_dir)
    records, bad = load_runs(results_dir)
    failures, _ = read_jsonl(results_dir / FAILURES)
    done = {r["id"] for r in records}
    open_failures = {f["id"] for f in failures if f["id"] not in done}
    entries, plans, orphans = membership(results_dir, records)
    in_tables = entry_records(entries)
    by_group = group_rows(entries, lambda e: e[1])
    protocols = protocols_of(in_tables)
    valid_metric = _valid_metric(records) if records else "NDCG@10"
    figures = []  # (kind, protocol, png, extra), filled by the sections that show a plot
    out = (_intro(results_dir, records, bad, len(open_failures), command)
           + _plans_section(plans, orphans, done)
           + _reading_guide(records, valid_metric)
           + _backend_section(in_tables)
           + _main_section(by_group, protocols, figures)
           + _group_sections(by_group, protocols)
           + _sweep_sections(by_group, protocols, figures)
           + _cost_section(entries, in_tables)
           + _runs_section(records, entries, valid_metric))
    plot_note = write_figures(results_dir, figures, by_group)
    if plot_note:
        out += [plot_note, ""]
    path = results_dir / REPORT
    atomic_write_text(path, "\n".join(out))
    return path
