"""A run's folder, ``<checkpoint_dir>/<dataset>/<run id>/``: everything of one training run in one place.

It holds ``config.yaml``, ``inputs.json`` (the SHA-256 of the data files, artifact and table the run started on),
the log (``<run id>.log``), ``status.json`` (running / stopped / failed / finished, with the last stage reached),
``run.lock`` while a process uses it, the checkpoints (``*.pth`` with their ``*.sha256``), ``train_state.pth``
while it trains, ``results.json`` and ``per_user.npz`` (every evaluated user's target rank per protocol) once
finished, and ``tensorboard/`` when ``tensorboard: true``.

The folder is made (and locked) when a run that trains starts, so the augmentation's log is in it too; a run that
stops on bad input before anything of value was written removes the folder again (and the empty parents it
made): nothing half-written is left behind. :func:`list_runs` reads the folders back (``python -m recbole_llmser
runs``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from logging import getLogger
from pathlib import Path

import yaml

from recbole_llmser.errors import LLMSeRError
from recbole_llmser.methods import uses_llmser, uses_tslrec
from recbole_llmser.schema import PROPS, RESUME_FREE_KEYS
from recbole_llmser.utils import atomic_write_json, file_sha256, unique_stem

#: Files of a run folder: the final config, the results, and the training state while it trains; the sha256 of
#: the data files the run started on; the lock its process holds while it runs; its state.
CONFIG, RESULTS, TRAIN_STATE = "config.yaml", "results.json", "train_state.pth"
INPUTS, LOCK, STATUS = "inputs.json", "run.lock", "status.json"
INPUTS_FORMAT = "recbole_llmser.inputs/1"
#: An empty lock file older than this many seconds is one whose process died before writing its pid into it.
_EMPTY_LOCK_STALE_S = 60


def input_files(config) -> dict:
    """The files a run's training reads, by role: the dataset's atomic files (``.inter`` or the benchmark parts,
    ``.item``, ``.user``, those present), the augmentation artifact (``aug_file``, LLMSeR) and the item-embedding
    table (``tsl_embedding_file``, TSLRec)."""
    folder, name = Path(config["data_path"]), config["dataset"]
    files = {}
    for suffix in [*(f"{part}.inter" for part in config["benchmark_filename"] or []), "inter", "item", "user"]:
        path = folder / f"{name}.{suffix}"
        if path.is_file():
            files[f".{suffix}"] = path
    if uses_llmser(config) and config["aug_file"]:
        files["aug_file"] = Path(config["aug_file"])
    if uses_tslrec(config) and config["tsl_embedding_file"]:
        files["tsl_embedding_file"] = Path(config["tsl_embedding_file"])
    return files


def input_digests(config) -> dict:
    """``{role: {"path", "sha256"}}`` of :func:`input_files` (what ``inputs.json`` records when a run starts)."""
    return {role: {"path": str(path.resolve()), "sha256": file_sha256(path)}
            for role, path in input_files(config).items()}


def runs_dir(config) -> Path:
    """``<checkpoint_dir>/<dataset>/``, the folder that holds a dataset's run folders."""
    return Path(config["checkpoint_dir"]).resolve() / config["dataset"]


def resuming(config) -> bool:
    """Whether a run continues a stopped named run (its folder holds ``train_state.pth``)."""
    return bool(config["run_name"]) and (runs_dir(config) / config["run_name"] / TRAIN_STATE).is_file()


