"""LLMSeR's augmentation, one file per stage: CCG (``ccg.py``: candidates from a reverse helper model), SNF
(``snf.py``: the LLM keeps the relevant candidates), ARV (``arv.py``: reliability weight w_u), sequenced into one
artifact by ``pipeline.py``; DCT, the training stage, is :mod:`recbole_llmser.dct`.

What the stages run on: ``backends.py`` (llm / offline / model, and the state SNF and ARV share), the LLM client
``llm.py`` (with ``llm_settings.py``, ``llm_cache.py``, ``llm_tokens.py``), ``prompts.py`` and ``matching.py``
(prompts and answers), ``semantic.py`` (text vectors; ``embedding_cache.py``, ``similarity.py``) and the LLM's
offline stand-in ``offline_ranker.py``. The helper models, training prefixes and item titles that TSLRec shares
are top-level modules: :mod:`recbole_llmser.helper_models`, :mod:`recbole_llmser.sequences`,
:mod:`recbole_llmser.item_text`."""
