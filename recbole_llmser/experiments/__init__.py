"""Experiment runner: expand a plan of runs, run each in its own process, log results, write the report.

::

    python -m recbole_llmser.experiments plans/beauty_main.yaml            # run what is not done yet
    python -m recbole_llmser.experiments plans/beauty_main.yaml --dry_run  # list the runs (done / to do)
    python -m recbole_llmser.experiments plans/beauty_main.yaml --only GRU4Rec
    python -m recbole_llmser.experiments plans/beauty_main.yaml --report_only

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
merged overrides without the keys in :data:`~recbole_llmser.experiments.keys.NON_SEMANTIC_KEYS`): re-running a
plan skips runs whose id is in ``runs.jsonl`` (resume), and a changed spec gets a new id and runs anew. The
same spec listed in several entries or plans (e.g. the paper-default LLMSeR run in the main table, the ablation
table and both sweeps) runs once and appears in every table it is listed in. The tables hold the runs that the
recorded plans list; a record whose plan entry has since changed stays in ``runs.jsonl`` and is listed under Runs,
but no table averages it.

Per results folder (``results/<dataset>/``):

* ``runs.jsonl`` — one JSON line per finished run (append = one write + flush + fsync; a torn last line is
  skipped on load);
* ``failures.jsonl`` — one line per failed attempt (error, exit status, stderr tail); a failed run is retried the
  next time the plan runs;
* ``plans/<plan name>.json`` — the expanded plan (which tables list which run), written when the plan runs and
  with ``--report_only`` (so a plan whose groups or labels changed is laid out anew without running anything);
* ``_work/logs/<id>.log`` — each run's stdout and stderr (``_work/`` also holds job files and the lock);
* ``report.md`` and ``*.png`` — regenerated from ``runs.jsonl`` after every run and with ``--report_only``.

Beside the results folders (``results/README.md`` for ``results/{dataset}``), the runner rewrites an index of the
folders with a summary of their main tables (mean test NDCG@10 overall and for the tail group, per protocol, with
the number of seeds) each time it writes a report; a ``README.md`` there that it did not write is left alone.

Each run calls :func:`recbole_llmser.quick_start.run` in a fresh Python process (a crash or an OOM kill does not
stop the plan) in the current working directory; its peak resident memory is the ``ru_maxrss`` that ``wait4``
reports for that process (it includes the process's own children). Each run trains in the folder
``<checkpoint_dir>/<dataset>/<model>-<method>-<id>/`` (``run_name``), so a run that was stopped part-way (Ctrl-C,
``timeout_s``, a lost machine) continues from its last validated epoch the next time the plan runs, and ends as it
would have without the stop; its record has ``resumed_at_epoch``, and its wall and CPU times, which cover only the
last attempt, are left out of the cost table. A run that finished in its folder but was not recorded (the runner was
stopped between the two) is recorded from the folder's ``results.json`` without training (``finished_earlier``; its
times are left out of the cost table too).

The package: :mod:`~recbole_llmser.experiments.keys` (the property key lists), :mod:`.plan` (plan format,
validation, expansion, ids), :mod:`.store` (``runs.jsonl`` / ``failures.jsonl``, recorded plans, the folder lock),
:mod:`.stats` (means, gains, validation choice, the paired test), :mod:`.significance` (the main tables'
p-values from the runs' per-user ranks), :mod:`.tables` (markdown tables), :mod:`.plots`, :mod:`.report`
(``report.md``), :mod:`.index` (``results/README.md``), :mod:`.runner` (one run in its own process) and
:mod:`.cli` (the command line; ``__main__``).
"""

from recbole_llmser.experiments.cli import build_parser, main, print_dry_run, run_plan, write_results_index
from recbole_llmser.experiments.index import index_text, write_index
from recbole_llmser.experiments.keys import NON_SEMANTIC_KEYS, RECORDED_SETTINGS, RUNNER_DEFAULTS, RUNNER_KEYS
from recbole_llmser.experiments.plan import (
    AXES, ENTRY_KEYS, METHOD_CHOICES, PLAN_KEYS, expand_plan, format_overrides, load_plan, results_dir_for,
    results_root_for, select_specs, spec_id, unique_runs, validate_plan,
)
from recbole_llmser.experiments.plots import PLOT_METRIC, plot_main, plot_sweep
from recbole_llmser.experiments.report import BACKEND_NOTES, membership, write_report
from recbole_llmser.experiments.runner import run_folder, run_spec
from recbole_llmser.experiments.significance import gain_test, missing_note, pvalue_cells, seed_pairs
from recbole_llmser.experiments.stats import (
    PairedTest, aggregate, entry_records, fmt_gain, fmt_mean_std, fmt_p, group_info, group_rows, matched_seeds,
    mean_std, metric_value, overall_n, paired_test, protocols_of, relative_gain, selection_protocol, stopped_at_cap,
    validation_choice,
)
from recbole_llmser.experiments.store import (
    FAILURES, REPORT, RUNS, WORK, append_jsonl, load_runs, read_jsonl, record_plan, recorded_plans,
)
from recbole_llmser.experiments.tables import (
    METRICS, cost_table, labelled_table, main_table, md_table, mixed_rows, runs_table, sweep_series, sweep_table,
)

__all__ = [
    "AXES", "BACKEND_NOTES", "ENTRY_KEYS", "FAILURES", "METHOD_CHOICES", "METRICS", "NON_SEMANTIC_KEYS",
    "PLAN_KEYS", "PLOT_METRIC", "PairedTest", "RECORDED_SETTINGS", "REPORT", "RUNNER_DEFAULTS", "RUNNER_KEYS",
    "RUNS", "WORK", "aggregate", "append_jsonl", "build_parser", "cost_table", "entry_records", "expand_plan",
    "fmt_gain", "fmt_mean_std", "fmt_p", "format_overrides", "gain_test", "group_info", "group_rows", "index_text",
    "labelled_table", "load_plan", "load_runs", "main", "main_table", "matched_seeds", "md_table", "mean_std",
    "membership", "metric_value", "missing_note", "mixed_rows", "overall_n", "paired_test", "plot_main",
    "plot_sweep", "print_dry_run", "protocols_of", "pvalue_cells", "read_jsonl", "record_plan", "recorded_plans",
    "relative_gain", "results_dir_for", "results_root_for", "run_folder", "run_plan", "run_spec", "runs_table",
    "seed_pairs", "select_specs", "selection_protocol", "spec_id", "stopped_at_cap", "sweep_series", "sweep_table",
    "unique_runs", "validate_plan", "validation_choice", "write_index", "write_report", "write_results_index",
]