class RunFolder:
    """The folder of one training run, made and locked by :meth:`open`; released by :meth:`close`."""

    def __init__(self, path: Path, made: list):
        self.path, self.made = path, made  # made: the folders this process created (deepest last)
        self.stage, self.started = "start", time.strftime("%Y-%m-%d %H:%M:%S")
        self._log_handler = None
        self.finished_before = (path / RESULTS).is_file()  # a named run that finished: its files stay as they are

    @classmethod
    def open(cls, config) -> "RunFolder":
        """Make (when absent) and lock the run's folder: ``run_name``'s, or a new ``<model>-<method>-<time>-<id>``."""
        base = runs_dir(config)
        path = base / (config["run_name"] or unique_stem(config["model"], config["method"]))
        made = [p for p in (base.parent, base, path) if not p.exists()]
        path.mkdir(parents=True, exist_ok=bool(config["run_name"]))
        try:
            _lock(path)
        except BaseException:
            _remove_empty(made)
            raise
        folder = cls(path, made)
        folder.set_status("running")
        return folder

    @property
    def log_file(self) -> Path:
        return self.path / f"{self.path.name}.log"

    def start_logging(self, config):
        """RecBole's logger (console and file, ``init_logger``), with the file in this folder: ``<run id>.log``.

        ``init_logger`` opens its file under ``./log/`` of the working directory (recbole/utils/logger.py); it runs
        here in a temporary working directory, and its file handler is replaced by one on ``<run id>.log`` with the
        same level, format and filter (a later run in the same process, whose ``init_logger`` attaches nothing,
        gets one too). Returns the root logger."""
        from recbole.utils import init_logger
        from recbole.utils.logger import RemoveColorFilter

        logger = getLogger()
        with tempfile.TemporaryDirectory() as tmp:
            cwd = os.getcwd()
            os.chdir(tmp)
            try:
                init_logger(config)
            finally:
                os.chdir(cwd)
            theirs = [h for h in logger.handlers if isinstance(h, logging.FileHandler)
                      and Path(tmp) in Path(h.baseFilename).parents]
            for handler in theirs:
                logger.removeHandler(handler)
                handler.close()
        if not theirs:  # init_logger's basicConfig found the root logger set up already and did nothing
            logger.setLevel(getattr(logging, str(config["state"] or "INFO").upper(), logging.INFO))
        if self.finished_before:  # only read back: the console is enough, its log stays as it was
            return logger
        new = logging.FileHandler(self.log_file, encoding="utf-8")
        new.setLevel(theirs[0].level if theirs else logger.level)
        new.setFormatter(theirs[0].formatter if theirs else logging.Formatter(
            "%(asctime)-15s %(levelname)s  %(message)s", "%a %d %b %Y %H:%M:%S"))
        new.addFilter(RemoveColorFilter())
        logger.addHandler(new)
        self._log_handler = new
        return logger

    def set_status(self, state: str, stage: str = None, message: str = None) -> None:
        """Write ``status.json`` (atomically): ``state``, the last ``stage`` reached, this process, the time (not in
        the folder of a run that finished before: it is only read back)."""
        self.stage = stage or self.stage
        if self.finished_before:
            return
        atomic_write_json(self.path / STATUS, {
            "state": state, "stage": self.stage, "message": message, "pid": os.getpid(),
            "host": socket.gethostname(), "started": self.started, "updated": time.strftime("%Y-%m-%d %H:%M:%S")})

    def check_resume(self, config, inputs: dict) -> None:
        """A folder that holds an unfinished run (``train_state.pth``) or a finished one (``results.json``) is used
        only when its ``config.yaml`` matches this run's (a property added since, now at its default, matches) and the
        data files it started on (``inputs.json``) are unchanged (the caller resumes the first and returns the
        second's results)."""
        run_dir = self.path
        finished = (run_dir / RESULTS).is_file()
        if not (finished or (run_dir / TRAIN_STATE).is_file()):
            return
        before = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")) or {}
        now = yaml.safe_load(yaml.safe_dump(config.to_dict()))
        changed = sorted(k for k in set(before) | set(now) if k not in RESUME_FREE_KEYS
                         and before.get(k) != now.get(k) and not _new_at_default(k, before, now))
        if changed:
            what, fix = ("a finished", "delete it") if finished else ("an unfinished", "resume it with its own "
                                                                      "settings, or delete it")
            raise LLMSeRError(f"run folder {run_dir} holds {what} run with other settings ({', '.join(changed)}); "
                              f"{fix} or choose another run_name")
        _check_inputs(run_dir, inputs, finished)

    def close(self, error: BaseException = None) -> None:
        """Release the folder. After a one-line error (bad input, found before training wrote anything), a folder this
        run made that holds nothing but its own bookkeeping is removed with the empty parents it made; otherwise the
        folder stays, with a ``stopped`` (interrupted) or ``failed`` status and the error's line."""
        if self._log_handler is not None:
            getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
        if error is not None:
            bookkeeping = {LOCK, STATUS, self.log_file.name}
            if isinstance(error, LLMSeRError) and self.path in self.made \
                    and {p.name for p in self.path.iterdir()} <= bookkeeping:
                for name in bookkeeping:
                    (self.path / name).unlink(missing_ok=True)
                _remove_empty(self.made)
                return
            interrupted = isinstance(error, KeyboardInterrupt)
            self.set_status("stopped" if interrupted else "failed",
                            message=None if interrupted else " ".join(str(error).split())[:500] or type(error).__name__)
        _unlock(self.path)


def _new_at_default(key, before: dict, now: dict) -> bool:
    """A property the package added after the run started, left at its default now (a new property's default keeps
    the old behaviour, so the run is the same)."""
    return key not in before and key in PROPS and now.get(key) == PROPS[key].default


def _remove_empty(folders) -> None:
    for folder in reversed(list(folders)):
        try:
            folder.rmdir()
        except OSError:
            return


