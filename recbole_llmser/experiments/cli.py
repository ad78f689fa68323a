"""``python -m recbole_llmser.experiments <plan.yaml>``: run what a plan lists and is not done yet, list it
(``--dry_run``) or only rewrite the reports (``--report_only``)."""

from __future__ import annotations

import argparse
import shlex
import sys

from recbole_llmser.errors import LLMSeRError
from recbole_llmser.experiments.index import INDEX, write_index
from recbole_llmser.experiments.plan import (
    expand_plan, format_overrides, load_plan, results_dir_for, results_root_for, select_specs, unique_runs,
)
from recbole_llmser.experiments.report import write_report
from recbole_llmser.experiments.runner import _child_main, run_folder, run_spec
from recbole_llmser.experiments.significance import per_user_file
from recbole_llmser.experiments.stats import metric_value
from recbole_llmser.experiments.store import _DirLock, load_runs, record_plan


def done_ids(records, need_ranks: bool = False) -> set:
    """The ids of recorded runs; with ``need_ranks`` only those whose per-user ranks file exists (the others run
    again, and their new record replaces the old one: ``--rerun_missing_ranks``)."""
    return {r["id"] for r in records if not need_ranks or per_user_file(r) is not None}


def print_dry_run(specs, dirs, done_by_dir, out=None, recorded_by_dir=None):
    from tabulate import tabulate

    from recbole_llmser.quick_start import RESULTS, TRAIN_STATE

    out = out or sys.stdout
    rows = []
    for s in unique_runs(specs):
        status = "done" if s["id"] in done_by_dir[s["dataset"]] else "to run"
        if status == "to run" and s["id"] in (recorded_by_dir or {}).get(s["dataset"], ()):
            status = "to run (recorded without per-user ranks)"
        folder = run_folder(s)
        if status == "to run" and (folder / RESULTS).is_file():
            status = "to run (finished in its folder: recorded without training)"
        elif status == "to run" and (folder / TRAIN_STATE).is_file():
            status = "to run (partly trained: resumes)"
        groups = sorted({f"{t['group']}" + (f" [{t['label']}]" if t["label"] else "") for t in specs
                         if t["id"] == s["id"]})
        rows.append([s["id"], s["dataset"], s["model"], s["method"], s["seed"], "; ".join(groups),
                     format_overrides(s["overrides"]), status])
    print(tabulate(rows, headers=["id", "dataset", "model", "method", "seed", "tables", "overrides", "status"]),
          file=out)
    n_done = sum(1 for r in rows if r[-1] == "done")
    print(f"\n{len(rows)} runs: {n_done} done, {len(rows) - n_done} to run; results in "
          + ", ".join(str(d) for d in dirs.values()), file=out)


def write_results_index(root, out) -> None:
    """Rewrite the results index ``<root>/README.md`` (nothing when the plan's folders have no common root)."""
    if root is None:
        return
    path = write_index(root)
    if path is None:
        print(f"results index: {root / INDEX} not written (a README.md the runner did not write is there)", file=out,
              flush=True)
    else:
        print(f"results index: {path}", file=out, flush=True)


def _report_only(plan, all_specs, dirs, root, command, out) -> int:
    report_cmd = command + " --report_only"
    written = False
    for d, folder in dirs.items():
        if folder.is_dir():
            record_plan(plan, [s for s in all_specs if s["dataset"] == d], folder, command)
            print(f"report: {write_report(folder, report_cmd)}", file=out)
            written = True
        else:
            print(f"{folder}: no results yet", file=out)
    if written:
        write_results_index(root, out)
    return 0


def _run_one(spec, i, n, dirs, root, command, timeout, out) -> bool:
    """Run one spec, print how it went and rewrite its folder's report and the index; returns whether it ran."""
    print(f"[{i}/{n}] {spec['name']} (id {spec['id']}; {format_overrides(spec['overrides'])}) ...",
          file=out, flush=True)
    rec = run_spec(spec, dirs[spec["dataset"]], timeout=timeout)
    if rec["ok"]:
        summary = ", ".join(f"test NDCG@10 {p} {metric_value(rec, 'test', p, 'ndcg@10'):.4f}"
                            for p in (rec.get("test") or {}))
        print(f"    done in {rec['wall_s']:.1f} s, peak RSS {rec['peak_rss_mb']:.0f} MiB; {summary}",
              file=out, flush=True)
    else:
        print(f"    FAILED after {rec['wall_s']:.1f} s: {rec['error']} (log {rec['log']})", file=out, flush=True)
    try:
        write_report(dirs[spec["dataset"]], command)
        if root is not None:
            write_index(root)
    except Exception as err:  # a report problem must not stop the runs; the final report raises it
        print(f"    report not updated: {type(err).__name__}: {err}", file=out, flush=True)
    return rec["ok"]


