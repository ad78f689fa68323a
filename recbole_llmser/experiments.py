"""Experiment runner: expand a plan of runs, run each in its own process, log results, write the report.

::

    python -m recbole_llmser.experiments experiments/beauty_main.yaml            # run what is not done yet
    python -m recbole_llmser.experiments experiments/beauty_main.yaml --dry_run  # list the runs (done / to do)
    python -m recbole_llmser.experiments experiments/beauty_main.yaml --only GRU4Rec
    python -m recbole_llmser.experiments experiments/beauty_main.yaml --report_only

Plan (YAML)::

    name: beauty_main                 # default: the file's stem
    results_dir: results/{dataset}    # default; '{dataset}' is replaced (appended when several datasets share a plan)
    timeout_s: ~                      # optional wall-clock limit per run (seconds)
    common: {show_progress: false}    # properties applied to every run
    runs:
      - dataset: amazon-beauty
        model: [SASRec, GRU4Rec]      # one name or a list
        method: [none, llmser]        # one or a list
        seeds: [42, 43, 44]
        overrides: {}                 # properties of this entry (win over common)
        group: main                   # main | ablation | sweep:<property> | any other name
        label: ~                      # row name in ablation / other tables
        x: ~                          # sweeps: the swept value (default: overrides[<property>])

Every (dataset, model, method, seed) of an entry is one run. Its id is a hash of (dataset, model, method, seed,
merged overrides without the keys in :data:`NON_SEMANTIC_KEYS`): re-running a plan skips runs whose id is in
``runs.jsonl`` (resume), and a changed spec gets a new id and runs anew. The same spec listed in several entries
or plans (e.g. the paper-default LLMSeR run in the main table, the ablation table and both sweeps) runs once and
appears in every table it is listed in. The tables hold the runs that the recorded plans list; a record whose
plan entry has since changed stays in ``runs.jsonl`` and is listed under Runs, but no table averages it.

Per results folder (``results/<dataset>/``):

* ``runs.jsonl`` — one JSON line per finished run (append = one write + flush + fsync; a torn last line is
  skipped on load);
* ``failures.jsonl`` — one line per failed attempt (error, exit status, stderr tail); a failed run is retried the
  next time the plan runs;
* ``plans/<plan name>.json`` — the expanded plan (which tables list which run), written when the plan runs and
  with ``--report_only`` (so a plan whose groups or labels changed is laid out anew without running anything);
* ``_work/logs/<id>.log`` — each run's stdout and stderr (``_work/`` also holds job files and the lock);
* ``report.md`` and ``*.png`` — regenerated from ``runs.jsonl`` after every run and with ``--report_only``.

Each run calls :func:`recbole_llmser.quick_start.run` in a fresh Python process (a crash or an OOM kill does not
stop the plan) in the current working directory; its peak resident memory is the ``ru_maxrss`` that ``wait4``
reports for that process (it includes the process's own children). Each run trains in the folder
``<checkpoint_dir>/<dataset>/<model>-<method>-<id>/`` (``run_name``), so a run that was stopped part-way (Ctrl-C,
``timeout_s``, a lost machine) continues from its last validated epoch the next time the plan runs, and ends as it
would have without the stop; its record has ``resumed_at_epoch``, and its wall and CPU times, which cover only the
last attempt, are left out of the cost table. A run that finished in its folder but was not recorded (the runner was
stopped between the two) is recorded from the folder's ``results.json`` without training (``finished_earlier``; its
times are left out of the cost table too).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import yaml

from recbole_llmser.config import METHODS, uses_llmser
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.utils import atomic_file, atomic_write_json, atomic_write_text

RUNS = "runs.jsonl"
FAILURES = "failures.jsonl"
REPORT = "report.md"
WORK = "_work"  # per-run logs, job files and the lock (git-ignored: results/**/_work/)
METHOD_CHOICES = METHODS  # none, llmser, tslrec, llmser+tslrec
#: Properties that do not change a run's numbers: left out of the run id, so changing them does not re-run.
NON_SEMANTIC_KEYS = frozenset({
    "show_progress", "state", "gpu_id", "checkpoint_dir", "llm_concurrency", "llm_timeout", "llm_max_retries",
    "log_wandb", "wandb_project",
})
#: Properties the runner sets for every run unless the plan does (not part of the id: NON_SEMANTIC_KEYS).
RUNNER_DEFAULTS = {"show_progress": False}
#: The spec axes: set by the entry's fields, never through overrides.
AXES = ("dataset", "model", "method", "seed")
#: Set by the runner for every run, never by a plan: each run trains in the folder ``<model>-<method>-<id>``
#: under ``<checkpoint_dir>/<dataset>/``, so a run that was stopped (Ctrl-C, timeout, a lost machine) resumes
#: from its last validated epoch the next time the plan runs.
RUNNER_KEYS = ("run_name",)
PLAN_KEYS = {"name", "results_dir", "common", "runs", "timeout_s", "description"}
ENTRY_KEYS = {"dataset", "model", "models", "method", "methods", "seeds", "seed", "overrides", "label", "group", "x"}
#: Effective properties copied from the run's config.yaml into its runs.jsonl record (plus every overridden key).
RECORDED_SETTINGS = (
    "device", "epochs", "stopping_step", "MAX_ITEM_LIST_LENGTH", "train_batch_size", "learning_rate", "hidden_size",
    "loss_type", "valid_metric", "eval_protocols", "group_bounds", "group_names", "ccg_model", "ccg_epochs",
    "ccg_num_candidates", "snf_num_picks", "aug_num_pseudo", "aug_decay_beta", "aug_decay_threshold",
    "llm_backend", "llm_model", "semantic_backend", "dct_mode",
)
#: Metrics in the tables: (key in the result dict, column name).
METRICS = (("hit@10", "HR@10"), ("ndcg@10", "NDCG@10"))
PLOT_METRIC = ("ndcg@10", "NDCG@10")
BACKEND_NOTES = {
    "llm": "an OpenAI-compatible LLM endpoint answered SNF and ARV",
    "offline": "no LLM endpoint: the offline stand-in (candidates ranked by title-embedding similarity to the "
               "user's history, `OfflineRanker`) replaced the LLM in SNF and ARV",
    "model": "the dataset has no item text: the forward helper model's scores replaced the LLM in SNF and ARV",
}


# ===================================================================================================== plan ==
def spec_id(dataset, model, method, seed, overrides) -> str:
    """Stable 12-hex id of a run: sha256 of the canonical JSON of its axes and semantic overrides."""
    semantic = {k: v for k, v in (overrides or {}).items() if k not in NON_SEMANTIC_KEYS}
    key = {"dataset": dataset, "model": model, "method": method, "seed": int(seed), "overrides": semantic}
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _as_list(value, what, where):
    values = value if isinstance(value, list) else [value]
    if not values or any(v is None or v == "" for v in values):
        raise LLMSeRError(f"{where}: '{what}' is empty")
    return values


def load_plan(path) -> dict:
    """Read and validate a plan file; returns the plan dict (with ``name`` and ``path`` filled in)."""
    path = Path(path)
    if not path.is_file():
        raise LLMSeRError(f"{path}: plan file not found")
    try:
        plan = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise LLMSeRError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(plan, dict):
        raise LLMSeRError(f"{path}: expected a mapping with 'runs', got {type(plan).__name__}")
    plan = dict(plan)
    plan.setdefault("name", path.stem)
    plan["path"] = str(path)
    validate_plan(plan, str(path))
    return plan


def validate_plan(plan: dict, where: str = "plan") -> None:
    unknown = set(plan) - PLAN_KEYS - {"path"}
    if unknown:
        raise LLMSeRError(f"{where}: unknown key(s) {sorted(unknown)}; a plan has {sorted(PLAN_KEYS)}")
    if not isinstance(plan.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9._-]+", plan["name"]):
        raise LLMSeRError(f"{where}: 'name' must be a word of letters, digits, '.', '_' or '-'")
    if not isinstance(plan.get("common") or {}, dict):
        raise LLMSeRError(f"{where}: 'common' must be a mapping of properties")
    bad_common = set(plan.get("common") or {}) & set(AXES)
    if bad_common:
        raise LLMSeRError(f"{where}: 'common' may not set {sorted(bad_common)}; they are the run axes of each entry")
    _check_runner_keys(plan.get("common") or {}, f"{where}: 'common'")
    timeout = plan.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise LLMSeRError(f"{where}: 'timeout_s' must be a positive number of seconds or ~")
    runs = plan.get("runs")
    if not isinstance(runs, list) or not runs:
        raise LLMSeRError(f"{where}: 'runs' must be a non-empty list of entries")
    for i, entry in enumerate(runs):
        at = f"{where}: runs[{i}]"
        if not isinstance(entry, dict):
            raise LLMSeRError(f"{at}: expected a mapping, got {type(entry).__name__}")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise LLMSeRError(f"{at}: unknown key(s) {sorted(unknown)}; an entry has {sorted(ENTRY_KEYS)}")
        for key in ("dataset", "model", "method", "seeds"):
            alias = {"model": "models", "method": "methods", "seeds": "seed"}.get(key)
            if key not in entry and alias not in entry:
                if key == "method":
                    continue  # default: llmser, as the package's own default
                raise LLMSeRError(f"{at}: missing '{key}'")
        if not isinstance(entry["dataset"], str):
            raise LLMSeRError(f"{at}: 'dataset' must be one dataset name (one entry per dataset)")
        for m in _as_list(entry.get("method", entry.get("methods", "llmser")), "method", at):
            if m not in METHOD_CHOICES:
                raise LLMSeRError(f"{at}: method {m!r}: expected one of {', '.join(METHOD_CHOICES)}")
        for s in _as_list(entry.get("seeds", entry.get("seed")), "seeds", at):
            if isinstance(s, bool) or not isinstance(s, int):
                raise LLMSeRError(f"{at}: seed {s!r} is not an integer")
        overrides = entry.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise LLMSeRError(f"{at}: 'overrides' must be a mapping of properties")
        bad = set(overrides) & set(AXES)
        if bad:
            raise LLMSeRError(f"{at}: overrides may not set {sorted(bad)}; use the entry's own fields")
        _check_runner_keys(overrides, f"{at}: overrides")
        group = entry.get("group", "main")
        if not isinstance(group, str) or not group:
            raise LLMSeRError(f"{at}: 'group' must be a name (main, ablation, sweep:<property>, ...)")
        if group.startswith("sweep:") and entry.get("x") is None:
            key = group[len("sweep:"):]
            merged = {**(plan.get("common") or {}), **overrides}
            if key not in merged:
                raise LLMSeRError(f"{at}: group {group!r} needs 'x' (the swept value) or an override of '{key}'")


def _check_runner_keys(properties: dict, where: str) -> None:
    bad = set(properties) & set(RUNNER_KEYS)
    if bad:
        raise LLMSeRError(f"{where} may not set {sorted(bad)}; the runner names each run's folder "
                          "<model>-<method>-<id>")


def expand_plan(plan: dict) -> list:
    """The runs of a plan, in plan order: one spec per (entry, model, method, seed).

    A spec: ``id, dataset, model, method, seed, overrides`` (common then the entry's; the runner defaults go to
    ``config_dict``), ``config_dict`` (what ``quick_start.run`` gets), ``group``, ``label``, ``x``, ``name``.
    The same id may occur in several entries (one run, several table memberships)."""
    validate_plan(plan, plan.get("path", "plan"))
    common = dict(plan.get("common") or {})
    specs = []
    for entry in plan["runs"]:
        overrides = {**common, **(entry.get("overrides") or {})}
        group = entry.get("group", "main")
        x = entry.get("x")
        if x is None and group.startswith("sweep:"):
            x = overrides[group[len("sweep:"):]]
        models = _as_list(entry.get("model", entry.get("models")), "model", "plan")
        methods = _as_list(entry.get("method", entry.get("methods", "llmser")), "method", "plan")
        seeds = _as_list(entry.get("seeds", entry.get("seed")), "seeds", "plan")
        for model in models:
            for method in methods:
                for seed in seeds:
                    sid = spec_id(entry["dataset"], model, method, seed, overrides)
                    config_dict = {**RUNNER_DEFAULTS, **overrides, "seed": int(seed), "method": method,
                                   "run_name": f"{model}-{method}-{sid}"}
                    label = entry.get("label")
                    specs.append({
                        "id": sid, "dataset": entry["dataset"], "model": model, "method": method, "seed": int(seed),
                        "overrides": overrides, "config_dict": config_dict, "group": group, "label": label, "x": x,
                        "name": f"{entry['dataset']}/{model}/{method}/seed{seed}" + (f" [{label}]" if label else ""),
                    })
    return specs


def unique_runs(specs: list) -> list:
    """One spec per id (the first), in plan order."""
    seen, out = set(), []
    for s in specs:
        if s["id"] not in seen:
            seen.add(s["id"])
            out.append(s)
    return out


def select_specs(specs: list, only=None) -> list:
    """Specs whose name, id, group or label contains ``only`` (case-insensitive); all when ``only`` is empty."""
    if not only:
        return list(specs)
    needle = only.lower()
    return [s for s in specs
            if any(needle in str(v).lower() for v in (s["name"], s["id"], s["group"], s["label"] or ""))]


def results_dir_for(plan: dict, dataset: str, override=None) -> Path:
    """``results_dir`` (CLI override, else the plan's, else ``results/{dataset}``) with ``{dataset}`` replaced;
    a plan over several datasets without ``{dataset}`` gets ``/<dataset>`` appended."""
    template = str(override or plan.get("results_dir") or "results/{dataset}")
    datasets = {e["dataset"] for e in plan["runs"]}
    if "{dataset}" not in template and len(datasets) > 1:
        template = template.rstrip("/") + "/{dataset}"
    return Path(template.replace("{dataset}", dataset))


# ============================================================================================= jsonl files ==
def append_jsonl(path, record: dict) -> None:
    """Append one JSON line with a single ``write`` + fsync; starts a new line after a torn last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False, default=str, allow_nan=True) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":
                line = "\n" + line
        data = line.encode("utf-8")
        written = os.write(fd, data)
        if written != len(data):  # a regular file takes the whole write; never silently leave half a line
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path):
    """(records, number of unreadable lines); a missing file is empty. Lines that are not a JSON object
    (e.g. the torn last line of a killed writer) are skipped."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    with open(path, "rb") as f:
        for raw in f:
            raw = raw.strip()
            if not raw:
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad += 1
                continue
            if isinstance(rec, dict) and "id" in rec:
                records.append(rec)
            else:
                bad += 1
    return records, bad


def load_runs(results_dir):
    """(finished-run records with one per id — the last —, unreadable line count) from ``runs.jsonl``."""
    records, bad = read_jsonl(Path(results_dir) / RUNS)
    by_id = {}
    for r in records:
        by_id.pop(r["id"], None)
        by_id[r["id"]] = r
    return list(by_id.values()), bad


# ==================================================================================================== maths ==
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


# =================================================================================================== report ==
def _records(entries) -> list:
    """The distinct run records of table entries (by id, first-seen order): a run listed twice counts once."""
    return list({e[0]["id"]: e[0] for e in entries}.values())


def _membership(results_dir, records):
    """(table entries ``(record, group, label, x)``, recorded plans, orphan records).

    With recorded plans (``plans/*.json``), the tables hold exactly the runs those plans list, in plan order (a
    run may be listed in several groups); a record no plan lists any more (its plan entry changed, so the changed
    spec ran under a new id) is an orphan: listed under Runs, never averaged into a table. Without any recorded
    plan every record goes to the group and label it was run under."""
    by_id = {r["id"]: r for r in records}
    plans = []
    for p in sorted((Path(results_dir) / "plans").glob("*.json")):
        try:
            plans.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    plans.sort(key=lambda p: p.get("first_recorded", ""))
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


def mixed_rows(rows: dict) -> list:
    """Keys of table rows whose runs differ in more than the seed (different overrides)."""
    return [k for k, group in rows.items()
            if len({json.dumps(r.get("overrides") or {}, sort_keys=True, default=str) for r in _records(group)}) > 1]


def _mix_note(rows: dict) -> str:
    mixed = mixed_rows(rows)
    if not mixed:
        return ""
    names = "; ".join(" ".join(str(x) for x in k if x is not None) for k in mixed)
    return (f"\n\n**Warning**: row(s) {names} average runs with different overrides; give them distinct labels or "
            "groups in the plan.")


def _md_table(header, rows) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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


def _valid_metric(records) -> str:
    c = Counter((r.get("settings") or {}).get("valid_metric") or "NDCG@10" for r in records)
    return c.most_common(1)[0][0]


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


def _choice_cells(row_records, protocol):
    chosen = validation_choice(row_records, protocol)
    return ["✓" if i == chosen else "" for i in range(len(row_records))]


def main_table(entries, protocol):
    """Markdown table of the ``main`` group for ``protocol``: rows backbone × method (mean ± std over seeds),
    a gain row per backbone (llmser over none, on the means over the seeds both rows have), validation NDCG@10
    beside test."""
    recs = _records(entries)
    rows_by_key = group_rows(entries, lambda e: (e[0]["model"], e[0]["method"]))
    cols = _columns(recs, protocol)
    header = ["backbone", "method", "seeds", "valid NDCG@10"] + [c[0] for c in cols]
    rows = []
    for model in list(dict.fromkeys(k[0] for k in rows_by_key)):
        for method in METHOD_CHOICES:
            group = rows_by_key.get((model, method))
            if not group:
                continue
            rs = _records(group)
            v = aggregate(rs, "valid", protocol, "ndcg@10")
            cells = [fmt_mean_std(*aggregate(rs, "test", protocol, key, gname)[:2]) for _, gname, key in cols]
            rows.append([model, method, len(rs), fmt_mean_std(v[0], v[1])] + cells)
        for method in METHOD_CHOICES[1:]:
            if (model, "none") in rows_by_key and (model, method) in rows_by_key:
                label, base, new = matched_seeds(_records(rows_by_key[(model, "none")]),
                                                 _records(rows_by_key[(model, method)]))
                gains = [fmt_gain(relative_gain(aggregate(base, "test", protocol, k, g)[0],
                                                aggregate(new, "test", protocol, k, g)[0])) for _, g, k in cols]
                rows.append([model, f"gain {method} vs none{label}", "", ""] + gains)
    return _md_table(header, rows) + _mix_note(rows_by_key)


def labelled_table(entries, protocol):
    """Rows = (label, backbone, method) in plan order; columns = valid NDCG@10, test metrics overall and per
    group; plus the relative change of overall NDCG@10 against the first row (over the seeds both rows have) and
    the row validation chooses."""
    recs = _records(entries)
    rows_by_key = group_rows(entries, lambda e: (e[2] or f"{e[0]['model']} {e[0]['method']}", e[0]["model"],
                                                 e[0]["method"]))
    cols = _columns(recs, protocol)
    header = (["variant", "backbone", "method", "seeds", "valid NDCG@10"] + [c[0] for c in cols]
              + ["Δ NDCG@10 vs first row", "chosen on validation"])
    rows, ref = [], None
    chosen = _choice_cells([_records(g) for g in rows_by_key.values()], selection_protocol(recs))
    for ((label, model, method), group), choice in zip(rows_by_key.items(), chosen):
        rs = _records(group)
        v = aggregate(rs, "valid", protocol, "ndcg@10")
        cells = [fmt_mean_std(*aggregate(rs, "test", protocol, key, g)[:2]) for _, g, key in cols]
        if ref is None:
            ref, delta = rs, "reference"
        else:
            seeds, base, new = matched_seeds(ref, rs)
            delta = fmt_gain(relative_gain(aggregate(base, "test", protocol, "ndcg@10")[0],
                                           aggregate(new, "test", protocol, "ndcg@10")[0])) + seeds
        rows.append([label, model, method, len(rs), fmt_mean_std(v[0], v[1])] + cells + [delta, choice])
    return _md_table(header, rows) + _mix_note(rows_by_key)


def sweep_series(entries, protocol, metric="ndcg@10"):
    """``{(model, method): [(x, {group or 'overall': (mean, std, n)})]}`` sorted by x."""
    out = {}
    by_key = group_rows(entries, lambda e: (e[0]["model"], e[0]["method"], json.dumps(e[3])))
    recs = _records(entries)
    names = [None] + [g[0] for g in group_info(recs, protocol)]
    for (model, method, xj), group in by_key.items():
        rs = _records(group)
        point = {(n or "overall"): aggregate(rs, "test", protocol, metric, n) for n in names}
        out.setdefault((model, method), []).append((json.loads(xj), point))
    for k in out:
        out[k].sort(key=lambda p: _sort_x(p[0]))
    return out


def sweep_table(entries, protocol, prop):
    recs = _records(entries)
    by_key = group_rows(entries, lambda e: (e[0]["model"], e[0]["method"], json.dumps(e[3])))
    cols = _columns(recs, protocol)
    header = ["backbone", "method", prop, "seeds", "valid NDCG@10"] + [c[0] for c in cols] + ["chosen on validation"]
    ordered = sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1], _sort_x(json.loads(kv[0][2]))))
    series = group_rows(ordered, lambda kv: kv[0][:2])  # one choice per (backbone, method) curve
    chosen = [c for items in series.values()
              for c in _choice_cells([_records(g) for _, g in items], selection_protocol(recs))]
    rows = []
    for ((model, method, xj), group), choice in zip(ordered, chosen):  # ordered lists the curves one after another
        rs = _records(group)
        v = aggregate(rs, "valid", protocol, "ndcg@10")
        cells = [fmt_mean_std(*aggregate(rs, "test", protocol, key, g)[:2]) for _, g, key in cols]
        rows.append([model, method, json.loads(xj), len(rs), fmt_mean_std(v[0], v[1])] + cells + [choice])
    return _md_table(header, rows) + _mix_note(by_key)


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
        rs = _records(group)
        # a resumed run's times cover only its last attempt; a run recorded from its finished folder trained nothing
        whole = [r for r in rs if not (r.get("resumed_at_epoch") or r.get("finished_earlier"))]
        label = next((e[2] for e in group if e[2]), f"{model} {method}")
        augs = [r.get("aug") or {} for r in rs]
        t = lambda k: [a.get("timings_s", {}).get(k) for a in augs]  # noqa: E731
        llm = [a.get("llm") or {} for a in augs]
        backends = sorted({a.get("backend") for a in augs if a.get("backend")})
        gpu = [r.get("peak_gpu_mb") for r in rs]
        rows.append([
            label, model, method, len(rs), ", ".join(backends) or "—",
            _num(t("ccg")), _num(t("snf")), _num(t("arv")), _num([r.get("train_eval_s") for r in whole]),
            _num([r.get("wall_s") for r in whole]), _num([r.get("cpu_s") for r in whole]),
            _num([x.get("calls") for x in llm], 0) if any(llm) else "—",
            _num([x.get("prompt_tokens") for x in llm], 0) if any(llm) else "—",
            _num([x.get("completion_tokens") for x in llm], 0) if any(llm) else "—",
            _num([(r.get("peak_rss_mb") or 0) / 1024 for r in rs], 2),
            _num([g / 1024 for g in gpu if g is not None], 2) if any(g is not None for g in gpu) else "—",
            f"{sum(1 for a in augs if a.get('reused'))}/{sum(1 for a in augs if a)}" if any(augs) else "—",
        ])
    return _md_table(header, rows)


def _slug(text) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _savefig(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    with atomic_file(path, "wb") as f:
        f.write(buf.getvalue())


def _seeds(n) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def _yerr(stds):
    return None if all(s is None for s in stds) else [s or 0.0 for s in stds]


def plot_main(entries, protocol, path) -> None:
    """Grouped bars: x = overall + user-length groups, one bar per (backbone, method), NDCG@10 mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _records(entries)
    groups = [None] + [g[0] for g in group_info(recs, protocol)]
    labels = ["overall"] + [f"{n} {r}\n(n={c})" for n, r, c in group_info(recs, protocol)]
    series = group_rows(entries, lambda e: (e[0]["model"], e[0]["method"]))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 0.3 * len(series)), 4))
    for i, ((model, method), group) in enumerate(series.items()):
        rs = _records(group)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def write_report(results_dir, command=None) -> Path:
    """Regenerate ``report.md`` and the PNGs of ``results_dir`` from its ``runs.jsonl``; returns the report path."""
    results_dir = Path(results_dir)
    records, bad = load_runs(results_dir)
    failures, _ = read_jsonl(results_dir / FAILURES)
    done = {r["id"] for r in records}
    open_failures = {f["id"] for f in failures if f["id"] not in done}
    entries, plans, orphans = _membership(results_dir, records)
    in_tables = _records(entries)
    datasets = sorted({r.get("dataset") for r in records if r.get("dataset")})
    title = ", ".join(datasets) or results_dir.name
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = [f"# Experiment report: {title}", ""]
    out.append(f"Generated {now} from `{RUNS}` in this folder ({len(records)} finished runs"
               + (f"; {bad} unreadable line(s) skipped" if bad else "")
               + f"; {len(open_failures)} run(s) with failed attempts and no success yet, see `{FAILURES}`). "
               "Every number below is read from `runs.jsonl`.")
    out.append("")
    if command:
        out.append(f"Report written by: `{command}`")
        out.append("")
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

    out += ["## How to read this report", ""]
    vm = _valid_metric(records) if records else "NDCG@10"
    out += [
        "* Split: leave-one-out by time (last item = test, the one before = validation). Metrics at cut-off 10: "
        "HR@10 and NDCG@10, for each test protocol present: `uni<N>` = the target ranked against N negatives "
        "sampled uniformly from items the user never interacted with (the LLMSeR paper's protocol), `full` = "
        "against all items.",
        f"* **Model selection uses validation metrics only**: early stopping and the checkpoint kept use "
        f"validation {vm} (RecBole's trainer, full ranking); the test split is evaluated once, on that "
        "checkpoint. The `valid NDCG@10` column (same protocol as the test columns) is shown beside test. "
        "`kept epoch / trained / cap` (runs table, 1-based): the epoch of that checkpoint, the epochs trained and "
        "the `epochs` cap; a run that kept its last epoch at the cap was still improving when it stopped.",
        f"* `chosen on validation` marks, in each ablation table and each sweep curve, the row with the highest "
        f"mean overall validation NDCG@10 under `{selection_protocol(records)}` ranking: the setting a user choosing "
        "on validation only would keep (the same row in every protocol's table; each row's mean is over its own "
        "seeds, see `seeds`).",
        "* Cells are mean ± sample standard deviation (n − 1) over the seeds in the `seeds` column; one seed shows "
        "the value only.",
        "* `gain <method> vs none` = (mean method − mean none) / mean none × 100, same backbone, protocol and "
        "column; `Δ NDCG@10 vs first row` likewise against a table's first row. Both means are over the seeds the "
        "two rows share (named in the cell when one row has seeds the other lacks).",
        "* User-length groups count training items (sequence minus validation and test items), never pseudo "
        "items; each column names the group's range and its number of test users.",
        "",
    ]

    out += ["## Pseudo items: backend", ""]
    aug_recs = [r for r in in_tables if r.get("aug")]
    if not aug_recs:
        out += ["No LLMSeR run (method `llmser`) is in `runs.jsonl`.", ""]
    else:
        by_backend = group_rows(aug_recs, lambda r: (r["aug"].get("backend"), r["aug"].get("llm_model")))
        for (backend, llm_model), rs in by_backend.items():
            note = BACKEND_NOTES.get(backend, "unknown backend")
            model_note = f" (LLM `{llm_model}`)" if llm_model else ""
            out.append(f"* `{backend}`{model_note}: {len(rs)} run(s) — {note}.")
        out.append("")

    by_group = group_rows(entries, lambda e: e[1])
    protocols = protocols_of(in_tables)
    figures = []
    if "main" in by_group:
        out += ["## Main results", ""]
        for p in protocols:
            out += [f"### Test, protocol `{p}`", "", main_table(by_group["main"], p), ""]
            png = f"main_ndcg10_{_slug(p)}.png"
            figures.append(("main", p, png, None))
            out += [f"![NDCG@10 per group, {p}]({png})", ""]
    for gname, group_entries in by_group.items():
        if gname == "main" or gname.startswith("sweep:"):
            continue
        heading = "Ablations" if gname == "ablation" else f"Group `{gname}`"
        models = sorted({e[0]["model"] for e in group_entries})
        out += [f"## {heading} ({', '.join(models)})", ""]
        for p in protocols:
            out += [f"### Test, protocol `{p}`", "", labelled_table(group_entries, p), ""]
    for gname, group_entries in by_group.items():
        if not gname.startswith("sweep:"):
            continue
        prop = gname[len("sweep:"):]
        out += [f"## Sweep of `{prop}`", ""]
        for p in protocols:
            png = f"sweep_{_slug(prop)}_ndcg10_{_slug(p)}.png"
            figures.append(("sweep", p, png, (group_entries, prop)))
            out += [f"### Test, protocol `{p}`", "", sweep_table(group_entries, p, prop), "",
                    f"![NDCG@10 vs {prop}, {p}]({png})", ""]

    if in_tables:
        out += ["## Cost", "",
                "Means over seeds. CCG/SNF/ARV: stage times from the augmentation's `summary.json` (when the "
                "artifact was reused from an earlier run with the same augmentation settings, the times are those of "
                "the run that made it, and that run's wall time includes them; `artifact reused` counts such runs). "
                "`train+eval s`: the run minus the augmentation it computed (data loading, training, evaluation). "
                "`wall s`: the whole process. `CPU s`: its user + system CPU time (with its children; unlike wall "
                "time it does not grow while the machine runs other jobs); a run resumed after a stop is left out "
                "of these three (its times cover only its last attempt). Peak RSS: `ru_maxrss` of the run's process "
                "(with its children); peak GPU: `torch.cuda.max_memory_allocated`.", "", cost_table(entries), ""]
        devices = Counter((r.get("env") or {}).get("device_name") or "?" for r in in_tables)
        out += ["Devices: " + ", ".join(f"{d} ({n} runs)" for d, n in devices.items()) + ".", ""]

    if records:
        tables = {}
        for rec, group, label, _x in entries:
            tables.setdefault(rec["id"], []).append(group + (f" [{label}]" if label else ""))
        all_protocols = protocols_of(records)
        out += ["## Runs", ""]
        header = ["id", "backbone", "method", "seed", "tables", "overrides", f"best valid {vm} (trainer)",
                  "kept epoch / trained / cap"] + \
                 [f"test NDCG@10 {p}" for p in all_protocols] + ["wall s", "peak RSS MiB", "finished"]
        rows = [[r["id"], r["model"], r["method"], r["seed"],
                 "; ".join(dict.fromkeys(tables.get(r["id"], []))) or "— (in no plan)",
                 _format_overrides(r.get("overrides") or {}),
                 "—" if r.get("best_valid_score") is None else f"{r['best_valid_score']:.4f}", _epochs_cell(r)]
                + [fmt_mean_std(metric_value(r, "test", p, "ndcg@10"), None) for p in all_protocols]
                + [f"{r.get('wall_s', 0):.1f}", f"{r.get('peak_rss_mb') or 0:.0f}", r.get("finished", "")]
                for r in records]
        out += [_md_table(header, rows), ""]
        capped = [r["id"] for r in records if stopped_at_cap(r)]
        if capped:
            out += [f"{len(capped)} of {sum(r.get('best_epoch') is not None for r in records)} runs with a recorded "
                    "kept epoch kept their last epoch at the `epochs` cap, i.e. validation was still improving when "
                    f"training stopped (more epochs may change them): {', '.join(capped)}.", ""]

    plot_note = _write_figures(results_dir, figures, by_group)
    if plot_note:
        out += [plot_note, ""]
    path = results_dir / REPORT
    atomic_write_text(path, "\n".join(out))
    return path


def stopped_at_cap(record) -> bool:
    """Whether the run trained up to its ``epochs`` cap and kept the checkpoint of its last epoch."""
    cap = (record.get("settings") or {}).get("epochs")
    trained, kept = record.get("epochs_trained"), record.get("best_epoch")
    return None not in (cap, trained, kept) and trained >= cap and kept == trained


def _epochs_cell(record) -> str:
    """``kept / trained / cap`` epochs of a run (1-based; the kept checkpoint is the one evaluated on test)."""
    if record.get("epochs_trained") is None:
        return "—"  # recorded before this field existed
    cap = (record.get("settings") or {}).get("epochs")
    kept = record.get("best_epoch")
    return f"{'—' if kept is None else kept} / {record['epochs_trained']} / {'—' if cap is None else cap}"


def _write_figures(results_dir, figures, by_group):
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return "Plots were not written: matplotlib is not installed (`pip install matplotlib`)."
    for kind, protocol, png, extra in figures:
        if kind == "main":
            plot_main(by_group["main"], protocol, results_dir / png)
        else:
            plot_sweep(extra[0], protocol, extra[1], results_dir / png)
    return None


# ================================================================================================== running ==
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _rss_mb(ru_maxrss) -> float:
    return ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru_maxrss / 1024  # bytes on macOS, KiB else


def _exit_description(returncode) -> str:
    if returncode is None:
        return "did not finish"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (killed: out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {returncode}"


def _tail(path, offset, limit=4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("recbole_llmser: error:", "Traceback")) or re.match(r"^[A-Za-z_.]+(Error|Exception)\b", ln):
            return ln
    return lines[-1] if lines else ""


def _wait(proc, timeout):
    """Wait for ``proc`` with ``os.wait4`` (its own rusage); returns (returncode, rusage or None, timed_out)."""
    start = time.monotonic()
    delay = 0.05
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, rusage, False
        if timeout is not None and time.monotonic() - start > timeout:
            _kill(proc)
            pid, status, rusage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, rusage, True
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: this also ends its children
    except (ProcessLookupError, PermissionError):
        pass


def run_spec(spec: dict, results_dir, timeout=None) -> dict:
    """Run one spec in a fresh process; append its record to runs.jsonl (or failures.jsonl); returns it
    with ``ok``."""
    results_dir = Path(results_dir)
    tmp = results_dir / WORK / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    job_path = tmp / f"{spec['id']}.{os.getpid()}.job.json"
    out_path = tmp / f"{spec['id']}.{os.getpid()}.out.json"
    if out_path.exists():
        out_path.unlink()
    atomic_write_json(job_path, {"model": spec["model"], "dataset": spec["dataset"],
                                 "config_dict": spec["config_dict"], "method": spec["method"], "out": str(out_path)})
    log_path = results_dir / WORK / "logs" / f"{spec['id']}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = _now()
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    with open(log_path, "ab") as log:
        offset = log.tell()
        log.write(f"=== {started} {spec['name']} id {spec['id']}\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "recbole_llmser.experiments", "--_child", str(job_path)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=os.getcwd(), start_new_session=True)
        try:
            returncode, rusage, timed_out = _wait(proc, timeout)
        except BaseException:  # KeyboardInterrupt: end the run (and its children), log nothing
            _kill(proc)
            try:
                os.wait4(proc.pid, 0)
            except ChildProcessError:
                pass
            raise
    wall = time.monotonic() - t0
    base = {
        "id": spec["id"], "plan": spec.get("plan"), "dataset": spec["dataset"], "model": spec["model"],
        "method": spec["method"], "seed": spec["seed"], "overrides": spec["overrides"],
        "group": spec["group"], "label": spec["label"], "x": spec["x"],
        "started": started, "finished": _now(), "wall_s": round(wall, 2),
        "peak_rss_mb": round(_rss_mb(rusage.ru_maxrss), 1) if rusage else None,
        "cpu_s": round(rusage.ru_utime + rusage.ru_stime, 1) if rusage else None,
        "log": str(log_path),
    }
    child = None
    if returncode == 0 and out_path.is_file():
        try:
            child = json.loads(out_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            child = None
    for p in (job_path, out_path):
        if p.exists():
            p.unlink()
    if child is None:
        tail = _tail(log_path, offset)
        kind = "timeout" if timed_out else ("killed" if returncode is not None and returncode < 0 else "error")
        reason = f"timed out after {timeout} s" if timed_out else _exit_description(returncode)
        record = {**base, "ok": False, "kind": kind, "returncode": returncode,
                  "error": f"{reason}: {_last_error_line(tail)}".rstrip(": "), "stderr_tail": tail}
        append_jsonl(results_dir / FAILURES, {k: v for k, v in record.items() if k != "ok"})
        return record
    result = child["result"]
    record = {
        **base,
        "best_valid_score": result.get("best_valid_score"),
        "best_valid_result": result.get("best_valid_result"),
        "best_epoch": result.get("best_epoch"), "epochs_trained": result.get("epochs_trained"),
        "resumed_at_epoch": result.get("resumed_at_epoch"), "finished_earlier": result.get("finished_earlier"),
        "valid_curve": result.get("valid_curve"),
        "valid": result.get("valid"), "test": result.get("test"),
        "run_dir": result.get("run_dir"), "aug_file": result.get("aug_file"),
        "run_s": child.get("run_s"), "train_eval_s": child.get("train_eval_s"),
        "peak_rss_mb_self": child.get("peak_rss_mb"), "peak_gpu_mb": child.get("peak_gpu_mb"),
        "aug": child.get("aug"), "settings": child.get("settings"), "env": child.get("env"),
    }
    append_jsonl(results_dir / RUNS, record)
    return {**record, "ok": True}


def _child_main(job_path) -> int:
    """Inside the run's own process: quick_start.run(...), then a JSON result file for the parent."""
    import resource

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    start_wall = time.time()
    t0 = time.monotonic()
    try:
        import torch

        from recbole_llmser.quick_start import run

        result = run(job["model"], job["dataset"], config_dict=job["config_dict"], cmd_args=[])
    except LLMSeRError as err:
        print(f"recbole_llmser: error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        traceback.print_exc()
        return 1
    run_s = time.monotonic() - t0
    aug = None
    if uses_llmser(job) and result.get("aug_file"):
        summary_path = Path(result["aug_file"]).parent / "summary.json"
        if summary_path.is_file():
            s = json.loads(summary_path.read_text(encoding="utf-8"))
            aug = {k: s.get(k) for k in ("backend", "text", "llm_model", "timings_s", "llm", "users",
                                         "augmented_users", "skipped_users", "verified_users", "mean_w",
                                         "snf_status", "arv_status")}
            aug["summary"] = str(summary_path)
            aug["reused"] = summary_path.stat().st_mtime < start_wall
    aug_s = (aug or {}).get("timings_s", {}).get("total") if aug and not aug["reused"] else 0.0
    settings = {}
    config_path = Path(result.get("run_dir") or ".") / "config.yaml"
    if config_path.is_file():
        cfg = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        keys = list(RECORDED_SETTINGS) + [k for k in job["config_dict"] if k not in RECORDED_SETTINGS]
        settings = {k: cfg[k] for k in keys if k in cfg}
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    out = {
        "result": {k: result.get(k) for k in ("best_valid_score", "best_valid_result", "best_epoch", "epochs_trained",
                                              "resumed_at_epoch", "finished_earlier", "valid_curve", "valid",
                                              "test", "run_dir", "aug_file")},
        "run_s": round(run_s, 2),
        "train_eval_s": round(run_s - (aug_s or 0.0), 2),
        "peak_rss_mb": round(_rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "aug": aug,
        "settings": settings,
        "env": {"python": sys.version.split()[0], "torch": torch.__version__,
                "device_name": torch.cuda.get_device_name() if cuda else "cpu",
                "host": os.uname().nodename if hasattr(os, "uname") else None},
    }
    atomic_write_json(job["out"], out)
    return 0


def record_plan(plan, specs, results_dir, command) -> None:
    """Write ``plans/<plan name>.json``: the expanded specs of this plan for this folder (table membership).
    An unchanged plan leaves the file as it is, so ``updated`` is when the plan last changed."""
    path = Path(results_dir) / "plans" / f"{plan['name']}.json"
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pass
    record = json.loads(json.dumps({
        "name": plan["name"], "path": plan.get("path"), "command": command,
        "first_recorded": old.get("first_recorded") or _now(), "updated": None, "common": plan.get("common") or {},
        "specs": [{k: s[k] for k in ("id", "dataset", "model", "method", "seed", "group", "label", "x", "overrides")}
                  for s in specs],
    }))
    if {**old, "updated": None} == record:
        return
    atomic_write_json(path, {**record, "updated": _now()})


class _DirLock:
    """An exclusive ``flock`` on ``<results_dir>/_work/lock``: two runners never run the same plan folder at once."""

    def __init__(self, results_dir):
        self.path = Path(results_dir) / WORK / "lock"
        self.fd = None

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise LLMSeRError(f"{self.path.parent.parent}: another experiments runner is using this folder") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock


def _format_overrides(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items() if k not in NON_SEMANTIC_KEYS) or "-"


@functools.lru_cache(maxsize=1)
def _default_checkpoint_dir() -> str:
    from recbole_llmser.config import properties_dir, read_yaml

    return read_yaml(properties_dir() / "overall.yaml").get("checkpoint_dir") or "saved"


def run_folder(spec) -> Path:
    """The folder a spec's run trains in (``<checkpoint_dir>/<dataset>/<run_name>``, relative to the cwd)."""
    checkpoint_dir = spec["config_dict"].get("checkpoint_dir") or _default_checkpoint_dir()
    return Path(checkpoint_dir) / spec["dataset"] / spec["config_dict"]["run_name"]


def print_dry_run(specs, dirs, done_by_dir, out=None):
    from tabulate import tabulate

    from recbole_llmser.quick_start import RESULTS, TRAIN_STATE

    out = out or sys.stdout
    rows = []
    for s in unique_runs(specs):
        status = "done" if s["id"] in done_by_dir[s["dataset"]] else "to run"
        folder = run_folder(s)
        if status == "to run" and (folder / RESULTS).is_file():
            status = "to run (finished in its folder: recorded without training)"
        elif status == "to run" and (folder / TRAIN_STATE).is_file():
            status = "to run (partly trained: resumes)"
        groups = sorted({f"{t['group']}" + (f" [{t['label']}]" if t["label"] else "") for t in specs
                         if t["id"] == s["id"]})
        rows.append([s["id"], s["dataset"], s["model"], s["method"], s["seed"], "; ".join(groups),
                     _format_overrides(s["overrides"]), status])
    print(tabulate(rows, headers=["id", "dataset", "model", "method", "seed", "tables", "overrides", "status"]),
          file=out)
    n_done = sum(1 for r in rows if r[-1] == "done")
    print(f"\n{len(rows)} runs: {n_done} done, {len(rows) - n_done} to run; results in "
          + ", ".join(str(d) for d in dirs.values()), file=out)


def run_plan(plan_path, dry_run=False, only=None, report_only=False, results_dir=None, timeout=None,
             out=None) -> int:
    """The CLI's work; returns the exit status (0: all selected runs finished, 1: some failed)."""
    out = out or sys.stdout
    plan = load_plan(plan_path)
    command = "python -m recbole_llmser.experiments " + shlex.quote(str(plan_path))
    if results_dir:
        command += " --results_dir " + shlex.quote(str(results_dir))
    all_specs = expand_plan(plan)
    for s in all_specs:
        s["plan"] = plan["name"]
    specs = select_specs(all_specs, only)
    if not specs:
        raise LLMSeRError(f"--only {only!r} matches none of the plan's {len(unique_runs(all_specs))} runs")
    datasets = list(dict.fromkeys(s["dataset"] for s in all_specs))
    dirs = {d: results_dir_for(plan, d, results_dir) for d in datasets}
    report_cmd = command + " --report_only" if report_only else command
    if report_only:
        for d in datasets:
            if dirs[d].is_dir():
                record_plan(plan, [s for s in all_specs if s["dataset"] == d], dirs[d], command)
                print(f"report: {write_report(dirs[d], report_cmd)}", file=out)
            else:
                print(f"{dirs[d]}: no results yet", file=out)
        return 0
    done_by_dir = {d: {r["id"] for r in load_runs(dirs[d])[0]} for d in datasets}
    if dry_run:
        print_dry_run(specs, dirs, done_by_dir, out)
        return 0

    timeout = timeout if timeout is not None else plan.get("timeout_s")
    todo = [s for s in unique_runs(specs) if s["id"] not in done_by_dir[s["dataset"]]]
    n_skip = len(unique_runs(specs)) - len(todo)
    print(f"plan {plan['name']}: {len(unique_runs(specs))} runs selected, {n_skip} already done, {len(todo)} to run",
          file=out, flush=True)
    failed = 0
    locks = [_DirLock(dirs[d]) for d in datasets]
    for lock in locks:
        lock.__enter__()
    try:
        for d in datasets:
            record_plan(plan, [s for s in all_specs if s["dataset"] == d], dirs[d], command)
        for i, spec in enumerate(todo, 1):
            done_now = {r["id"] for r in load_runs(dirs[spec["dataset"]])[0]}
            if spec["id"] in done_now:
                continue
            print(f"[{i}/{len(todo)}] {spec['name']} (id {spec['id']}; {_format_overrides(spec['overrides'])}) ...",
                  file=out, flush=True)
            rec = run_spec(spec, dirs[spec["dataset"]], timeout=timeout)
            if rec["ok"]:
                summary = ", ".join(f"test NDCG@10 {p} {metric_value(rec, 'test', p, 'ndcg@10'):.4f}"
                                    for p in (rec.get("test") or {}))
                print(f"    done in {rec['wall_s']:.1f} s, peak RSS {rec['peak_rss_mb']:.0f} MiB; {summary}",
                      file=out, flush=True)
            else:
                failed += 1
                print(f"    FAILED after {rec['wall_s']:.1f} s: {rec['error']} (log {rec['log']})", file=out,
                      flush=True)
            try:
                write_report(dirs[spec["dataset"]], command)
            except Exception as err:  # a report problem must not stop the runs; the final report raises it
                print(f"    report not updated: {type(err).__name__}: {err}", file=out, flush=True)
        for d in datasets:
            print(f"report: {write_report(dirs[d], command)}", file=out, flush=True)
    finally:
        for lock in reversed(locks):
            lock.__exit__(None, None, None)
    print(f"plan {plan['name']}: {len(todo) - failed} run(s) finished, {failed} failed, {n_skip} skipped (done before)",
          file=out, flush=True)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recbole_llmser.experiments",
        description="Run a plan of experiments (each run in its own process), log them to results/<dataset>/"
                    "runs.jsonl and write results/<dataset>/report.md with plots.",
    )
    p.add_argument("plan", help="plan yaml (see experiments/*.yaml)")
    p.add_argument("--dry_run", action="store_true", help="list the expanded runs and which are done; run nothing")
    p.add_argument("--only", default=None, help="run only specs whose name, id, group or label contains this")
    p.add_argument("--report_only", action="store_true", help="only regenerate report.md and plots from runs.jsonl")
    p.add_argument("--results_dir", default=None, help="override the plan's results_dir ('{dataset}' is replaced)")
    p.add_argument("--timeout_s", type=float, default=None, help="wall-clock limit per run (overrides the plan's)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_child"] and len(argv) == 2:
        return _child_main(argv[1])
    args = build_parser().parse_args(argv)
    try:
        return run_plan(args.plan, dry_run=args.dry_run, only=args.only, report_only=args.report_only,
                        results_dir=args.results_dir, timeout=args.timeout_s)
    except LLMSeRError as err:
        print(f"recbole_llmser.experiments: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recbole_llmser.experiments: interrupted (the current run was stopped and not logged)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