def _check_inputs(run_dir: Path, inputs: dict, finished: bool) -> None:
    """Refuse (one line naming the file) to resume or return a run whose data files changed since it started."""
    record = run_dir / INPUTS
    if not record.is_file():
        getLogger().warning(f"{run_dir} has no {INPUTS} (started by an earlier version of recbole_llmser): whether "
                            "its data files changed since it started is not checked")
        return
    try:
        before = json.loads(record.read_text(encoding="utf-8"))
        if before["format"] != INPUTS_FORMAT:
            raise ValueError(before["format"])
        before = {role: entry["sha256"] for role, entry in before["files"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        raise LLMSeRError(f"{record}: not a recbole_llmser inputs record; delete the run folder {run_dir} or choose "
                          "another run_name") from None
    what = "finished" if finished else "unfinished"
    for role in sorted(set(before) | set(inputs)):
        now = inputs.get(role)
        if now is not None and before.get(role) == now["sha256"]:
            continue
        if now is None:
            raise LLMSeRError(f"run folder {run_dir} holds an {what} run that also read a {role} file, which this run "
                              f"does not have; restore it, or delete {run_dir} or choose another run_name")
        change = "changed" if role in before else "appeared"
        raise LLMSeRError(f"{now['path']} {change} since the {what} run in {run_dir} started on it (its sha256 "
                          f"differs from {INPUTS}'s); restore the file, or delete {run_dir} or choose another "
                          "run_name to train on the data as it is now")


def _lock(run_dir: Path) -> Path:
    """Take ``<run_dir>/run.lock`` (created atomically, holding this process's pid and host), or refuse in one line
    when another live process holds it. A lock whose process is gone (same host) is taken over with a warning."""
    lock = run_dir / LOCK
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if attempt == 0 and _lock_is_stale(lock, holder):
                getLogger().warning(f"{lock}: taking over the lock of a run that is no longer running "
                                    f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')})")
                lock.unlink(missing_ok=True)
                continue
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
                   if holder else "a process that is starting")
            raise LLMSeRError(f"run folder {run_dir} is in use by another run ({who}); wait for it to end or choose "
                              f"another run_name (if no such run is going on, delete {lock})") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me + "\n")
        return lock
    raise LLMSeRError(f"{lock}: could not take the run folder's lock; try again")  # another process took it over


def _lock_holder(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _lock_is_stale(lock: Path, holder: dict) -> bool:
    """Whether the process that wrote ``lock`` is gone: its pid is not running on this host, or (an empty lock) it
    died before writing its pid. A lock of another host is never stale (its pid cannot be checked from here)."""
    if not holder:
        try:
            return time.time() - lock.stat().st_mtime > _EMPTY_LOCK_STALE_S
        except OSError:
            return False
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def _unlock(run_dir: Path) -> None:
    """Remove ``run_dir``'s lock if this process holds it."""
    lock = run_dir / LOCK
    if _lock_holder(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


# ----- reading run folders back ----------------------------------------------------------------------------
def run_state(run_dir: Path) -> dict:
    """A run folder's state: ``status.json`` with ``running`` turned into ``stopped (process gone)`` when its
    process no longer runs, and the settings and test NDCG@10 a listing shows."""
    try:
        status = json.loads((run_dir / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        status = {"state": "finished" if (run_dir / RESULTS).is_file() else "unknown", "stage": None}
    lock = run_dir / LOCK
    if status.get("state") == "running" and (not lock.is_file() or _lock_is_stale(lock, _lock_holder(lock))):
        status["state"] = "stopped (process gone)"
    try:
        config = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    ndcg = None
    try:
        test = json.loads((run_dir / RESULTS).read_text(encoding="utf-8"))["test"]
        protocol = "full" if "full" in test else next(iter(test))
        ndcg = (protocol, test[protocol]["overall"].get("ndcg@10"))
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        pass
    return {"run": run_dir.name, "dataset": run_dir.parent.name, "state": status.get("state"),
            "stage": status.get("stage"), "updated": status.get("updated"), "model": config.get("model"),
            "method": config.get("method"), "seed": config.get("seed"), "epochs": config.get("epochs"),
            "test_ndcg@10": ndcg, "path": str(run_dir)}


def list_runs(checkpoint_dir="saved") -> list:
    """Every run folder under ``checkpoint_dir`` (``<dataset>/<run>/`` holding a status, a config or results),
    oldest first."""
    root = Path(checkpoint_dir)
    found = [p.parent for name in (STATUS, CONFIG, RESULTS) for p in root.glob(f"*/*/{name}")]
    folders = sorted(set(found), key=lambda p: p.stat().st_mtime)
    return [run_state(p) for p in folders]
