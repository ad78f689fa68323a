"""Running one spec: a fresh Python process (``python -m recbole_llmser.experiments --_child <job>``) per run,
its peak memory from ``wait4``, a time limit, and its record appended to ``runs.jsonl`` or ``failures.jsonl``
(with ``per_user``, the path of the run's per-user test and validation ranks, copied to ``per_user/<run id>.npz``
beside ``runs.jsonl`` so that the report's p-values survive a new checkout)."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml

from recbole_llmser.errors import LLMSeRError
from recbole_llmser.experiments.keys import RECORDED_SETTINGS
from recbole_llmser.experiments.store import FAILURES, PER_USER_DIR, RUNS, WORK, _now, append_jsonl
from recbole_llmser.methods import uses_llmser
from recbole_llmser.utils import atomic_write_json

#: Result fields the child passes on from ``quick_start.run``'s result into the run's record.
RESULT_KEYS = ("best_valid_score", "best_valid_result", "best_epoch", "epochs_trained", "resumed_at_epoch",
               "finished_earlier", "valid_curve", "valid", "test", "run_dir", "aug_file", "shared_rows")
#: Fields of the augmentation's ``summary.json`` kept in the record's ``aug``.
AUG_KEYS = ("backend", "text", "llm_model", "timings_s", "llm", "users", "augmented_users", "skipped_users",
            "verified_users", "mean_w", "snf_status", "arv_status", "llm_echo")


@functools.lru_cache(maxsize=1)
def _default_checkpoint_dir() -> str:
    from recbole_llmser.config import properties_dir, read_yaml

    return read_yaml(properties_dir() / "overall.yaml").get("checkpoint_dir") or "saved"


def run_folder(spec) -> Path:
    """The folder a spec's run trains in (``<checkpoint_dir>/<dataset>/<run_name>``, relative to the cwd)."""
    checkpoint_dir = spec["config_dict"].get("checkpoint_dir") or _default_checkpoint_dir()
    return Path(checkpoint_dir) / spec["dataset"] / spec["config_dict"]["run_name"]


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


