"""recbole_llmser: LLM-based data augmentation (LLMSeR) and LLM-enhanced embeddings (TSLRec) for RecBole."""

from recbole_llmser import compat as _compat

_compat.apply()

__version__ = "0.1.0"
