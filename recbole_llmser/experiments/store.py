"""A results folder's files: ``runs.jsonl`` / ``failures.jsonl`` (append-only JSON lines), the recorded plans
``plans/<plan name>.json``, and the lock that keeps two runners out of one folder."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from recbole_llmser.errors import LLMSeRError
from recbole_llmser.utils import atomic_write_json

RUNS = "runs.jsonl"
FAILURES = "failures.jsonl"
REPORT = "report.md"
WORK = "_work"  # per-run logs, job files and the lock (git-ignored: results/**/_work/)
PLANS = "plans"  # the recorded (expanded) plans of a results folder
PER_USER_DIR = "per_user"  # each run's per-user ranks, <run id>.npz (committed beside runs.jsonl: the p-values)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def record_plan(plan, specs, results_dir, command) -> None:
    """Write ``plans/<plan name>.json``: the expanded specs of this plan for this folder (table membership).
    An unchanged plan leaves the file as it is, so ``updated`` is when the plan last changed."""
    path = Path(results_dir) / PLANS / f"{plan['name']}.json"
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


def recorded_plans(results_dir) -> list:
    """The readable ``plans/*.json`` of a results folder, oldest first (by ``first_recorded``)."""
    plans = []
    for p in sorted((Path(results_dir) / PLANS).glob("*.json")):
        try:
            plans.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    plans.sort(key=lambda p: p.get("first_recorded", ""))
    return plans


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