def _run_todo(plan, all_specs, todo, dirs, root, command, timeout, out, need_ranks=False) -> int:
    """Run ``todo`` with every results folder of the plan locked (a run another runner recorded meanwhile is
    skipped, :func:`done_ids`); returns the number of failed runs."""
    failed = 0
    datasets = list(dirs)
    locks = [_DirLock(dirs[d]) for d in datasets]
    for lock in locks:
        lock.__enter__()
    try:
        for d in datasets:
            record_plan(plan, [s for s in all_specs if s["dataset"] == d], dirs[d], command)
        for i, spec in enumerate(todo, 1):
            done_now = done_ids(load_runs(dirs[spec["dataset"]])[0], need_ranks)
            if spec["id"] in done_now:
                continue
            if not _run_one(spec, i, len(todo), dirs, root, command, timeout, out):
                failed += 1
        for d in datasets:
            print(f"report: {write_report(dirs[d], command)}", file=out, flush=True)
        write_results_index(root, out)
    finally:
        for lock in reversed(locks):
            lock.__exit__(None, None, None)
    return failed


def run_plan(plan_path, dry_run=False, only=None, report_only=False, results_dir=None, timeout=None,
             out=None, rerun_missing_ranks=False) -> int:
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
    root = results_root_for(plan, results_dir)
    if report_only:
        return _report_only(plan, all_specs, dirs, root, command, out)
    records = {d: load_runs(dirs[d])[0] for d in datasets}
    done_by_dir = {d: done_ids(records[d], need_ranks=rerun_missing_ranks) for d in datasets}
    if dry_run:
        print_dry_run(specs, dirs, done_by_dir, out, {d: done_ids(records[d]) for d in datasets})
        return 0

    timeout = timeout if timeout is not None else plan.get("timeout_s")
    todo = [s for s in unique_runs(specs) if s["id"] not in done_by_dir[s["dataset"]]]
    n_skip = len(unique_runs(specs)) - len(todo)
    print(f"plan {plan['name']}: {len(unique_runs(specs))} runs selected, {n_skip} already done, {len(todo)} to run",
          file=out, flush=True)
    failed = _run_todo(plan, all_specs, todo, dirs, root, command, timeout, out, rerun_missing_ranks)
    print(f"plan {plan['name']}: {len(todo) - failed} run(s) finished, {failed} failed, {n_skip} skipped (done before)",
          file=out, flush=True)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recbole_llmser.experiments",
        description="Run a plan of experiments (each run in its own process), log them to results/<dataset>/"
                    "runs.jsonl and write results/<dataset>/report.md with plots (and the index results/README.md).",
    )
    p.add_argument("plan", help="plan yaml (see plans/*.yaml)")
    p.add_argument("--dry_run", action="store_true", help="list the expanded runs and which are done; run nothing")
    p.add_argument("--only", default=None, help="run only specs whose name, id, group or label contains this")
    p.add_argument("--report_only", action="store_true",
                   help="only regenerate report.md, plots and the results index from runs.jsonl")
    p.add_argument("--results_dir", default=None, help="override the plan's results_dir ('{dataset}' is replaced)")
    p.add_argument("--timeout_s", type=float, default=None, help="wall-clock limit per run (overrides the plan's)")
    p.add_argument("--rerun_missing_ranks", action="store_true",
                   help="also run again the recorded runs whose per-user ranks file is missing (recorded before "
                        "runs kept one, or lost): the p-values need it; the new record replaces the old one")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_child"] and len(argv) == 2:
        return _child_main(argv[1])
    args = build_parser().parse_args(argv)
    try:
        return run_plan(args.plan, dry_run=args.dry_run, only=args.only, report_only=args.report_only,
                        results_dir=args.results_dir, timeout=args.timeout_s,
                        rerun_missing_ranks=args.rerun_missing_ranks)
    except LLMSeRError as err:
        print(f"recbole_llmser.experiments: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recbole_llmser.experiments: interrupted (the current run was stopped and not logged)", file=sys.stderr)
        return 130
