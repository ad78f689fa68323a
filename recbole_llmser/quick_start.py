"""run() and objective_function(), as in RecBole's quick_start but without ray and FLOPs counting."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from logging import getLogger
from pathlib import Path

import yaml
from recbole.utils import init_logger, init_seed, set_color

from recbole_llmser.config import Config, uses_llmser, uses_tslrec
from recbole_llmser.data import create_dataset, data_preparation
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.evaluation import check_sampled_protocols, evaluate_split, format_results
from recbole_llmser.registry import get_model, get_trainer
from recbole_llmser.schema import RESUME_FREE_KEYS
from recbole_llmser.trainer import kept_epoch
from recbole_llmser.utils import (
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    unique_stem,
)

#: Files of a run folder: the final config, the results, and the training state while it trains; the sha256 of
#: the data files the run started on; the lock its process holds while it runs.
CONFIG, RESULTS, TRAIN_STATE = "config.yaml", "results.json", "train_state.pth"
INPUTS, LOCK = "inputs.json", "run.lock"
INPUTS_FORMAT = "recbole_llmser.inputs/1"
#: An empty lock file older than this many seconds is one whose process died before writing its pid into it.
_EMPTY_LOCK_STALE_S = 60


def run(model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=None, saved=True,
        dry_run=False):
    """Build the config, train ``model`` on ``dataset`` and evaluate it; returns the result dict.

    ``cmd_args`` are ``--key=value`` strings applied last (``None`` reads ``sys.argv`` as RecBole does).
    With ``method: llmser`` the augmentation stage runs first (see ``stage``); ``dry_run`` only prints its LLM
    estimate. With ``method: tslrec`` TSLRec's stages build the item-embedding table first; ``llmser+tslrec`` does
    both. ``stage: augment`` returns ``{"artifact": path}`` and/or ``{"tsl_embedding_file": path}`` without
    training (``stage: reconstruct``: TSLRec's stage 1 only).
    """
    config = Config(model, dataset, config_file_list, config_dict, cmd_args)
    return run_with_config(config, saved=saved, dry_run=dry_run)


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


def _make_run_dir(config, inputs=None) -> Path:
    """The run's folder, locked (``run.lock``) for this process: a new ``<model>-<method>-<time>-<random>`` one, or
    ``run_name``'s (see ``_named_run_dir``). The caller releases the lock (``_unlock``)."""
    base = Path(config["checkpoint_dir"]).resolve() / config["dataset"]
    if config["run_name"]:
        return _named_run_dir(base / config["run_name"], config, inputs)
    run_dir = base / unique_stem(config["model"], config["method"])
    run_dir.mkdir(parents=True, exist_ok=False)
    _lock(run_dir)
    return run_dir


def _named_run_dir(run_dir: Path, config, inputs=None) -> Path:
    """A named run folder, created when absent and locked against a second process (``_lock``). One that holds an
    unfinished run (``train_state.pth``) or a finished one (``results.json``) is used only when its ``config.yaml``
    matches this run's and the data files it started on (``inputs.json``) are unchanged (the caller resumes the
    first and returns the second's results)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _lock(run_dir)
    try:
        finished = (run_dir / RESULTS).is_file()
        if finished or (run_dir / TRAIN_STATE).is_file():
            before = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")) or {}
            now = yaml.safe_load(yaml.safe_dump(config.to_dict()))
            changed = sorted(k for k in set(before) | set(now)
                             if k not in RESUME_FREE_KEYS and before.get(k) != now.get(k))
            if changed:
                what, fix = ("a finished", "delete it") if finished else ("an unfinished", "resume it with its own "
                                                                          "settings, or delete it")
                raise LLMSeRError(f"run folder {run_dir} holds {what} run with other settings ({', '.join(changed)}); "
                                  f"{fix} or choose another run_name")
            if inputs is not None:
                _check_inputs(run_dir, inputs, finished)
    except BaseException:
        _unlock(run_dir)
        raise
    return run_dir


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


#: ``extra`` key of a log record that goes to the log file but not to the console (see :func:`quiet_console`).
FILE_ONLY = "file_only"


class _NotFileOnly(logging.Filter):
    def filter(self, record):
        return not getattr(record, FILE_ONLY, False)


def quiet_console(logger) -> None:
    """Keep records logged with ``extra={FILE_ONLY: True}`` (the config and model dumps) off the console: the
    console shows what matters (errors first), the log file keeps everything."""
    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler and not any(isinstance(f, _NotFileOnly) for f in handler.filters):
            handler.addFilter(_NotFileOnly())


def plain_metrics(result) -> dict:
    """A metric dict with plain rounded floats (RecBole's hold ``np.float64``, printed as such)."""
    return {k: round(float(v), 4) for k, v in dict(result or {}).items()}


def _resuming(config) -> bool:
    """Whether this run continues a stopped named run (its folder holds ``train_state.pth``)."""
    name = config["run_name"]
    return bool(name) and (Path(config["checkpoint_dir"]).resolve() / config["dataset"] / name / TRAIN_STATE).is_file()


def _plain_dataset(config, dry_run):
    """The dataset without augmentation, for the stages before training; a run that will train and evaluate
    checks its evaluation protocols on it first (so a too-small catalogue stops before hours of augmentation)."""
    dataset = create_dataset(config.copy_with(method="none", aug_file=None, train_all_positions=False))
    if config["stage"] == "all" and not dry_run:
        check_sampled_protocols(config, dataset)
    return dataset


def augment(config, dry_run=False):
    """The LLMSeR augmentation stage for ``config``; returns the artifact path (None for a dry run)."""
    from recbole_llmser.augment.pipeline import run_augmentation

    return run_augmentation(config, _plain_dataset(config, dry_run), dry_run=dry_run)


def tslrec_stages(config, stage="all", dry_run=False):
    """TSLRec's stages for ``config``; returns the item-embedding table's path (``reconstruct``: the stage-1
    checkpoint's; None for a dry run)."""
    from recbole_llmser.tslrec.pipeline import build_table

    return build_table(config, _plain_dataset(config, dry_run), stage=stage, dry_run=dry_run)


def run_with_config(config, saved=True, dry_run=False):
    """Train and evaluate with an existing Config. Writes ``<run dir>/{config.yaml, inputs.json, results.json,
    *.pth}`` (``*.pth.sha256`` beside each checkpoint); holds ``<run dir>/run.lock`` while it runs."""
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    quiet_console(logger)
    logger.info(config, extra={FILE_ONLY: not config["show_config"]})

    stage, artifacts = config["stage"], {}
    if stage == "reconstruct" and not uses_tslrec(config):
        raise LLMSeRError(f"--stage=reconstruct is TSLRec's stage 1; method {config['method']} has no such stage")
    if uses_llmser(config) and stage != "reconstruct":
        if stage == "train" and not config["aug_file"]:
            raise LLMSeRError("--stage=train needs --aug_file=<artifact.jsonl> (made by --stage=augment)")
        if stage == "augment" or dry_run or not config["aug_file"]:
            # a stopped run resumes on the artifact it started with (inputs.json), not on one rebuilt meanwhile
            artifact = augment(config.copy_with(llm_retry_failed=False) if _resuming(config) else config, dry_run)
            artifacts["artifact"] = str(artifact) if artifact else None
            if not (dry_run or stage == "augment"):
                config["aug_file"] = str(artifact)
    if uses_tslrec(config):
        if stage == "train" and not config["tsl_embedding_file"]:
            raise LLMSeRError("--stage=train needs --tsl_embedding_file=<table.npy> (made by --stage=augment)")
        if stage in ("reconstruct", "augment") or dry_run or not config["tsl_embedding_file"]:
            table = tslrec_stages(config, stage, dry_run=dry_run)
            artifacts["tsl_embedding_file"] = str(table) if table else None
            if not (dry_run or stage in ("reconstruct", "augment")):
                config["tsl_embedding_file"] = str(table)
    if dry_run or stage in ("reconstruct", "augment"):
        return artifacts
    if uses_llmser(config):
        logger.info(f"dual-channel training with the augmentation artifact {config['aug_file']}")
    if uses_tslrec(config):
        logger.info(f"TSLRec item embeddings from {config['tsl_embedding_file']}")

    dataset = create_dataset(config)
    check_sampled_protocols(config, dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    table = None
    if uses_tslrec(config):  # checked before the run folder exists: a wrong table leaves nothing behind
        from recbole_llmser.tslrec.stage2 import load_table

        table, _ = load_table(config["tsl_embedding_file"], dataset.field2id_token[dataset.iid_field])

    inputs = input_digests(config)  # the files as loaded (prepare_dataset may have just written them)
    run_dir = _make_run_dir(config, inputs)  # only once the data loaded: a bad dataset leaves no empty run folder
    try:
        return _run_in(run_dir, config, dataset, (train_data, valid_data, test_data), table, inputs, saved, logger)
    finally:
        _unlock(run_dir)


def _run_in(run_dir, config, dataset, splits, table, inputs, saved, logger):
    """Train and evaluate in the locked ``run_dir`` (see ``run_with_config``); returns the result dict."""
    train_data, valid_data, test_data = splits
    if (run_dir / RESULTS).is_file():  # a named run that finished before, with these settings: nothing to train
        result = {**json.loads((run_dir / RESULTS).read_text(encoding="utf-8")), "finished_earlier": True}
        logger.info("\n" + format_results(result["valid"], "valid"))
        logger.info("\n" + format_results(result["test"], "test"))
        logger.info(set_color("outputs", "blue") + f": {run_dir} finished earlier with these settings; its "
                    f"{RESULTS} is returned (the results above), nothing was trained")
        return result
    config["checkpoint_dir"] = str(run_dir)
    if not (run_dir / TRAIN_STATE).is_file():  # a resumed run keeps the config and inputs it started with (checked)
        atomic_write_text(run_dir / CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))
        atomic_write_json(run_dir / INPUTS, {"format": INPUTS_FORMAT, "files": inputs})

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    if uses_tslrec(config):
        from recbole_llmser.tslrec.inject import apply_item_embeddings

        apply_item_embeddings(model, table, config["tsl_freeze"], config["tsl_projection"])
    logger.info(model, extra={FILE_ONLY: not config["show_config"]})
    trainer = get_trainer(config["MODEL_TYPE"], config["model"], config)(config, model)

    trainer.train_state_file = str(run_dir / TRAIN_STATE)  # every run can be resumed: see run_name
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, saved=saved,
                                                      show_progress=config["show_progress"])
    if saved:
        trainer.load_model_file()

    valid_result = evaluate_split(model, valid_data, dataset, config)
    test_result = evaluate_split(model, test_data, dataset, config)
    logger.info(set_color("best valid ", "yellow") + f": {plain_metrics(best_valid_result)}")
    logger.info("\n" + format_results(valid_result, "valid"))
    logger.info("\n" + format_results(test_result, "test"))

    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "method": config["method"],
        "seed": config["seed"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": dict(best_valid_result or {}),
        "best_epoch": kept_epoch(trainer.valid_curve, trainer.cur_step),
        "epochs_trained": len(trainer.train_loss_dict),
        "resumed_at_epoch": None if trainer.resumed_from is None else trainer.resumed_from + 1,
        "finished_earlier": False,
        "valid_curve": [[epoch_idx + 1, round(score, 6)] for epoch_idx, score in trainer.valid_curve],
        "valid": valid_result,
        "test": test_result,
        "run_dir": str(run_dir),
        "checkpoint": trainer.saved_model_file if saved else None,
        "aug_file": config["aug_file"],
        "tsl_embedding_file": config["tsl_embedding_file"],
    }
    atomic_write_json(run_dir / RESULTS, result)
    (run_dir / TRAIN_STATE).unlink(missing_ok=True)  # finished: nothing left to resume
    logger.info(set_color("outputs", "blue") + f": {run_dir} (results.json, config.yaml"
                + (f", {Path(trainer.saved_model_file).name})" if saved else ")"))
    return result


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """The hyper-parameter search entry point RecBole's HyperTuning expects (without ray)."""
    config = Config(config_dict=config_dict, config_file_list=config_file_list, cmd_args=[])
    result = run_with_config(config, saved=saved)
    overall = {p: r["overall"] for p, r in result["test"].items()}
    return {
        "model": config["model"],
        "best_valid_score": result["best_valid_score"],
        "valid_score_bigger": result["valid_score_bigger"],
        "best_valid_result": result["best_valid_result"],
        "test_result": overall,
    }
