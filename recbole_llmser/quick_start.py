"""run() and objective_function(), as in RecBole's quick_start but without ray and FLOPs counting."""

from __future__ import annotations

import json
import logging
import sys
from logging import getLogger
from pathlib import Path

import yaml
from recbole.utils import init_logger, init_seed, set_color

from recbole_llmser import distributed
from recbole_llmser.config import Config
from recbole_llmser.data import create_dataset, data_preparation
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.evaluation import (
    PER_USER, check_sampled_protocols, format_results, split_result, split_rows, write_per_user,
)
from recbole_llmser.methods import uses_llmser, uses_tslrec
from recbole_llmser.registry import get_model, get_trainer
from recbole_llmser.run_folder import (CONFIG, INPUTS, INPUTS_FORMAT, RESULTS, TRAIN_STATE, RunFolder, input_digests,
                                       resuming)
from recbole_llmser.run_plan import plan_lines
from recbole_llmser.trainer import kept_epoch
from recbole_llmser.utils import atomic_write_json, atomic_write_text, digest_path


def run(model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=None, saved=True,
        dry_run=False):
    """Build the config, train ``model`` on ``dataset`` and evaluate it; returns the result dict.

    ``cmd_args`` are ``--key=value`` strings applied last (``None`` reads ``sys.argv`` as RecBole does).
    With ``method: llmser`` the augmentation stage runs first (see ``stage``); ``dry_run`` only prints its LLM
    estimate. With ``method: tslrec`` TSLRec's stages build the item-embedding table first; ``llmser+tslrec`` does
    both. ``stage: augment`` returns ``{"artifact": path}`` and/or ``{"tsl_embedding_file": path}`` without
    training (``stage: reconstruct``: TSLRec's stage 1 only).

    ``nproc`` > 1 (or ``world_size``) trains on several processes (:mod:`recbole_llmser.distributed`): this process
    starts them and returns the first one's result; under ``torchrun`` each process is one of them already.
    """
    cmd_args = list(sys.argv[1:] if cmd_args is None else cmd_args)
    config_dict = {**(config_dict or {}), **distributed.torchrun_settings()}
    config = Config(model, dataset, config_file_list, config_dict, cmd_args)
    if distributed.wants_processes(config) and config["stage"] in ("all", "train") and not dry_run:
        return distributed.launch(_process_main, int(config["nproc"]),
                                  (model, dataset, config_file_list, config_dict, cmd_args, saved))
    with distributed.member(config):  # under torchrun this process is one of several
        return run_with_config(config, saved=saved, dry_run=dry_run)


def _process_main(local_rank, model, dataset, config_file_list, config_dict, cmd_args, saved, queue):
    """One of the ``nproc`` processes :func:`run` starts: the same run with its ``local_rank``."""
    config = Config(model, dataset, config_file_list, {**config_dict, "local_rank": local_rank}, cmd_args)
    with distributed.member(config):
        result = run_with_config(config, saved=saved)
    if distributed.is_main(config):
        queue.put(result)


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
    """Train and evaluate with an existing Config, in the run's folder (:class:`~recbole_llmser.run_folder.RunFolder`:
    config, inputs, log, status, checkpoints, results). ``dry_run`` and ``stage: augment|reconstruct`` only build
    (or estimate) the artifacts and return their paths; they make no run folder."""
    init_seed(config["seed"], config["reproducibility"])
    stage = config["stage"]
    if stage == "reconstruct" and not uses_tslrec(config):
        raise LLMSeRError(f"--stage=reconstruct is TSLRec's stage 1; method {config['method']} has no such stage")
    if dry_run or stage in ("reconstruct", "augment"):
        init_logger(config)
        logger = getLogger()
        quiet_console(logger)
        logger.info(config, extra={FILE_ONLY: not config["show_config"]})
        _log_plan(logger, config, dry_run)
        return _artifacts(config, stage, dry_run)
    if not distributed.is_main(config):  # one of several processes, not the first: it writes nothing
        return _train_in(None, config, saved, _follower_logger(config))
    folder = RunFolder.open(config)
    logger = folder.start_logging(config)
    quiet_console(logger)
    logger.info(set_color("run folder", "blue") + f": {folder.path} (log: {folder.log_file.name})")
    logger.info(config, extra={FILE_ONLY: not config["show_config"]})
    if not config["single_spec"]:
        logger.info(f"distributed: {distributed.world_size()} processes ({config['nproc']} on this host), backend "
                    f"{distributed.backend()}, device {config['device']}; this first process writes the run's files")
    try:
        _log_plan(logger, config, dry_run)
        result = _train_in(folder, config, saved, logger)
    except BaseException as err:
        folder.close(err)
        raise
    folder.set_status("finished", "results")
    folder.close()
    return result


def _follower_logger(config):
    """The logger of a process that is not the first of a multi-process run: errors on the console, no file."""
    logger = getLogger()
    logger.setLevel(logging.ERROR)
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
    return logger


def _log_plan(logger, config, dry_run) -> None:
    """The run's plan (:func:`~recbole_llmser.run_plan.plan_lines`) before any work; the CPU warning as a warning."""
    for line in plan_lines(config, dry_run):
        (logger.warning if line.lstrip().startswith("on a CPU") else logger.info)(line)


