"""recbole_llmser: LLM-based data augmentation (LLMSeR) and LLM-enhanced embeddings (TSLRec) for RecBole.

Importing the package is cheap (``--help`` answers at once); the RecBole/NumPy/torch/pandas fixes of
:mod:`recbole_llmser.compat` are applied when a module that uses RecBole imports it.
"""

__version__ = "0.1.0"
