"""run() and objective_function(), as in RecBole's quick_start but without ray and FLOPs counting."""

from __future__ import annotations

import json
from logging import getLogger
from pathlib import Path

import yaml
from recbole.utils import init_logger, init_seed, set_color

from recbole_llmser.config import Config, uses_llmser, uses_tslrec
from recbole_llmser.data import create_dataset, data_preparation
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.evaluation import evaluate_split, format_results
from recbole_llmser.trainer import kept_epoch
from recbole_llmser.utils import atomic_write_json, atomic_write_text, get_model, get_trainer, unique_stem

#: Files of a run folder: the final config, the results, and the training state while it trains.
CONFIG, RESULTS, TRAIN_STATE = "config.yaml", "results.json", "train_state.pth"


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


#: Keys that may differ between an interrupted run and its resumption (they do not change what is trained).
RESUME_FREE_KEYS = frozenset({"show_progress", "state", "gpu_id", "use_gpu", "device", "worker", "log_wandb",
                              "checkpoint_dir"})


def _make_run_dir(config) -> Path:
    """The run's folder: a new ``<model>-<method>-<time>-<random>`` one, or ``run_name``'s (see ``_named_run_dir``)."""
    base = Path(config["checkpoint_dir"]).resolve() / config["dataset"]
    if config["run_name"]:
        return _named_run_dir(base / config["run_name"], config)
    run_dir = base / unique_stem(config["model"], config["method"])
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def _named_run_dir(run_dir: Path, config) -> Path:
    """A named run folder: created when absent; one that holds an unfinished run (``train_state.pth``) or a finished
    one (``results.json``) is used only when its ``config.yaml`` matches this run's (the caller resumes the first and
    returns the second's results)."""
    finished = (run_dir / RESULTS).is_file()
    if finished or (run_dir / TRAIN_STATE).is_file():
        before = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")) or {}
        now = yaml.safe_load(yaml.safe_dump(config.to_dict()))
        changed = sorted(k for k in set(before) | set(now)
                         if k not in RESUME_FREE_KEYS and before.get(k) != now.get(k))
        if changed:
            what, fix = ("a finished", "delete it") if finished else ("an unfinished", "resume it with its own settings"
                                                                      ", or delete it")
            raise LLMSeRError(f"run folder {run_dir} holds {what} run with other settings ({', '.join(changed)}); "
                              f"{fix} or choose another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def augment(config, dry_run=False):
    """The LLMSeR augmentation stage for ``config``; returns the artifact path (None for a dry run)."""
    from recbole_llmser.augment.pipeline import run_augmentation

    plain = config.copy_with(method="none", aug_file=None, train_all_positions=False)
    return run_augmentation(config, create_dataset(plain), dry_run=dry_run)


def tslrec_stages(config, stage="all", dry_run=False):
    """TSLRec's stages for ``config``; returns the item-embedding table's path (``reconstruct``: the stage-1
    checkpoint's; None for a dry run)."""
    from recbole_llmser.tslrec.pipeline import build_table

    plain = config.copy_with(method="none", aug_file=None, train_all_positions=False)
    return build_table(config, create_dataset(plain), stage=stage, dry_run=dry_run)


def run_with_config(config, saved=True, dry_run=False):
    """Train and evaluate with an existing Config. Writes ``<run dir>/{config.yaml, results.json, *.pth}``."""
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(config)

    stage, artifacts = config["stage"], {}
    if stage == "reconstruct" and not uses_tslrec(config):
        raise LLMSeRError(f"--stage=reconstruct is TSLRec's stage 1; method {config['method']} has no such stage")
    if uses_llmser(config) and stage != "reconstruct":
        if stage == "train" and not config["aug_file"]:
            raise LLMSeRError("--stage=train needs --aug_file=<artifact.jsonl> (made by --stage=augment)")
        if stage == "augment" or dry_run or not config["aug_file"]:
            artifact = augment(config, dry_run=dry_run)
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
    train_data, valid_data, test_data = data_preparation(config, dataset)
    if uses_tslrec(config):  # checked before the run folder exists: a wrong table leaves nothing behind
        from recbole_llmser.tslrec.stage2 import load_table

        table, _ = load_table(config["tsl_embedding_file"], dataset.field2id_token[dataset.iid_field])

    run_dir = _make_run_dir(config)  # only once the data loaded: a bad dataset leaves no empty run folder
    if (run_dir / RESULTS).is_file():  # a named run that finished before, with these settings: nothing to train
        result = {**json.loads((run_dir / RESULTS).read_text(encoding="utf-8")), "finished_earlier": True}
        logger.info("\n" + format_results(result["valid"], "valid"))
        logger.info("\n" + format_results(result["test"], "test"))
        logger.info(set_color("outputs", "blue") + f": {run_dir} finished earlier with these settings; its "
                    f"{RESULTS} is returned (the results above), nothing was trained")
        return result
    config["checkpoint_dir"] = str(run_dir)
    if not (run_dir / TRAIN_STATE).is_file():  # a resumed run keeps the config it started with (checked equal)
        atomic_write_text(run_dir / CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    if uses_tslrec(config):
        from recbole_llmser.tslrec.inject import apply_item_embeddings

        apply_item_embeddings(model, table, config["tsl_freeze"], config["tsl_projection"])
    logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"], config)(config, model)

    trainer.train_state_file = str(run_dir / TRAIN_STATE)  # every run can be resumed: see run_name
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, saved=saved,
                                                      show_progress=config["show_progress"])
    if saved:
        trainer.load_model_file()

    valid_result = evaluate_split(model, valid_data, dataset, config)
    test_result = evaluate_split(model, test_data, dataset, config)
    logger.info(set_color("best valid ", "yellow") + f": {dict(best_valid_result or {})}")
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
