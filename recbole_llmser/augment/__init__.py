"""LLMSeR's augmentation stages: CCG (candidates.py), SNF (filter.py), ARV (reliability.py), orchestrated by
pipeline.py into one augmentation artifact; LLM access in llm.py, prompts.py, matching.py, semantic.py."""
