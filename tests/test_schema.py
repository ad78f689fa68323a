"""The property schema: the files generated from it are up to date, and the key lists derive from it."""

import yaml

from recbole_llmser import schema
from recbole_llmser.config import Config
from recbole_llmser.utils import REPO_DIR


def test_generated_files_match_the_schema():
    for rel, make in schema.GENERATED.items():
        assert (REPO_DIR / rel).read_text(encoding="utf-8") == make(), f"run python -m recbole_llmser.schema ({rel})"


def test_overall_yaml_holds_every_default_of_our_own():
    values = yaml.safe_load(schema.overall_yaml())
    own = {name: p.default for name, p in schema.PROPS.items() if p.default not in (schema.RECBOLE, schema.PER_DATASET)}
    assert values == own


def test_key_lists_follow_the_flags():
    assert "ccg_num_candidates" in schema.AUG_KEYS and "tsl_lm" in schema.STAGE_KEYS
    assert "tsl_lm" not in schema.AUG_KEYS and "llm_concurrency" not in schema.AUG_KEYS
    # a key that does not change a run's numbers is also free to change when the run resumes
    assert schema.NON_SEMANTIC_KEYS <= schema.RESUME_FREE_KEYS
    assert {"llm_concurrency", "device", "llm_retry_failed"} <= schema.RESUME_FREE_KEYS
    assert "epochs" not in schema.RESUME_FREE_KEYS
    assert {"data_path", "load_col", "encoding"} <= set(schema.HELPER_KEYS)


def test_every_checked_key_reaches_the_config(tmp_path):
    config = Config("SASRec", "amazon-fashion-ids", config_dict={"state": "WARNING"}, cmd_args=[])
    missing = [k for k in schema.VALIDATORS if config[k] is None and schema.PROPS[k].default is not None
               and schema.PROPS[k].default != schema.RECBOLE]
    assert missing == []
