"""run() and objective_function(), as in RecBole's quick_start but without ray and FLOPs counting."""

from __future__ import annotations

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


def _make_run_dir(config) -> Path:
    base = Path(config["checkpoint_dir"]).resolve() / config["dataset"]
    run_dir = base / unique_stem(config["model"], config["method"])
    run_dir.mkdir(parents=True, exist_ok=False)
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
    config["checkpoint_dir"] = str(run_dir)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    if uses_tslrec(config):
        from recbole_llmser.tslrec.inject import apply_item_embeddings

        apply_item_embeddings(model, table, config["tsl_freeze"], config["tsl_projection"])
    logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"], config)(config, model)

    valid_curve = []  # (epoch_idx, validation score) of every validated epoch, for the record
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"],
        callback_fn=lambda epoch_idx, score: valid_curve.append((epoch_idx, float(score))),
    )
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
        "best_epoch": kept_epoch(valid_curve, trainer.cur_step),
        "epochs_trained": len(trainer.train_loss_dict),
        "valid_curve": [[epoch_idx + 1, round(score, 6)] for epoch_idx, score in valid_curve],
        "valid": valid_result,
        "test": test_result,
        "run_dir": str(run_dir),
        "checkpoint": trainer.saved_model_file if saved else None,
        "aug_file": config["aug_file"],
        "tsl_embedding_file": config["tsl_embedding_file"],
    }
    atomic_write_json(run_dir / "results.json", result)
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
