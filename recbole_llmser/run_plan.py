"""What a run will do, said before it does it: the stages, their settings and backends, what may come from a cache,
and (on a CPU with heavy settings) that it takes hours to days, with the short settings for a first run.

Pure functions of the config (no data is read), so ``--dry_run`` can print the plan for every method at once.
"""

from __future__ import annotations

from recbole_llmser.methods import uses_llmser, uses_tslrec

#: Short settings for a first run on a CPU (the property defaults are the paper's: hours to days on a CPU).
SHORT_CPU_SETTINGS = ("--epochs=1 --ccg_epochs=1 --MAX_ITEM_LIST_LENGTH=20 --ccg_max_len=20 "
                      "--train_batch_size=512")


def heavy_on_cpu(config) -> bool:
    """Whether a run with ``config`` is one of hours or more on a CPU: many epochs, helpers or long sequences."""
    if "cuda" in str(config["device"]):
        return False
    helpers = uses_llmser(config) or uses_tslrec(config)
    return (config["epochs"] > 20 or config["MAX_ITEM_LIST_LENGTH"] > 100
            or (helpers and config["ccg_epochs"] > 5 and not config["aug_file"]))


def _epochs(n) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _backend_phrase(config) -> str:
    from recbole_llmser.augment.backends import resolve_backend

    backend = resolve_backend(config)
    return {"llm": f"the LLM {config['llm_model']} (an OpenAI-compatible endpoint; answers are cached)",
            "offline": "the offline embedding stand-in (no endpoint configured)",
            "lm_score": f"the local LM {config['lm_score_model']} ranking candidates by title likelihood (lm_score: "
                        "nothing generated; scores are cached)",
            "model": "the forward helper model (no item text)"}[backend]


def plan_lines(config, dry_run: bool = False) -> list:
    """The plan of a run, a few lines for the log."""
    stage = config["stage"]
    trains = not dry_run and stage in ("all", "train")
    device = str(config["device"])
    if config["use_gpu"] and "cuda" not in device:
        device += " (no CUDA device found: use_gpu has no effect)"
    lines = [f"plan: {config['model']} on {config['dataset']}, method {config['method']}, stage {stage}, "
             f"device {device}" + (" (dry run: nothing is trained)" if dry_run else "")]
    if uses_llmser(config) and stage != "reconstruct":
        if config["aug_file"] and stage != "augment":
            lines.append(f"  LLMSeR augmentation: the artifact {config['aug_file']}")
        else:
            lines.append(f"  LLMSeR augmentation: CCG reverse and ARV forward {config['ccg_model']} helpers, "
                         f"{_epochs(config['ccg_epochs'])} each; SNF and ARV by {_backend_phrase(config)}, two calls a "
                         f"user; K={config['ccg_num_candidates']} candidates, k={config['snf_num_picks']} picks, "
                         f"M={config['aug_num_pseudo']} pseudo items per user; helpers and the artifact are reused "
                         "from <checkpoint_dir>/<dataset>/augment/ when their settings and data match")
    if uses_tslrec(config):
        if config["tsl_embedding_file"] and stage not in ("augment", "reconstruct"):
            lines.append(f"  TSLRec item embeddings: the table {config['tsl_embedding_file']}")
        else:
            lines.append(f"  TSLRec: stage 1 tunes {config['tsl_lm_path'] or config['tsl_lm']} for "
                         f"{_epochs(config['tsl_epochs'])} on {config['tsl_num_categories']} latent categories, stage 2 "
                         "builds the item table; both reused from <checkpoint_dir>/<dataset>/tslrec/ when they match")
    if trains or dry_run:
        dct = f", dual-channel loss ({config['dct_mode']})" if uses_llmser(config) else ""
        lines.append(f"  training: up to {_epochs(config['epochs'])} (early stopping after {config['stopping_step']} "
                     f"without a better {config['valid_metric']}), batch {config['train_batch_size']}, sequences of "
                     f"at most {config['MAX_ITEM_LIST_LENGTH']} items{dct}")
        lines.append(f"  evaluation: {', '.join(config['eval_protocols'])}, overall and per user-length group "
                     f"({', '.join(config['group_names'] or [])})")
    if heavy_on_cpu(config) and (trains or dry_run or stage == "augment"):
        lines.append(f"  on a CPU these settings (the paper's unless you changed them) take hours to days; for a "
                     f"first run add: {SHORT_CPU_SETTINGS}")
    return lines