def _artifacts(config, stage, dry_run, folder=None) -> dict:
    """Build (or reuse; ``dry_run``: only estimate) the method's artifacts: LLMSeR's augmentation artifact and/or
    TSLRec's item-embedding table. Sets ``aug_file`` / ``tsl_embedding_file`` for a run that goes on to train."""
    artifacts, trains = {}, not dry_run and stage in ("all", "train")
    if uses_llmser(config) and stage != "reconstruct":
        if stage == "train" and not config["aug_file"]:
            raise LLMSeRError("--stage=train needs --aug_file=<artifact.jsonl> (made by --stage=augment)")
        if not (trains and config["aug_file"]):
            # a stopped run resumes on the artifact it started with (inputs.json), not on one rebuilt meanwhile
            artifact = augment(config.copy_with(llm_retry_failed=False) if resuming(config) else config, dry_run)
            artifacts["artifact"] = str(artifact) if artifact else None
            if trains:
                config["aug_file"] = str(artifact)
                folder.set_status("running", "augment")
    if uses_tslrec(config):
        if stage == "train" and not config["tsl_embedding_file"]:
            raise LLMSeRError("--stage=train needs --tsl_embedding_file=<table.npy> (made by --stage=augment)")
        if not (trains and config["tsl_embedding_file"]):
            table = tslrec_stages(config, stage, dry_run=dry_run)
            artifacts["tsl_embedding_file"] = str(table) if table else None
            if trains:
                config["tsl_embedding_file"] = str(table)
                folder.set_status("running", "tslrec")
    return artifacts


def _train_in(folder, config, saved, logger):
    """The artifacts, then the data, then training and evaluation in ``folder``; returns the result dict. With several
    processes the first builds the artifacts (the others wait) and owns ``folder``; the others get None."""
    if folder is not None:
        _artifacts(config, config["stage"], False, folder)
    for key, value in distributed.broadcast(config, {k: config[k] for k in ("aug_file", "tsl_embedding_file")}).items():
        config[key] = value
    if uses_llmser(config):
        logger.info(f"dual-channel training with the augmentation artifact {config['aug_file']}")
    if uses_tslrec(config):
        logger.info(f"TSLRec item embeddings from {config['tsl_embedding_file']}")

    dataset = create_dataset(config)
    check_sampled_protocols(config, dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    table = None
    if uses_tslrec(config):  # checked before anything is written: a wrong table leaves nothing behind
        from recbole_llmser.tslrec.stage2 import load_table

        table, _ = load_table(config["tsl_embedding_file"], dataset.field2id_token[dataset.iid_field])

    inputs = input_digests(config)  # the files as loaded (prepare_dataset may have just written them)
    if folder is not None:
        folder.check_resume(config, inputs)
    run_dir = Path(distributed.broadcast(config, str(folder.path) if folder is not None else None))
    return _run_in(run_dir, config, dataset, (train_data, valid_data, test_data), table, inputs, saved, logger,
                   folder)


def _run_in(run_dir, config, dataset, splits, table, inputs, saved, logger, folder):
    """Train and evaluate in the locked ``run_dir`` (see ``run_with_config``); returns the result dict. ``folder`` is
    None in the processes of a multi-process run that write nothing (all but the first)."""
    train_data, valid_data, test_data = splits
    main = folder is not None
    # a named run that finished before (the first process's view): nothing to train
    if distributed.broadcast(config, (run_dir / RESULTS).is_file()):
        if not main:
            return None
        result = {**json.loads((run_dir / RESULTS).read_text(encoding="utf-8")), "finished_earlier": True}
        logger.info("\n" + format_results(result["valid"], "valid"))
        logger.info("\n" + format_results(result["test"], "test"))
        logger.info(set_color("outputs", "blue") + f": {run_dir} finished earlier with these settings; its "
                    f"{RESULTS} is returned (the results above), nothing was trained")
        return result
    config["checkpoint_dir"] = str(run_dir)
    if main and not (run_dir / TRAIN_STATE).is_file():  # a resumed run keeps its config and inputs (checked)
        atomic_write_text(run_dir / CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))
        atomic_write_json(run_dir / INPUTS, {"format": INPUTS_FORMAT, "files": inputs})

    init_seed(config["seed"] + distributed.rank(config), config["reproducibility"])  # global rank
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    if uses_tslrec(config):
        from recbole_llmser.tslrec.inject import apply_item_embeddings

        apply_item_embeddings(model, table, config["tsl_freeze"], config["tsl_projection"])
    logger.info(model, extra={FILE_ONLY: not config["show_config"]})
    trainer = get_trainer(config["MODEL_TYPE"], config["model"], config)(config, model)

    trainer.train_state_file = str(run_dir / TRAIN_STATE)  # every run can be resumed: see run_name
    if main:
        folder.set_status("running", "train")
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, saved=saved,
                                                      show_progress=config["show_progress"])
    if saved:
        trainer.load_model_file()

    if main:
        folder.set_status("running", "evaluate")
    rows = {name: split_rows(model, data, dataset, config, show_progress=config["show_progress"])
            for name, data in (("valid", valid_data), ("test", test_data))}
    valid_result, test_result = (split_result(rows[name], dataset, config) for name in ("valid", "test"))
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
        "per_user": PER_USER,  # the per-user ranks of both splits, beside results.json (written first)
        "shared_rows": getattr(dataset, "shared_rows", {}),  # evaluation rows repeating one (history, target)
    }
    if not main:
        return result
    write_per_user(run_dir / PER_USER, rows, dataset, config)
    atomic_write_json(run_dir / RESULTS, result)
    for done in (run_dir / TRAIN_STATE, digest_path(run_dir / TRAIN_STATE)):  # finished: nothing left to resume
        done.unlink(missing_ok=True)
    logger.info(set_color("outputs", "blue") + f": {run_dir} (results.json, {PER_USER}, config.yaml"
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
