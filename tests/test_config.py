import pickle

import pytest
import recbole.utils

from recbole_llmser.config import Config
from recbole_llmser.errors import LLMSeRError


def test_property_precedence(tmp_path):
    # RecBole default (eval_step=1) survives; overall.yaml beats RecBole (MAX_ITEM_LIST_LENGTH 50 -> 200);
    # model yaml beats overall (GRU4Rec hidden_size 64); dataset yaml beats overall (group_bounds).
    c = Config("GRU4Rec", "amazon-fashion-ids", cmd_args=[])
    assert c["eval_step"] == 1
    assert c["MAX_ITEM_LIST_LENGTH"] == 200
    assert c["hidden_size"] == 64 and c["embedding_size"] == 64
    assert c["group_bounds"] == [2, 3]
    assert c["train_neg_sample_args"]["distribution"] == "none"  # CE -> no negative sampling

    first = tmp_path / "a.yaml"
    first.write_text("group_bounds: [1, 5]\nepochs: 7\nhidden_size: 32\n")
    second = tmp_path / "b.yaml"
    second.write_text("epochs: 9\n")
    c = Config("GRU4Rec", "amazon-fashion-ids", config_file_list=[str(first), str(second)], cmd_args=[])
    assert c["group_bounds"] == [1, 5] and c["epochs"] == 9 and c["hidden_size"] == 32

    c = Config(
        "GRU4Rec", "amazon-fashion-ids", config_file_list=[str(first)], cmd_args=["--epochs=3", "--group_bounds=[2,4]"]
    )
    assert c["epochs"] == 3 and c["group_bounds"] == [2, 4] and c["hidden_size"] == 32
    # '~' on the command line is null, as in the property files (the errors suggest --item_text_field=~)
    c = Config("SASRec", "amazon-beauty", cmd_args=["--item_text_field=~", "--run_name=mine"])
    assert c["item_text_field"] is None and c["run_name"] == "mine"


def test_bpr_gets_negative_sampling_unless_user_sets_it():
    c = Config("SASRec", "amazon-fashion-ids", cmd_args=["--loss_type=BPR"])
    assert c["train_neg_sample_args"]["sample_num"] == 1


def test_recbole_module_lists_are_not_mutated():
    before = list(recbole.utils.dataset_arguments)
    Config("SASRec", "amazon-fashion-ids", cmd_args=[])
    Config("SASRec", "amazon-beauty", cmd_args=[])
    assert recbole.utils.dataset_arguments == before


def test_bundled_dataset_is_found_from_any_cwd(tmp_cwd):
    c = Config("SASRec", "amazon-beauty", cmd_args=[])
    assert c["data_path"].endswith("dataset/amazon-beauty")
    c = Config("SASRec", "amazon-beauty", cmd_args=[f"--data_path={tmp_cwd}"])
    assert c["data_path"] == str(tmp_cwd / "amazon-beauty")


def test_secrets_never_in_config_dump_or_pickle():
    c = Config("SASRec", "amazon-fashion-ids", config_dict={"llm_api_key": "sk-SECRET123"}, cmd_args=[])
    assert c.secret("llm_api_key") == "sk-SECRET123"
    assert "llm_api_key" not in c.final_config_dict
    assert "sk-SECRET123" not in str(c)
    assert "sk-SECRET123" not in repr(c.to_dict())
    assert b"sk-SECRET123" not in pickle.dumps(c)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--epochs=-1"], "'epochs'"),
        (["--epochs=abc"], "'epochs'"),
        (["--learning_rate=0"], "'learning_rate'"),
        (["--eval_protocols=['pop100']"], "'eval_protocols'"),
        (["--group_bounds=[3,2]"], "'group_bounds'"),
        (["--group_names=['a','b']"], "'group_names'"),
        (["--method=magic"], "'method'"),
    ],
)
def test_bad_values_are_one_line_errors(args, needle):
    with pytest.raises(LLMSeRError) as err:
        Config("SASRec", "amazon-fashion-ids", cmd_args=args)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nmetrics: [Hit, NDCG\nfoo: 1\n")
    with pytest.raises(LLMSeRError) as err:
        Config("SASRec", "amazon-fashion-ids", config_file_list=[str(bad)], cmd_args=[])
    assert str(bad) in str(err.value) and "line" in str(err.value)
    with pytest.raises(LLMSeRError, match="not found"):
        Config("SASRec", "amazon-fashion-ids", config_file_list=[str(tmp_path / "missing.yaml")], cmd_args=[])


def test_shipped_presets_are_valid_property_files_that_config_files_applies(tmp_path, tmp_cwd):
    """Each file in properties/presets sets only known properties (a typo would be silently ignored by RecBole),
    differs from the defaults in every key it sets, passes the schema's checks, and ``--config_files`` applies it;
    a preset path that does not exist from here names the shipped file."""
    import yaml

    from recbole_llmser.config import bundled_preset, properties_dir
    from recbole_llmser.schema import PROPS

    presets = sorted((properties_dir() / "presets").glob("*.yaml"))
    assert [p.name for p in presets] == ["full_ranking.yaml"]
    defaults = Config("SASRec", "amazon-beauty", cmd_args=[])
    for preset in presets:
        values = yaml.safe_load(preset.read_text())
        assert values and set(values) <= set(PROPS), set(values) - set(PROPS)
        assert all(defaults[k] != v for k, v in values.items())
        c = Config("SASRec", "amazon-beauty", config_file_list=[str(preset)], cmd_args=[])
        assert {k: c[k] for k in values} == values
        assert bundled_preset(preset.stem) == bundled_preset(preset.name) == preset
        with pytest.raises(LLMSeRError, match=f"the bundled preset of that name is {preset}"):
            Config("SASRec", "amazon-beauty", config_file_list=[f"presets/{preset.name}"], cmd_args=[])
    assert bundled_preset("no_such_preset") is None


def test_unknown_and_unsupported_models():
    with pytest.raises(LLMSeRError, match="no such model"):
        Config("NoSuchRec", "amazon-fashion-ids", cmd_args=[])
    with pytest.raises(LLMSeRError, match="sequential"):
        Config("BPR", "amazon-fashion-ids", cmd_args=[])
    with pytest.raises(LLMSeRError, match="full_sort_predict"):
        Config("DIN", "amazon-fashion-ids", cmd_args=[])