def _run_child(spec, job_path, log_path, timeout, started):
    """Start the run's process, its output appended to ``log_path``, and wait for it.
    Returns (returncode, rusage, timed_out, offset of this attempt in the log)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    with open(log_path, "ab") as log:
        offset = log.tell()
        log.write(f"=== {started} {spec['name']} id {spec['id']}\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "recbole_llmser.experiments", "--_child", str(job_path)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=os.getcwd(), start_new_session=True)
        try:
            return (*_wait(proc, timeout), offset)
        except BaseException:  # KeyboardInterrupt: end the run (and its children), log nothing
            _kill(proc)
            try:
                os.wait4(proc.pid, 0)
            except ChildProcessError:
                pass
            raise


def _read_child_output(returncode, out_path, job_path):
    """The child's JSON result (None unless it exited 0 and wrote one); the job files are removed."""
    child = None
    if returncode == 0 and out_path.is_file():
        try:
            child = json.loads(out_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            child = None
    for p in (job_path, out_path):
        if p.exists():
            p.unlink()
    return child


def _failure(base, log_path, offset, returncode, timed_out, timeout) -> dict:
    tail = _tail(log_path, offset)
    kind = "timeout" if timed_out else ("killed" if returncode is not None and returncode < 0 else "error")
    reason = f"timed out after {timeout} s" if timed_out else _exit_description(returncode)
    return {**base, "ok": False, "kind": kind, "returncode": returncode,
            "error": f"{reason}: {_last_error_line(tail)}".rstrip(": "), "stderr_tail": tail}


def _success(base, child) -> dict:
    result = child["result"]
    return {
        **base,
        **{k: result.get(k) for k in RESULT_KEYS},
        "run_s": child.get("run_s"), "train_eval_s": child.get("train_eval_s"),
        "peak_rss_mb_self": child.get("peak_rss_mb"), "peak_gpu_mb": child.get("peak_gpu_mb"),
        "aug": child.get("aug"), "settings": child.get("settings"), "env": child.get("env"),
        "per_user": child.get("per_user"),
    }


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
    returncode, rusage, timed_out, offset = _run_child(spec, job_path, log_path, timeout, started)
    base = {
        "id": spec["id"], "plan": spec.get("plan"), "dataset": spec["dataset"], "model": spec["model"],
        "method": spec["method"], "seed": spec["seed"], "overrides": spec["overrides"],
        "group": spec["group"], "label": spec["label"], "x": spec["x"],
        "started": started, "finished": _now(), "wall_s": round(time.monotonic() - t0, 2),
        "peak_rss_mb": round(_rss_mb(rusage.ru_maxrss), 1) if rusage else None,
        "cpu_s": round(rusage.ru_utime + rusage.ru_stime, 1) if rusage else None,
        "log": str(log_path),
    }
    child = _read_child_output(returncode, out_path, job_path)
    if child is None:
        record = _failure(base, log_path, offset, returncode, timed_out, timeout)
        append_jsonl(results_dir / FAILURES, {k: v for k, v in record.items() if k != "ok"})
        return record
    record = _success(base, child)
    record["per_user"] = _keep_per_user(record.get("per_user"), results_dir, spec["id"])
    append_jsonl(results_dir / RUNS, record)
    return {**record, "ok": True}


def _keep_per_user(path, results_dir, run_id):
    """Copy a run's per-user ranks from its run folder (under ``saved/``, which a new checkout lacks) to
    ``<results_dir>/per_user/<run id>.npz`` beside ``runs.jsonl`` (compact: the user tokens in a file all runs of
    the dataset share, :func:`~recbole_llmser.evaluation.keep_per_user`), so the report's p-values survive with
    the results; returns the path the record names (None when the run kept no file)."""
    from recbole_llmser.evaluation import keep_per_user

    if not path or not Path(path).is_file():
        return path
    return str(keep_per_user(path, results_dir / PER_USER_DIR, run_id))


# ============================================================================== inside the run's own process ==
def _aug_summary(job, result, start_wall):
    """The record's ``aug``: the augmentation's summary.json fields (None for a run without LLMSeR)."""
    if not (uses_llmser(job) and result.get("aug_file")):
        return None
    summary_path = Path(result["aug_file"]).parent / "summary.json"
    if not summary_path.is_file():
        return None
    s = json.loads(summary_path.read_text(encoding="utf-8"))
    aug = {k: s.get(k) for k in AUG_KEYS}
    aug["summary"] = str(summary_path)
    aug["reused"] = summary_path.stat().st_mtime < start_wall
    return aug


def _recorded_settings(job, result) -> dict:
    """:data:`RECORDED_SETTINGS` and every key of the job's config_dict, read from the run's config.yaml."""
    config_path = Path(result.get("run_dir") or ".") / "config.yaml"
    if not config_path.is_file():
        return {}
    cfg = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    keys = list(RECORDED_SETTINGS) + [k for k in job["config_dict"] if k not in RECORDED_SETTINGS]
    return {k: cfg[k] for k in keys if k in cfg}


def _per_user_path(result):
    """The path of the run's per-user ranks file (``per_user`` in its results.json names it in its run folder);
    None for a run that kept none (its results.json predates them)."""
    if not (result.get("per_user") and result.get("run_dir")):
        return None
    return str(Path(result["run_dir"]) / result["per_user"])


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
    aug = _aug_summary(job, result, start_wall)
    aug_s = (aug or {}).get("timings_s", {}).get("total") if aug and not aug["reused"] else 0.0
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    out = {
        "result": {k: result.get(k) for k in RESULT_KEYS},
        "run_s": round(run_s, 2),
        "train_eval_s": round(run_s - (aug_s or 0.0), 2),
        "peak_rss_mb": round(_rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "aug": aug,
        "settings": _recorded_settings(job, result),
        "per_user": _per_user_path(result),
        "env": {"python": sys.version.split()[0], "torch": torch.__version__,
                "device_name": torch.cuda.get_device_name() if cuda else "cpu",
                "host": os.uname().nodename if hasattr(os, "uname") else None},
    }
    atomic_write_json(job["out"], out)
    return 0
