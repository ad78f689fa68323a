"""The package's methods and stages, and which of them a run uses (a leaf module: no package imports)."""

from __future__ import annotations

#: all: build (or reuse) the method's artifacts, then train; reconstruct: TSLRec's stage 1 only; augment: the
#: artifacts only (LLMSeR's augmentation artifact and/or TSLRec's item-embedding table); train: existing artifacts.
STAGES = ("all", "reconstruct", "augment", "train")

#: Keys whose values are secrets: kept out of ``final_config_dict`` (so out of logs, checkpoints and dumps).
SECRET_KEYS = {"llm_api_key", "embedding_api_key"}

METHODS = ("none", "llmser", "tslrec", "llmser+tslrec")


def uses_llmser(config) -> bool:
    """Whether the run's method includes LLMSeR (augmentation + dual-channel training)."""
    return config["method"] in ("llmser", "llmser+tslrec")


def uses_tslrec(config) -> bool:
    """Whether the run's method includes TSLRec (LLM-enhanced item embeddings)."""
    return config["method"] in ("tslrec", "llmser+tslrec")
